r"""Unlearning objectives on causal-LM batches (labels ``-100`` are ignored).

Per sequence, with answer tokens ``y`` (the positions whose label is not ``-100``, after the
usual one-token shift) and the model's log-probabilities ``log p(y_t | ...)``::

    log pi(y|x)  = sum_t log p(y_t)                 (summed answer log-likelihood)
    NLL_sum      = -log pi(y|x),   |y| = number of answer tokens

Forget losses (to minimise; each pushes the forget answers' likelihood down):

    GA      L_f = -NLL,  NLL = mean answer-token cross-entropy over the batch
    NPO     L_f = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))
    SimNPO  L_f = -(2/beta) * mean_i log sigmoid( beta * (NLL_sum_i / |y_i| - delta))
    IdkDPO  L_f = -(2/beta) * mean_i log sigmoid( beta * (r(w_i) - r(y_i))),
            r(a) = log pi_theta(a|x_i) - log pi_ref(a|x_i),  w_i an "I don't know" answer (DPO
            with the refusal preferred over the forget answer)
    UNDIAL  L_f = mean over answer tokens t of  -sum_v q_t(v) log p_theta(v),
            q_t = softmax(z_ref,t - strength * onehot(y_t))  (self-distillation on the frozen
            model's logits z_ref with the answer token's logit lowered by ``strength``)

Retain losses (to minimise):

    NLL     L_r = NLL (mean answer-token cross-entropy; "GD")
    KL      L_r = mean over answer tokens of KL(p_ref || p_theta),
            KL = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))

These are the formulas of the open-unlearning framework as restated in the paper (arXiv
2604.14808). NPO needs a frozen reference model; SimNPO does not.

The fourth forget objective, RMU, works on hidden states rather than on these log-likelihoods
and brings its own retain loss (``activation``: keep the hidden states of the model before
unlearning); its formulas are in `gradsynth.unlearning.rmu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradsynth.unlearning.encoding import IGNORE_INDEX

FORGET_LOSSES = ("ga", "npo", "simnpo", "rmu")
#: Forget losses offered to `SynthesizingTrainer` only (they need data or state the CLI's loop
#: does not build: refusal answers, per-batch reference logits).
TRAINER_FORGET_LOSSES = ("idkdpo", "undial")
RETAIN_LOSSES = ("nll", "kl", "activation")


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Logits at positions that predict a label, the labels, and the mask of labelled positions."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each next-token label (0 where masked) and the mask, both ``[B, T-1]``."""
    logits, targets, mask = _shift(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logprob(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed answer log-likelihood ``log pi(y|x)`` per sequence and the answer length ``|y|``."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(dim=-1), mask.sum(dim=-1)


def nll_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean answer-token cross-entropy over the batch (what the Hugging Face models return)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp_min(1)


def ga_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Gradient ascent: ``-NLL``."""
    return -nll_loss(logits, labels)


def npo_loss(logprob: Tensor, ref_logprob: Tensor, beta: float) -> Tensor:
    """NPO from summed answer log-likelihoods of the model and of the frozen reference model."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob)).mean()


def simnpo_loss(logprob: Tensor, length: Tensor, beta: float, delta: float) -> Tensor:
    """SimNPO from summed answer log-likelihoods and answer lengths (no reference model)."""
    mean_nll = -logprob / length.clamp_min(1)
    return -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta)).mean()


def kl_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over answer tokens of ``KL(p_ref || p_theta)`` over the vocabulary."""
    logits, _, mask = _shift(logits, labels)
    ref_logits = ref_logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def idkdpo_loss(
    logprob_idk: Tensor, ref_logprob_idk: Tensor, logprob: Tensor, ref_logprob: Tensor, beta: float
) -> Tensor:
    """IdkDPO (DPO preferring a refusal) from summed answer log-likelihoods of the model and the
    frozen reference, for the refusal answers (``*_idk``) and the forget answers."""
    margin = (logprob_idk - ref_logprob_idk) - (logprob - ref_logprob)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def undial_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor, strength: float) -> Tensor:
    """UNDIAL: cross-entropy to the frozen model's distribution with the answer token's logit
    lowered by ``strength``, averaged over answer tokens."""
    logits, targets, mask = _shift(logits, labels)
    ref = ref_logits[:, :-1, :].float()
    adjusted = ref - strength * F.one_hot(targets, ref.shape[-1]).to(ref.dtype)
    target = torch.softmax(adjusted, dim=-1)
    per_token = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
