"""Per-split metrics: answer NLL and greedy exact-match recall.

``nll`` is the mean answer-token cross-entropy. ``recall`` is the fraction of examples whose
answer (and end-of-sentence token) the model reproduces greedily. It is computed with one
teacher-forced pass: greedy decoding emits the answer exactly iff the arg-max at every answer
position is the answer token, so no generation loop is needed. ``recall`` is ``None`` for
plain-text data, which has no answers. Tokens every row of a batch starts with (a chat template's
system turn) run once (`gradsynth.unlearning.task_losses.batch_logits`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsynth.unlearning.encoding import IGNORE_INDEX
from gradsynth.unlearning.objectives import token_logprobs
from gradsynth.unlearning.task_losses import batch_logits


def exact_match(logits: Tensor, labels: Tensor) -> Tensor:
    """Per sequence: ``True`` iff the arg-max is the label at every labelled position."""
    predicted = logits[:, :-1, :].argmax(dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return ((predicted == targets) | ~mask).all(dim=-1) & mask.any(dim=-1)


@torch.no_grad()
def split_metrics(model: Any, batches: list[dict[str, Tensor]], has_answers: bool = True) -> dict[str, Any]:
    """``{"nll": ..., "recall": ...}`` of ``model`` over the batches of one split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens, hits, count = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, labels = batch_logits(model, batch, share_prefix=True)
        logp, mask = token_logprobs(logits, labels)
        nll_sum -= float(logp.sum())
        tokens += int(mask.sum())
        hits += int(exact_match(logits, labels).sum())
        count += batch["labels"].shape[0]
    model.train(was_training)
    return {
        "nll": nll_sum / max(tokens, 1),
        "recall": hits / max(count, 1) if has_answers else None,
    }


def evaluate_splits(
    model: Any, splits: dict[str, list[dict[str, Tensor]]], has_answers: bool = True
) -> dict[str, dict[str, Any]]:
    """Metrics of every split, by split name."""
    return {name: split_metrics(model, batches, has_answers) for name, batches in splits.items()}
