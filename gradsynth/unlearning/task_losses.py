"""The forget and retain losses of a model on a batch, by name (see `objectives` for the formulas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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


def _logits(model: Any, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def forget_loss(
    model: Any,
    batch: dict[str, Tensor],
    settings: LossSettings,
    reference: Any = None,
    ref_logprob: Tensor | None = None,
) -> Tensor:
    """The forget loss of ``model`` on ``batch`` (GA, NPO or SimNPO; RMU has state: see the loop).

    NPO only: ``ref_logprob`` holds ``log pi_ref(y|x)`` of the batch's examples (looked up in a
    `gradsynth.unlearning.reference.ReferenceLogprobs`); without it, ``reference`` (the frozen
    model) computes them.
    """
    _refuse_rmu(settings)
    logits = _logits(model, batch)
    if settings.forget == "ga":
        return ga_loss(logits, batch["labels"])
    logprob, length = sequence_logprob(logits, batch["labels"])
    if settings.forget == "simnpo":
        return simnpo_loss(logprob, length, settings.beta, settings.delta)
    if ref_logprob is None:
        with torch.no_grad():
            ref_logprob, _ = sequence_logprob(_logits(reference, batch), batch["labels"])
    return npo_loss(logprob, ref_logprob, settings.beta)


def retain_loss(
    model: Any, batch: dict[str, Tensor], settings: LossSettings, reference: Any = None
) -> Tensor:
    """The retain loss of ``model`` on ``batch``; ``reference`` is the frozen model (KL only)."""
    _refuse_rmu(settings)
    logits = _logits(model, batch)
    if settings.retain == "nll":
        return nll_loss(logits, batch["labels"])
    with torch.no_grad():
        ref_logits = _logits(reference, batch)
    return kl_loss(logits, ref_logits, batch["labels"])
