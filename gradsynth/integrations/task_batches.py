"""Batches that carry both tasks: ``{"forget": forget_batch, "retain": retain_batch}``.

This is the shape the open-unlearning framework feeds its trainers: each example pairs one
forget example with one retain example, and a collator batches each side on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

FORGET_KEY = "forget"
RETAIN_KEY = "retain"


def is_task_pair(batch: Any) -> bool:
    """True for a mapping with both a ``"forget"`` and a ``"retain"`` entry."""
    return isinstance(batch, Mapping) and FORGET_KEY in batch and RETAIN_KEY in batch


def split_task_pair(batch: Any) -> tuple[Any, Any]:
    """``(forget_batch, retain_batch)`` of a paired batch; anything else is an error naming the fix."""
    if not is_task_pair(batch):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"an unlearning batch must be a mapping with 'forget' and 'retain' entries, got {keys}; "
            "build examples as {'forget': ..., 'retain': ...} and batch them with "
            "gradsynth.integrations.TaskPairCollator"
        )
    return batch[FORGET_KEY], batch[RETAIN_KEY]


class TaskPairCollator:
    """Collates a list of ``{"forget": ex, "retain": ex}`` examples side by side.

    Args:
        collate: the collator for one side (a list of examples -> a batch). Default:
            ``transformers.default_data_collator``; pass e.g. ``DataCollatorWithPadding(tokenizer)``
            for ragged token lists.
    """

    def __init__(self, collate: Callable[[Sequence[Any]], Any] | None = None) -> None:
        if collate is None:
            from transformers import default_data_collator

            collate = default_data_collator
        self.collate = collate

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pairs = [split_task_pair(example) for example in examples]
        return {
            FORGET_KEY: self.collate([forget for forget, _ in pairs]),
            RETAIN_KEY: self.collate([retain for _, retain in pairs]),
        }

    def __repr__(self) -> str:
        return f"TaskPairCollator({getattr(self.collate, '__name__', type(self.collate).__name__)})"
