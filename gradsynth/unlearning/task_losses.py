"""The forget and retain losses of a model on a batch, by name (see `objectives` for the formulas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradsynth.unlearning.encoding import first_labelled
from gradsynth.unlearning.objectives import (
    FORGET_LOSSES,
    RETAIN_LOSSES,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    sequence_logprob,
    simnpo_loss,
)
from gradsynth.unlearning.shared_prefix import answer_logits


@dataclass(frozen=True)
class LossSettings:
    """Which forget and retain loss, and their hyper-parameters.

    ``beta``/``delta``: NPO's and SimNPO's inverse temperature and SimNPO's margin.
    ``retain=None`` picks the forget loss's own pairing: ``activation`` (keep the hidden states)
    for RMU, ``nll`` (GD) otherwise; RMU goes only with ``activation`` and ``activation`` only
    with RMU. ``rmu_layer`` (default: a quarter of the way up the decoder, as layer 7 of 32 in
    the reference) and ``rmu_steering`` (the control vector's norm) configure RMU, see
    `gradsynth.unlearning.rmu`.
    """

    forget: str = "ga"
    retain: str | None = None
    beta: float = 0.1
    delta: float = 0.0
    rmu_layer: int | None = None
    rmu_steering: float = 20.0

    def __post_init__(self) -> None:
        if self.forget not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget!r}; choose one of {', '.join(FORGET_LOSSES)}")
        if self.retain is None:  # frozen: resolve the default pairing in place
            object.__setattr__(self, "retain", "activation" if self.forget == "rmu" else "nll")
        if self.retain not in RETAIN_LOSSES:
            raise ValueError(f"unknown retain loss {self.retain!r}; choose one of {', '.join(RETAIN_LOSSES)}")
        if (self.forget == "rmu") != (self.retain == "activation"):
            raise ValueError(
                f"the {self.retain!r} retain loss does not go with the {self.forget!r} forget loss: RMU's "
                "retain loss is 'activation' (keep the hidden states), and 'activation' needs RMU"
            )
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        if not 0 < self.rmu_steering < float("inf"):
            raise ValueError(f"rmu_steering must be a finite number > 0; got {self.rmu_steering}")

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference *model* is needed: for the KL retain loss of a model without
        adapters. (NPO compares with the model from before unlearning too, but only through the
        forget examples' log-likelihoods, which the loop computes once before the first step.)"""
        return self.retain == "kl"


def _refuse_rmu(settings: LossSettings) -> None:
    if settings.forget == "rmu":
        raise ValueError(
            "RMU's losses need its state (the tapped layer, the control vector, the original weights): "
            "use gradsynth.unlearning.rmu.RMU, or unlearn(), which builds it"
        )


def batch_logits(model: Any, batch: dict[str, Tensor], share_prefix: bool = False) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of the batch, cut alike from the left when ``share_prefix``: the rows'
    common start (a chat template's system turn) runs once and only positions from the first that
    predicts an answer token get logits (`gradsynth.unlearning.shared_prefix.answer_logits`)."""
    labels = batch["labels"]
    if share_prefix:
        logits, offset = answer_logits(
            model, batch["input_ids"], batch["attention_mask"], first_labelled(labels) - 1
        )
        return logits, labels[:, offset:]
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels


def forget_loss(
    model: Any,
    batch: dict[str, Tensor],
    settings: LossSettings,
    reference: Any = None,
    ref_logprob: Tensor | None = None,
    share_prefix: bool = False,
) -> Tensor:
    """The forget loss of ``model`` on ``batch`` (GA, NPO or SimNPO; RMU has state: see the loop).

    NPO only: ``ref_logprob`` holds ``log pi_ref(y|x)`` of the batch's examples (looked up in a
    `gradsynth.unlearning.reference.ReferenceLogprobs`); without it, ``reference`` (the frozen
    model) computes them.

    ``share_prefix``: pack the rows behind one copy of their common start (a chat template's
    turns), still one forward (`gradsynth.unlearning.shared_prefix.answer_logits`): the same loss
    and gradient up to rounding, far fewer tokens. A wrapper without the model's config (DDP, a
    DeepSpeed engine) runs the plain forward.
    """
    _refuse_rmu(settings)
    logits, labels = batch_logits(model, batch, share_prefix)
    if settings.forget == "ga":
        return ga_loss(logits, labels)
    logprob, length = sequence_logprob(logits, labels)
    if settings.forget == "simnpo":
        return simnpo_loss(logprob, length, settings.beta, settings.delta)
    if ref_logprob is None:
        with torch.no_grad():
            ref_logprob, _ = sequence_logprob(*batch_logits(reference, batch, share_prefix))
    return npo_loss(logprob, ref_logprob, settings.beta)


def retain_loss(
    model: Any,
    batch: dict[str, Tensor],
    settings: LossSettings,
    reference: Any = None,
    share_prefix: bool = False,
) -> Tensor:
    """The retain loss of ``model`` on ``batch``; ``reference`` is the frozen model (KL only);
    ``share_prefix`` as in `forget_loss`."""
    _refuse_rmu(settings)
    logits, labels = batch_logits(model, batch, share_prefix)
    if settings.retain == "nll":
        return nll_loss(logits, labels)
    with torch.no_grad():
        ref_logits, ref_labels = batch_logits(reference, batch, share_prefix)
    cut = labels.shape[1] - ref_labels.shape[1]  # the two models may cut at different offsets
    if cut > 0:
        logits, labels = logits[:, cut:], labels[:, cut:]
    else:
        ref_logits = ref_logits[:, -cut:]
    return kl_loss(logits, ref_logits, labels)
