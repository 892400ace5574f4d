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

#: Elements per chunk: each float64 temporary of one chunk takes 2 MiB.
CHUNK_NUMEL = 1 << 18


def flat_chunks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Aligned flat views of same-shaped tensors, ``CHUNK_NUMEL`` elements at a time.

    Writing into a chunk writes into the tensor. Tensors that cannot be viewed flat (non-
    contiguous, or tensor subclasses such as DTensor shards, which keep their own semantics)
    come back whole, as one chunk.
    """
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"tensors of different shapes: {[tuple(t.shape) for t in tensors]}")
    flat_ok = all(type(t) is Tensor and t.is_contiguous() for t in tensors)
    if not flat_ok or tensors[0].numel() <= CHUNK_NUMEL:
        return [tensors]
    return list(zip(*(t.view(-1).split(CHUNK_NUMEL) for t in tensors), strict=True))


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """Return ``sum(a * b)`` as a 0-dim float64 tensor on ``a``'s device, without a host sync."""
    total = None
    for chunk_a, chunk_b in flat_chunks(a, b):
        part = (chunk_a.to(torch.float64) * chunk_b.to(torch.float64)).sum()
        total = part if total is None else total + part
    return total


def sign_conflict(forget: Tensor, retain: Tensor) -> Tensor:
    """Return a float tensor (dtype of ``forget``) that is 1 where the signs of f and r are opposite.

    The test is ``sign(f) * sign(r) < 0`` on the signs, which are exact, and never on the product
    ``f * r``: in float32, ``1e-30 * -1e-30`` underflows to ``-0`` and would hide the conflict.
    A zero in either gradient is not a conflict, nor is a NaN.
    """
    return torch.sign(forget).mul_(torch.sign(retain)).lt_(0)
