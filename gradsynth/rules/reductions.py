"""Reductions shared by the rules: float64 inner products without a host sync.

``dot64(a, b) = sum_i a_i * b_i``, accumulated in float64 whatever the dtype of ``a`` and ``b``.

Why float64: the projection coefficient of PCGrad, ``<f, r> / ||r||^2``, must not underflow for
tiny gradients (1e-30 squared is 0 in float32), must not overflow for huge ones, and must stay
accurate on long vectors (a float32 ``torch.dot`` over 341M elements was measured 1.5e-2 off).
Every float32/bfloat16/float16 value and every product of two of them is exact in float64.

Long tensors are reduced in chunks so the float64 temporaries stay small.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per chunk on the CPU. Temporaries of that size, reused from chunk to chunk, stay
#: in cache (measured, one thread: eager SAGO costs 3x a plain add in such chunks, 20x on a whole
#: 16M-element tensor), and a float64 temporary takes 2 MiB.
CHUNK_NUMEL = 1 << 18
#: On accelerators chunks only bound the float64 temporaries; each chunk costs kernel launches.
ACCELERATOR_CHUNK_NUMEL = 1 << 24


def chunk_numel(device: torch.device, elementwise: bool = False) -> int | None:
    """Chunk size for work on ``device``; None means whole tensors (elementwise off the CPU)."""
    if device.type == "cpu":
        return CHUNK_NUMEL
    return None if elementwise else ACCELERATOR_CHUNK_NUMEL


def flat_chunks(*tensors: Tensor, elementwise: bool = False) -> list[tuple[Tensor, ...]]:
    """Aligned flat views of same-shaped tensors, a chunk (see `chunk_numel`) at a time.

    Writing into a chunk writes into the tensor. Tensors that cannot be viewed flat (non-
    contiguous, or tensor subclasses such as DTensor shards, which keep their own semantics)
    come back whole, as one chunk.
    """
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"tensors of different shapes: {[tuple(t.shape) for t in tensors]}")
    size = chunk_numel(tensors[0].device, elementwise)
    flat_ok = all(type(t) is Tensor and t.is_contiguous() for t in tensors)
    if size is None or not flat_ok or tensors[0].numel() <= size:
        return [tensors]
    return list(zip(*(t.view(-1).split(size) for t in tensors), strict=True))


def scratch(chunks: list[tuple[Tensor, ...]], dtype: torch.dtype, count: int) -> list[Tensor]:
    """``count`` buffers for the chunks' temporaries, allocated once and reused per chunk.

    Fresh allocations per chunk would page-fault on every call; reused buffers stay in cache.
    For a single chunk (a whole tensor, possibly a DTensor or non-contiguous) the buffers are
    shaped like it; take a chunk's view with `fit`.
    """
    first = chunks[0][0]
    if len(chunks) == 1:
        return [torch.empty_like(first, dtype=dtype) for _ in range(count)]
    return [torch.empty(first.numel(), dtype=dtype, device=first.device) for _ in range(count)]


def fit(buffer: Tensor, like: Tensor) -> Tensor:
    """The part of a `scratch` buffer that matches the chunk ``like``."""
    return buffer if buffer.shape == like.shape else buffer[: like.numel()].view(like.shape)


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """Return ``sum(a * b)`` as a 0-dim float64 tensor on ``a``'s device, without a host sync."""
    chunks = flat_chunks(a, b)
    if len(chunks) == 1:
        return (a.to(torch.float64) * b.to(torch.float64)).sum()
    buf_a, buf_b = scratch(chunks, torch.float64, 2)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for chunk_a, chunk_b in chunks:
        x = fit(buf_a, chunk_a).copy_(chunk_a)
        y = x if b is a else fit(buf_b, chunk_b).copy_(chunk_b)
        total += torch.dot(x, y)
    return total


def sign_conflict(
    forget: Tensor, retain: Tensor, *, out: Tensor | None = None, work: Tensor | None = None
) -> Tensor:
    """Return a float tensor (dtype of ``forget``) that is 1 where the signs of f and r are opposite.

    The test is ``sign(f) * sign(r) < 0`` on the signs, which are exact, and never on the product
    ``f * r``: in float32, ``1e-30 * -1e-30`` underflows to ``-0`` and would hide the conflict.
    A zero in either gradient is not a conflict, nor is a NaN. ``out`` and ``work`` are optional
    buffers shaped like ``forget``; ``work`` is left holding ``sign(r)``.
    """
    return torch.sign(forget, out=out).mul_(torch.sign(retain, out=work)).lt_(0)


def settled(t: Tensor) -> Tensor:
    """``t`` with any pending cross-rank sum carried out, in one collective; other tensors as they are.

    A sum over a sharded tensor (a DTensor) is a ``Partial`` placement: each rank holds its share,
    and every later operation that needs the value all-reduces it again. Settling once, on the
    stacked scalars a rule needs, makes that one all-reduce.
    """
    placements = getattr(t, "placements", None)
    if placements is None or not any(p.is_partial() for p in placements):
        return t
    from torch.distributed.tensor import Replicate

    return t.redistribute(placements=[Replicate()] * len(placements))
