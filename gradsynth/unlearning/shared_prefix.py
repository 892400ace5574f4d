"""The tokens every sequence of a batch starts with, run through the model once instead of per row.

An instruction-tuned model's chat template puts every question after the same turns: SmolLM2's
default system turn and ``<|im_start|>user`` are 29 of a short question's 37 tokens. In a causal
model those tokens' keys and values do not depend on what follows them. Two ways use that:

- **Decoding** (`SharedPrefix`, `shared_prefix`): the prefix's key/value cache is computed once,
  for one row, and repeated for the batch (`SharedPrefix.cache_for`); each row's own tokens then
  start at position ``length``, ``positions(row) = length + cumsum(own mask) - 1``, whatever
  padding stands between the prefix and them (masked out of attention).
- **Logits and losses** (`answer_logits`, differentiable; `logits_from` for scoring): the rows are
  *packed* into one sequence, ``prefix, own_1, own_2, ...`` without padding, with an attention
  mask that lets a token see the prefix and the earlier tokens of its own row, and positions that
  restart after the prefix in every row (`packed_logits`). One forward, so under autograd each
  weight is used once and its gradient is the plain forward's (the prefix's gradient is the sum
  over rows, as the plain forward's per-row prefix runs add up to it). Logits are computed only
  from the first position the caller needs (``logits_to_keep``): a loss over answer tokens pays
  the vocabulary projection for the answers alone.

Either way the result is the plain forward's up to float rounding (the sums are grouped
differently). A prefix shorter than `MIN_SHARED` tokens is not worth it (the embedded world's
plain prompts share almost nothing), and callers then run the plain forward, unchanged.
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
def _parameters_of(forward_owner: type) -> frozenset[str]:
    return frozenset(inspect.signature(forward_owner.forward).parameters)


def forward_takes(model: Any) -> frozenset[str]:
    """The names ``model``'s forward takes (a PEFT model answers for the model it wraps); looked up
    once per model class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _parameters_of(type(base))


def cache_keyword(model: Any) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (before)."""
    return "cache" if "cache" in forward_takes(model) else "past_key_values"


def logits_to_keep(model: Any, last: int) -> dict[str, int]:
    """The forward argument that computes logits for the ``last`` positions only, where ``model``
    takes one (``{}`` otherwise: it returns them all)."""
    return {"logits_to_keep": last} if "logits_to_keep" in forward_takes(model) else {}


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
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **logits_to_keep(model, 1))
    return SharedPrefix(ids, cache_of(out), out.logits[0, -1].float())


@torch.no_grad()
def logits_from(
    model: Any, input_ids: Tensor, attention_mask: Tensor, first_needed: int
) -> tuple[Tensor, int]:
    """`answer_logits` under ``no_grad`` (for scoring)."""
    return answer_logits(model, input_ids, attention_mask, first_needed)


def answer_logits(
    model: Any, input_ids: Tensor, attention_mask: Tensor, first_needed: int
) -> tuple[Tensor, int]:
    """``(logits, offset)``: the logits of a right-padded batch at positions ``offset`` to the end
    (``logits[:, k]`` is position ``offset + k``), ``offset <= first_needed``; differentiable when
    autograd is on.

    When the rows share a prefix of `MIN_SHARED` tokens or more (up to position ``first_needed`` at
    most) and the model takes a packed batch (`packs`), ``offset`` is ``first_needed`` and the rows
    run packed behind one copy of the prefix (`packed_logits`); otherwise this is the plain forward
    with ``offset`` 0. Logits at padding positions are unspecified."""
    total = input_ids.shape[1]
    lengths = attention_mask.sum(dim=1)
    width = min(int(lengths.min()), first_needed + 1, total - 1)
    start = shared_length(input_ids[:, :width].tolist(), keep=0) if width > 0 else 0
    if (
        start < MIN_SHARED
        or not packs(model, int(lengths.max()))
        or not torch.equal(  # right-padded: each row's tokens first, then its padding
            attention_mask.bool(), torch.arange(total, device=lengths.device) < lengths.unsqueeze(1)
        )
    ):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, 0
    return packed_logits(model, input_ids, lengths.tolist(), start, first_needed), first_needed


#: A packed row holds the prefix and about this many of the rows' own tokens: attention costs the
#: square of a packed row's length, masked pairs included, so rows are packed a few at a time.
PACK_OWN_TOKENS = 256


def packs(model: Any, longest: int) -> bool:
    """Whether ``model`` runs packed rows as separate sequences: it takes a 4-D attention mask as
    given (``sdpa`` or ``eager`` attention), position ids and positions to keep logits at, and has
    no sliding window shorter than the ``longest`` row (a given mask replaces the window's)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    return (
        getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and (window is None or longest <= window)
        and {"logits_to_keep", "position_ids"} <= forward_takes(model)
    )


def packed_logits(model: Any, input_ids: Tensor, lengths: list[int], start: int, first_needed: int) -> Tensor:
    """The logits of a right-padded batch whose rows share their first ``start`` tokens, at
    positions ``first_needed`` to the end, the rows packed behind one copy of the prefix.

    A packed row is ``prefix, own_1, own_2, ...`` without padding (``own_i`` = row ``i`` after the
    prefix). Token ``q`` attends to token ``k`` iff ``k <= q`` and ``k`` is in the prefix or in
    ``q``'s own row; positions restart at ``start`` in every own row. Logits are computed only at
    the packed places of positions ``first_needed..T-1`` of each row (a padding position takes any
    place: its label is ignored). Rows are packed `PACK_OWN_TOKENS` own tokens at a time, in order.
    """
    device, total = input_ids.device, input_ids.shape[1]
    groups: list[list[int]] = [[]]
    filled = 0
    for row, n in enumerate(lengths):
        if groups[-1] and filled + n - start > PACK_OWN_TOKENS:
            groups.append([])
            filled = 0
        groups[-1].append(row)
        filled += n - start
    wanted = torch.arange(max(first_needed, 0), total, device=device)
    pieces = []
    for rows in groups:
        own = [input_ids[r, start : lengths[r]] for r in rows]
        ids = torch.cat([input_ids[rows[0], :start], *own]).unsqueeze(0)
        which = torch.cat(
            [torch.full((start,), -1, device=device)]
            + [torch.full((len(o),), i, device=device) for i, o in enumerate(own)]
        )
        positions = torch.cat(
            [torch.arange(start, device=device)] + [start + torch.arange(len(o), device=device) for o in own]
        )
        places = torch.arange(ids.shape[1], device=device)
        allowed = (places.unsqueeze(0) <= places.unsqueeze(1)) & (
            (which.unsqueeze(0) == -1) | (which.unsqueeze(0) == which.unsqueeze(1))
        )
        first_own = start + torch.tensor([0] + [len(o) for o in own[:-1]], device=device).cumsum(0)
        ends = torch.tensor([lengths[r] for r in rows], device=device)
        keep = torch.where(
            wanted < start,
            wanted,
            torch.where(wanted < ends.unsqueeze(1), first_own.unsqueeze(1) + wanted - start, 0),
        )
        out = model(
            input_ids=ids,
            attention_mask=_mask_for(model, allowed),
            position_ids=positions.unsqueeze(0),
            logits_to_keep=keep.flatten(),
        )
        pieces.append(out.logits.view(len(rows), len(wanted), out.logits.shape[-1]))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _mask_for(model: Any, allowed: Tensor) -> Tensor:
    """``allowed`` (query by key) as the model's attention takes it: boolean for ``sdpa``,
    additive (0 or the dtype's lowest) for ``eager``; shape ``(1, 1, L, L)``."""
    if model.config._attn_implementation == "sdpa":
        return allowed[None, None]
    dtype = next(model.parameters()).dtype
    lowest = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, lowest)[
        None, None
    ]
