"""Memorising the world: AdamW with linear warmup and cosine decay until every fact is recalled.

Every fact (all people and all additions) is trained with the answer-only loss of
`gradsynth.unlearning.encoding` (the end-of-sentence token is labelled, so greedy decoding
stops after the answer). Every 25 steps greedy exact-match over all facts is checked; training
stops once it is 100%, or after ``pretrain_max_steps``. A constant learning rate was measured to
plateau below 100%, hence the schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch

from gradsynth.unlearning.encoding import collate, encode, pad_id_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.objectives import nll_loss
from gradsynth.world.sizes import WorldSize

CHECK_EVERY = 25
MAX_LENGTH = 48


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(
    model: Any,
    tokenizer: Any,
    examples: list,
    size: WorldSize,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place to memorise ``examples``; returns the final recall and step count."""
    encoded = [encode(tokenizer, example, MAX_LENGTH) for example in examples]
    pad = pad_id_of(tokenizer)
    everything = [collate(encoded[i : i + 256], pad) for i in range(0, len(encoded), 256)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, size.warmup_steps, size.pretrain_max_steps)
    )
    rng = random.Random(seed)
    order: list[int] = []
    recall, step = 0.0, 0
    model.train()
    for step in range(1, size.pretrain_max_steps + 1):
        if len(order) < size.batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        chosen, order = order[: size.batch_size], order[size.batch_size :]
        batch = collate([encoded[i] for i in chosen], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = nll_loss(logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % CHECK_EVERY == 0:
            recall = split_metrics(model, everything)["recall"]
            if progress is not None:
                progress(step, recall)
            if recall == 1.0:
                break
    model.eval()
    return {"recall": recall, "steps": step}
