"""Batches that carry both tasks: ``{"forget": forget_batch, "retain": retain_batch}``.

This is the shape the open-unlearning framework feeds its trainers: each example pairs one
forget example with one retain example, and a collator batches each side on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

FORGET_KEY = "forget"
RETAIN_KEY = "retain"

#: Label value the causal-LM losses ignore; padded label positions get it.
IGNORE_INDEX = -100


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
            "gradsynth.integrations.task_batches.TaskPairCollator"
        )
    return batch[FORGET_KEY], batch[RETAIN_KEY]


#: Prefixes of the token sequences a side may carry: the example itself, and the refusal answer of
#: IdkDPO (``idk_input_ids``, ``idk_labels``, ``idk_attention_mask``).
SEQUENCE_PREFIXES = ("", "idk_")


def pad_and_collate(examples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Batch one side's examples, right-padding ragged token lists.

    Examples of equal lengths go to ``transformers.default_data_collator`` as they are. Ragged
    ones are right-padded to the longest: ``input_ids`` with ``pad_token_id``, ``labels`` with
    -100 (ignored by the loss), ``attention_mask`` with 0 (and one is added, 1 on the real
    tokens, when the examples carry none). A second sequence under the ``idk_`` prefix
    (``idk_input_ids``, ...; IdkDPO's refusal answers) is padded the same way to its own longest.
    Other keys of a sequence's length are refused, since there is no padding value to guess for them.
    """
    from transformers import default_data_collator

    prefixes = [p for p in SEQUENCE_PREFIXES if any(f"{p}input_ids" in e for e in examples)]
    longest = {p: {len(e[f"{p}input_ids"]) for e in examples if f"{p}input_ids" in e} for p in prefixes}
    if all(len(lengths) <= 1 for lengths in longest.values()):
        return default_data_collator(list(examples))
    padded = []
    for example in examples:
        row = dict(example)
        for prefix in prefixes:
            _pad_sequence(row, prefix, max(longest[prefix]), pad_token_id)
        padded.append(row)
    return default_data_collator(padded)


def _pad_sequence(row: dict[str, Any], prefix: str, longest: int, pad_token_id: int) -> None:
    if f"{prefix}input_ids" not in row:
        return
    n = len(row[f"{prefix}input_ids"])
    row.setdefault(f"{prefix}attention_mask", [1] * n)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    own = {f"{prefix}{name}" for name in pad_values}
    others = {f"{p}{name}" for p in SEQUENCE_PREFIXES for name in pad_values} - own
    for key, value in list(row.items()):
        if key in own:
            tokens = torch.as_tensor(value)
            row[key] = torch.cat([tokens, tokens.new_full((longest - n,), pad_values[key[len(prefix) :]])])
        elif (
            prefix == ""
            and key not in others
            and isinstance(value, (torch.Tensor, Sequence))
            and not isinstance(value, str)
            and len(value) == n
        ):
            raise ValueError(
                f"cannot pad the per-token entry {key!r} of ragged examples (no padding value is known "
                "for it); "
                "drop it, or pass TaskPairCollator(collate=...) with a collator that pads it"
            )


class TaskPairCollator:
    """Collates a list of ``{"forget": ex, "retain": ex}`` examples side by side.

    A list of examples that are not paired (an ordinary evaluation set) is collated as one
    batch with the same side collator, so that ``Trainer.evaluate`` can run on it; a list that
    mixes paired and unpaired examples is refused.

    Args:
        collate: the collator for one side (a list of examples -> a batch). Default:
            `pad_and_collate`, which right-pads ragged causal-LM examples (``labels`` with
            -100). A tokenizer's collator that pads ``labels`` works too, e.g.
            ``DataCollatorForSeq2Seq(tokenizer)``; ``DataCollatorWithPadding`` does not pad
            ``labels`` and fails on ragged ones.
        pad_token_id: the padding id of ``input_ids`` for the default collator (the model's
            ``pad_token_id``; with right padding and ``attention_mask`` its value does not
            change the loss).
    """

    def __init__(
        self, collate: Callable[[Sequence[Any]], Any] | None = None, *, pad_token_id: int = 0
    ) -> None:
        if collate is None:

            def collate(examples: Sequence[Any]) -> Any:
                return pad_and_collate(examples, pad_token_id)

            collate.__name__ = "pad_and_collate"
        self.collate = collate

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        paired = [is_task_pair(example) for example in examples]
        if not any(paired):
            return self.collate(list(examples))
        pairs = [split_task_pair(example) for example in examples]
        return {
            FORGET_KEY: self.collate([forget for forget, _ in pairs]),
            RETAIN_KEY: self.collate([retain for _, retain in pairs]),
        }

    def __repr__(self) -> str:
        return f"TaskPairCollator({getattr(self.collate, '__name__', type(self.collate).__name__)})"
