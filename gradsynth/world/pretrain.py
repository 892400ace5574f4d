"""Teaching the world model: AdamW, linear warmup and cosine decay, a fixed number of steps.

Every pretraining item (people facts, reading passages, additions) is trained with the
full-text loss of `gradsynth.unlearning.encoding` (every token labelled, the end-of-sentence token
included, so greedy decoding stops after the answer). A language-model loss on the whole text is
what a pretrained model has seen, and what the full-text unlearning loss continues.

The run is ``size.pretrain_steps`` steps on every machine: no stop "once recall is 100%", which
made the step count depend on rounding (225 steps on one machine, 325 on another). The batch
order comes from ``random.Random(seed)``; the weights from ``torch.manual_seed(seed)``. A
constant learning rate was measured to plateau below 100% recall, hence the schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch

from gradsynth.unlearning.encoding import Example, collate, encode, pad_id_of, prompt_of, with_loss_scope
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.objectives import nll_loss
from gradsynth.world.sizes import WorldSize
from gradsynth.world.splits import Splits

CHECK_EVERY = 100
MAX_LENGTH = 64


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def recall_of(model: Any, tokenizer: Any, examples: list) -> float:
    """Greedy exact-match recall of the answers (answer-only labels, whatever the training scope)."""
    encoded = [encode(tokenizer, e, MAX_LENGTH) for e in with_loss_scope(examples, "answer")]
    pad = pad_id_of(tokenizer)
    batches = [collate(encoded[i : i + 256], pad) for i in range(0, len(encoded), 256)]
    return split_metrics(model, batches)["recall"]


def recall_counts(model: Any, tokenizer: Any, splits: Splits) -> dict[str, tuple[int, int]]:
    """The model's fingerprint: per split, (facts recalled greedily, facts). Counts survive a change
    of float rounding (another processor kind) where a weight hash would not."""
    counts = {}
    for name, facts in splits.by_name().items():
        recall = recall_of(model, tokenizer, [Example(prompt_of(f.question), f.answer) for f in facts])
        counts[name] = (round(recall * len(facts)), len(facts))
    return counts


def pretrain(
    model: Any,
    tokenizer: Any,
    examples: list,
    size: WorldSize,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``examples`` (full-text loss); returns the final recall and step count."""
    encoded = [encode(tokenizer, example, MAX_LENGTH) for example in with_loss_scope(examples, "full")]
    pad = pad_id_of(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, size.warmup_steps, size.pretrain_steps)
    )
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for step in range(1, size.pretrain_steps + 1):
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
        if progress is not None and step % CHECK_EVERY == 0 and step < size.pretrain_steps:
            progress(step, recall_of(model, tokenizer, examples))
    model.eval()
    return {"recall": recall_of(model, tokenizer, examples), "steps": size.pretrain_steps}
