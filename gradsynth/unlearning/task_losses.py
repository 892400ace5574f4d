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
    """Which forget and retain loss, and their hyper-parameters (``beta``, ``delta``)."""

    forget: str = "ga"
    retain: str = "nll"
    beta: float = 0.1
    delta: float = 0.0

    def __post_init__(self) -> None:
        if self.forget not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget!r}; choose one of {', '.join(FORGET_LOSSES)}")
        if self.retain not in RETAIN_LOSSES:
            raise ValueError(f"unknown retain loss {self.retain!r}; choose one of {', '.join(RETAIN_LOSSES)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")

    @property
    def needs_reference(self) -> bool:
        """Whether a frozen reference *model* is needed: for the KL retain loss of a model without
        adapters. (NPO compares with the model from before unlearning too, but only through the
        forget examples' log-likelihoods, which the loop computes once before the first step.)"""
        return self.retain == "kl"


def _logits(model: Any, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def forget_loss(
    model: Any,
    batch: dict[str, Tensor],
    settings: LossSettings,
    reference: Any = None,
    ref_logprob: Tensor | None = None,
) -> Tensor:
    """The forget loss of ``model`` on ``batch``.

    NPO only: ``ref_logprob`` holds ``log pi_ref(y|x)`` of the batch's examples (looked up in a
    `gradsynth.unlearning.reference.ReferenceLogprobs`); without it, ``reference`` (the frozen
    model) computes them.
    """
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
    logits = _logits(model, batch)
    if settings.retain == "nll":
        return nll_loss(logits, batch["labels"])
    with torch.no_grad():
        ref_logits = _logits(reference, batch)
    return kl_loss(logits, ref_logits, batch["labels"])
