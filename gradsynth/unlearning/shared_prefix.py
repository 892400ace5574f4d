"""The tokens every sequence of a batch starts with, run through the model once instead of per row.

An instruction-tuned model's chat template puts every question after the same turns: SmolLM2's
default system turn and ``<|im_start|>user`` are 29 of a short question's 37 tokens. In a causal
model those tokens' keys and values do not depend on what follows them, so under ``no_grad`` they
are computed once, for one row, and repeated for the batch (`SharedPrefix.cache_for`); each row's
own tokens then start at position ``length``::

    positions(row) = length + cumsum(own mask) - 1

whatever padding stands between the prefix and them (masked out of attention). The result is the
plain forward's up to float rounding (the sums are grouped differently). A prefix shorter than
`MIN_SHARED` tokens is not worth it (the embedded world's plain prompts share almost nothing),
and callers then run the plain forward, unchanged.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MIN_SHARED = 8


@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: Any) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (before; a PEFT model answers for the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword(type(base))


def cache_of(output: Any) -> Any:
    """The key/value cache a forward returned, under either name."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def shared_length(rows: list[list[int]], keep: int = 1) -> int:
    """The length of the token prefix all ``rows`` share, leaving at least ``keep`` tokens of each
    row after it (a row's own part must predict its first token from something it runs)."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - keep
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return max(n, 0)


@dataclass
class SharedPrefix:
    """The model's keys/values and last-position logits for ``ids``, one row."""

    ids: list[int]
    cache: Any
    last_logits: Tensor  # (vocabulary,): the prediction of the token after the prefix

    @property
    def length(self) -> int:
        return len(self.ids)

    def cache_for(self, rows: int) -> Any:
        """A copy of the prefix's cache repeated for ``rows`` rows (the model extends it in place)."""
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def positions(self, own_mask: Tensor) -> Tensor:
        """Position ids of the rows' own tokens after the prefix (padding gets any valid position)."""
        return (self.length + own_mask.long().cumsum(-1) - 1).clamp(min=self.length)

    def attention(self, own_mask: Tensor) -> Tensor:
        """The attention mask over prefix + own tokens."""
        ones = torch.ones(own_mask.shape[0], self.length, dtype=own_mask.dtype, device=own_mask.device)
        return torch.cat([ones, own_mask], dim=1)


@torch.no_grad()
def shared_prefix(model: Any, rows: list[list[int]], keep: int = 1) -> SharedPrefix | None:
    """The `SharedPrefix` of ``rows`` (at least ``keep`` own tokens left per row), or None when they
    share fewer than `MIN_SHARED` tokens."""
    length = shared_length(rows, keep)
    if length < MIN_SHARED:
        return None
    ids = rows[0][:length]
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return SharedPrefix(ids, cache_of(out), out.logits[0, -1].float())


@torch.no_grad()
def logits_from(
    model: Any, input_ids: Tensor, attention_mask: Tensor, first_needed: int
) -> tuple[Tensor, int]:
    """``(logits, offset)``: the logits of a right-padded batch at positions ``offset`` to the end
    (``logits[:, k]`` is position ``offset + k``), ``offset <= first_needed``.

    When the rows share a prefix of `MIN_SHARED` tokens or more that ends after ``first_needed``'s
    position is not passed, the prefix runs once (`shared_prefix`) and ``offset`` is its last
    position; otherwise this is the plain forward with ``offset`` 0."""
    lengths = attention_mask.sum(dim=1).tolist()
    width = min(int(min(lengths)), first_needed + 1, input_ids.shape[1] - 1)
    rows = [row[:width] for row in input_ids[:, :width].tolist()]
    prefix = shared_prefix(model, rows, keep=0) if width > 0 else None
    if prefix is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, 0
    start = prefix.length
    own_mask = attention_mask[:, start:]
    out = model(
        input_ids=input_ids[:, start:],
        attention_mask=prefix.attention(own_mask),
        position_ids=prefix.positions(own_mask),
        use_cache=True,
        **{cache_keyword(model): prefix.cache_for(input_ids.shape[0])},
    )
    first = prefix.last_logits.to(out.logits.dtype).expand(input_ids.shape[0], 1, -1)
    return torch.cat([first, out.logits], dim=1), start - 1
