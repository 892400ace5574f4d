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

#: Elements per chunk: the float64 temporaries of one chunk take 8 MiB each.
CHUNK_NUMEL = 1 << 20


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """Return ``sum(a * b)`` as a 0-dim float64 tensor on ``a``'s device, without a host sync."""
    if a.shape != b.shape:
        raise ValueError(f"dot64 needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if type(a) is not Tensor or type(b) is not Tensor or a.numel() <= CHUNK_NUMEL:
        # Tensor subclasses (e.g. DTensor shards) keep their own reduction semantics.
        return (a.to(torch.float64) * b.to(torch.float64)).sum()
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for chunk_a, chunk_b in zip(flat_a.split(CHUNK_NUMEL), flat_b.split(CHUNK_NUMEL), strict=True):
        total += torch.dot(chunk_a.to(torch.float64), chunk_b.to(torch.float64))
    return total


def sign_conflict(forget: Tensor, retain: Tensor) -> Tensor:
    """Return a float tensor (dtype of ``forget``) that is 1 where the signs of f and r are opposite.

    The test is ``sign(f) * sign(r) < 0`` on the signs, which are exact, and never on the product
    ``f * r``: in float32, ``1e-30 * -1e-30`` underflows to ``-0`` and would hide the conflict.
    A zero in either gradient is not a conflict, nor is a NaN.
    """
    return torch.sign(forget).mul_(torch.sign(retain)).lt_(0)
