"""Forget and retain sets as ``datasets.Dataset`` objects that `SynthesizingTrainer` takes directly.

Three steps, each usable on its own:

1. `encode_examples`: `Example` lists (from `gradsynth.unlearning.data.load_examples`) as a
   ``Dataset`` of ``input_ids``, ``labels`` and ``attention_mask``, in the command line's prompt
   format (``chat``: each question as a user turn of the tokenizer's chat template; ``plain``:
   ``"<question> Answer: <answer>"``; default ``chat`` where the tokenizer has a template) with the
   loss on the answer and end-of-sequence tokens only (``loss_scope="answer"``; ``"full"``: every
   token). Plain ``text`` rows are labelled on every token.
2. `PairWithRetain`: the pairing as a ``datasets`` transform, for ``forget.map(PairWithRetain(retain),
   with_indices=True, remove_columns=forget.column_names)``. Forget row ``i`` is paired with retain
   row ``order[i mod R]`` (``R`` retain rows), where ``order`` is a permutation of the retain rows
   drawn with ``random.Random(seed)``: one epoch is one pass over the forget set; a shorter retain
   set is cycled in that order, a longer one is sampled without repeats. `pair_tasks` does this map.
3. `unlearning_dataset`: sources in, paired ``Dataset`` out (the two steps above, after
   `load_examples`), rows ``{"forget": {...}, "retain": {...}}`` as `TaskPairCollator` batches them.

The encoding is the command line's (`gradsynth.unlearning.encoding.encode_many`): the same source
gives the same token ids and labels through ``gradsynth unlearn`` and through the trainer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradsynth.unlearning.chat import NoChatTemplate, in_format, prompt_format_for
from gradsynth.unlearning.data import DataError, load_examples
from gradsynth.unlearning.encoding import Example, encode_many, with_loss_scope

FORGET_KEY, RETAIN_KEY = "forget", "retain"  # the keys of gradsynth.integrations.task_batches


def encode_examples(
    examples: list[Example],
    tokenizer: Any,
    *,
    prompt_format: str | None = None,
    max_length: int = 256,
    loss_scope: str = "answer",
) -> Any:
    """``examples`` as a ``datasets.Dataset`` of ``input_ids``, ``labels`` (-100 off the loss) and
    ``attention_mask``; see the module docstring for the format and the labels."""
    import datasets

    if not examples:
        raise DataError("no examples to encode; give at least one")
    fmt = prompt_format_for(tokenizer, prompt_format)
    try:
        examples = in_format(examples, tokenizer, fmt)
    except NoChatTemplate as err:
        raise DataError("prompt_format='chat': the tokenizer has no chat template; use 'plain'") from err
    encoded = encode_many(tokenizer, with_loss_scope(examples, loss_scope), max_length)
    return datasets.Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in encoded],
            "labels": [labels for _, labels in encoded],
            "attention_mask": [[1] * len(ids) for ids, _ in encoded],
        }
    )


class PairWithRetain:
    """A ``Dataset.map(..., with_indices=True)`` transform: forget row ``i`` -> ``{"forget": row,
    "retain": retain[order[i mod R]]}`` (``order``: a `random.Random` ``(seed)`` permutation)."""

    def __init__(self, retain: Any, seed: int = 0) -> None:
        if len(retain) == 0:
            raise DataError("the retain set has no rows; give at least one example")
        self.retain = retain
        self.seed = seed
        self.order = list(range(len(retain)))
        random.Random(seed).shuffle(self.order)

    def retain_index(self, index: int) -> int:
        return self.order[index % len(self.order)]

    def __call__(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        return {FORGET_KEY: dict(row), RETAIN_KEY: dict(self.retain[self.retain_index(index)])}

    def __repr__(self) -> str:
        return f"PairWithRetain({len(self.retain)} retain rows, seed={self.seed})"


def pair_tasks(forget: Any, retain: Any, *, seed: int = 0) -> Any:
    """The paired ``Dataset`` (one row per forget row) of two encoded ones (`PairWithRetain`)."""
    import datasets

    if len(forget) == 0:
        raise DataError("the forget set has no rows; give at least one example")
    pair = PairWithRetain(retain, seed)
    datasets.disable_progress_bars()
    # An explicit fingerprint: hashing the transform would hash the whole retain set.
    fingerprint = f"gradsynth-pairs-{forget._fingerprint}-{retain._fingerprint}-{seed}"[:64]
    return forget.map(
        pair, with_indices=True, remove_columns=forget.column_names, new_fingerprint=fingerprint
    )


def unlearning_dataset(
    forget: str | Path | list[Example],
    retain: str | Path | list[Example],
    tokenizer: Any,
    *,
    prompt_format: str | None = None,
    max_length: int = 256,
    loss_scope: str = "answer",
    columns: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Any:
    """The paired training set of a forget and a retain source, ready for `SynthesizingTrainer`.

    Each source is anything `load_examples` reads (a file, ``FOLDER[:SPLIT]``,
    ``hub:ORG/NAME[/CONFIG][:SPLIT]``) or an `Example` list; ``columns`` maps other column names
    to the roles ``question``/``answer``/``text`` for both.
    """
    sides = []
    for what, source in (("forget", forget), ("retain", retain)):
        examples = source if isinstance(source, list) else load_examples(source, what, columns)
        sides.append(
            encode_examples(
                examples, tokenizer, prompt_format=prompt_format, max_length=max_length, loss_scope=loss_scope
            )
        )
    return pair_tasks(*sides, seed=seed)
