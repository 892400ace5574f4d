"""Turning examples into Hugging Face causal-LM batches with label masks.

A question/answer example becomes ``prompt = question + " Answer:"`` followed by
``" " + answer + eos`` (the separator is ``""`` in a chat format, `gradsynth.unlearning.chat`);
only the answer tokens and the end-of-sentence token carry labels (the rest is ``-100``), so a
model trained on it learns to stop after the answer. A plain ``text`` example is labelled on
every token. Batches are right-padded; padding is ``-100``.

The *loss scope* of a question/answer example says which tokens carry the loss:

- ``"answer"``: the answer and end-of-sentence tokens only (the TOFU / open-unlearning setting);
- ``"full"``: every token, question included, the same token ids as ``"answer"``: a
  language-model loss on the whole text. On the embedded world the answer-only forget gradient
  was measured 10 to 10^4 times the retain gradient's norm during gradient ascent, the full-text
  one 2 to 8 times, with the paper's ordering of cos(g, r) (sum < PCGrad < SAGO).

Only a window of each text is tokenized (`token_ids`): ``limit * CHARS_PER_TOKEN`` characters at
the end that is kept, widened until it yields `MARGIN` tokens more than are kept. A 30 MB line
tokenized whole aborted the process inside the tokenizer; the window gives the same kept tokens
as the whole text whenever the word cut at its edge lies past them (the margin sees to that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100
LOSS_SCOPES = ("answer", "full")
CHARS_PER_TOKEN = 32  # generous: byte-level BPE tokens of prose average 3-5 characters
MARGIN = 8  # tokens past the kept ones, so that the word cut at the window's edge is not kept


@dataclass(frozen=True)
class Example:
    """One example: a question with its answer, or a plain text (``answer`` is ``None``)."""

    prompt: str
    answer: str | None = None
    full_text: bool = False  # label the prompt's tokens too (loss scope "full")
    separator: str = " "  # between prompt and answer ("" after a chat template's assistant turn)


ANSWER_CUE = " Answer:"


def prompt_of(question: str) -> str:
    return f"{question}{ANSWER_CUE}"


def question_of(prompt: str) -> str:
    """The question of a `prompt_of` prompt (its inverse); any other prompt as it is."""
    return prompt[: -len(ANSWER_CUE)] if prompt.endswith(ANSWER_CUE) else prompt


def with_loss_scope(examples: list[Example], scope: str) -> list[Example]:
    """``examples`` with the loss on the answer only (``"answer"``) or on every token (``"full"``)."""
    if scope not in LOSS_SCOPES:
        raise ValueError(f"unknown loss scope {scope!r}; choose one of {', '.join(LOSS_SCOPES)}")
    return [replace(e, full_text=scope == "full") for e in examples]


def token_ids(
    tokenizer: Any, text: str, limit: int, from_end: bool = False, special: bool = True
) -> list[int]:
    """Token ids of ``text``, of which at least the first (``from_end``: the last) ``limit`` are those
    of the whole text; only a window of characters is tokenized (see the module docstring)."""
    window = max(limit, 1) * CHARS_PER_TOKEN
    while True:
        piece = text if len(text) <= window else (text[-window:] if from_end else text[:window])
        ids = tokenizer(piece, add_special_tokens=special)["input_ids"]
        if len(piece) == len(text) or len(ids) >= limit + MARGIN:
            return ids
        window *= 4


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, cut to ``max_length`` tokens (the answer kept if it fits)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.answer is None:
        ids = token_ids(tokenizer, example.prompt, max_length) + eos
        ids = ids[:max_length]
        return ids, list(ids)
    prompt = token_ids(tokenizer, example.prompt, max_length, from_end=True)
    answer = token_ids(tokenizer, example.separator + example.answer, max_length, special=False) + eos
    answer = answer[:max_length]
    prompt = prompt[-(max_length - len(answer)) :] if max_length > len(answer) else []
    ids = prompt + answer
    return ids, list(ids) if example.full_text else [IGNORE_INDEX] * len(prompt) + answer


Encoded = tuple[list[int], list[int]]


def encode_many(
    tokenizer: Any,
    examples: list[Example],
    max_length: int,
    memo: dict[tuple[str, str | None], Encoded] | None = None,
    each: Any = None,
) -> list[Encoded]:
    """`encode` of every example, each distinct (prompt, answer) tokenized once: ``memo`` carries
    the answer-scope encodings between calls (an evaluation split and the training set of one
    file, every cell of a comparison), and a ``"full"``-scope example labels those same ids.
    ``each`` is called after every example (a progress bar's ``update``)."""
    memo = {} if memo is None else memo
    encoded = []
    for example in examples:
        key = (example.prompt, example.answer)
        if key not in memo:
            memo[key] = encode(tokenizer, replace(example, full_text=False), max_length)
        ids, labels = memo[key]
        encoded.append((ids, list(ids)) if example.full_text else (ids, labels))
        if each is not None:
            each()
    return encoded


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def first_labelled(labels: Tensor) -> int:
    """The first position that holds a label in any row (the width if none does)."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    return int(labelled[0]) if labelled.numel() else labels.shape[1]


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: the tokenizer's own, else its end-of-sentence id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def make_batches(
    tokenizer: Any, examples: list[Example], batch_size: int, max_length: int
) -> list[dict[str, Tensor]]:
    """Encode and collate examples in order, ``batch_size`` at a time."""
    encoded = [encode(tokenizer, example, max_length) for example in examples]
    pad = pad_id_of(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
