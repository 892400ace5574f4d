"""The compiled implementations' bodies: plain tensor code that ``torch.compile`` traces.

With ``a = alpha``, ``b = gamma`` and ``c = (f * S) * (r * S) < 0``, ``S = 2**117`` (``2**600``
for float64), the signs conflict::

    sago:               g = where(c, a*r + 0*(b*f), b*f + 0*(a*r))
    sago_prefer_retain: g = where(c, a*r + 0*(b*f), a*r + b*f)
    linear:             g = w*r + b*f                    (``sum``; PCGrad's apply, w = a - K)
    dots:               (<f, r>, ||r||^2)                (one read of f and r)

The ``0*x`` terms give exactly the non-finite behaviour of the eager product forms
(``0 * inf`` is NaN). Half-precision inputs compute in float32 and round once at the end.
`KERNELS` names every compiled variant (one per rule and destination of ``g``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

HALF = (torch.bfloat16, torch.float16)
#: Block length of the half-precision CPU inner products (float32 sums over blocks, then float64).
BLOCK = 1 << 12


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _conflict(f: Tensor, r: Tensor) -> Tensor:
    # The sign of a product decides, but never of ``f * r`` itself: 1e-30 * -1e-30 underflows to
    # -0 in float32 and would hide the conflict. Scaled up first, the smallest values multiply
    # to a normal number, and the largest overflow to an infinity that keeps its sign. Zeros stay
    # zero (no conflict); a NaN compares false, and both branches below turn it into NaN anyway.
    scale = 2.0**600 if f.dtype == torch.float64 else 2.0**117
    return (f * scale) * (r * scale) < 0


def _sago(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    a, b = alpha * r, gamma * f
    conflict = _conflict(f, r)
    kept, dropped = torch.where(conflict, a, b), torch.where(conflict, b, a)
    # ``kept + 0 * dropped``, but the compiler folds ``0 * x`` to 0; ``x - x`` is 0 for finite x
    # and NaN for inf or NaN (cheaper than an isfinite test, measured on bfloat16).
    return kept + (dropped - dropped)


def _prefer_retain(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    a, b = alpha * r, gamma * f
    return a + torch.where(_conflict(f, r), b - b, b)


def _upcast(*tensors: Tensor) -> list[Tensor]:
    compute = _compute_dtype(tensors[0].dtype)
    return [t.to(compute) for t in tensors]


# One function per rule and per destination of ``g`` (``r``, ``f`` or a third tensor): the
# compiler keeps a small cache of compilations per function, and the aliasings must not share one
# (a kernel compiled with ``g`` written over one input was seen to fail when later called to
# write over the other).


def _sago_into_retain(r: Tensor, f: Tensor, alpha: float, gamma: float) -> None:
    rc, fc = _upcast(r, f)
    r.copy_(_sago(fc, rc, alpha, gamma))


def _sago_into_forget(f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    f.copy_(_sago(fc, rc, alpha, gamma))


def _sago_into_out(out: Tensor, f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    out.copy_(_sago(fc, rc, alpha, gamma))


def _prefer_into_retain(r: Tensor, f: Tensor, alpha: float, gamma: float) -> None:
    rc, fc = _upcast(r, f)
    r.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _prefer_into_forget(f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    f.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _prefer_into_out(out: Tensor, f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    out.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _linear(f: Tensor, r: Tensor, weight: float, gamma: float, compute: torch.dtype) -> Tensor:
    # ``w * r`` in one product: it cannot overflow or underflow where the result itself does not,
    # as long as ``w`` is itself a normal number of the computing precision (see `linear_into`).
    return r.to(compute) * weight + gamma * f.to(compute)


def _linear_into_retain(r: Tensor, f: Tensor, weight: float, gamma: float) -> None:
    r.copy_(_linear(f, r, weight, gamma, _compute_dtype(r.dtype)))


def _linear_into_forget(f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    f.copy_(_linear(f, r, weight, gamma, _compute_dtype(f.dtype)))


def _linear_into_out(out: Tensor, f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    out.copy_(_linear(f, r, weight, gamma, _compute_dtype(out.dtype)))


# Weights below float32's normal range (PCGrad's weight can be 1e-67 against a retain coordinate
# of 1e30): float64 throughout, where every such weight and product is a normal number.


def _linear_wide_into_retain(r: Tensor, f: Tensor, weight: float, gamma: float) -> None:
    r.copy_(_linear(f, r, weight, gamma, torch.float64))


def _linear_wide_into_forget(f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    f.copy_(_linear(f, r, weight, gamma, torch.float64))


def _linear_wide_into_out(out: Tensor, f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    out.copy_(_linear(f, r, weight, gamma, torch.float64))


def _weighted(f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> Tensor:
    # A float64 tensor weight (PCGrad on a device, never read on the host): float64 throughout.
    return weight * r.to(weight.dtype) + gamma * f.to(weight.dtype)


def _weighted_into_retain(r: Tensor, f: Tensor, weight: Tensor, gamma: float) -> None:
    r.copy_(_weighted(f, r, weight, gamma))


def _weighted_into_forget(f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> None:
    f.copy_(_weighted(f, r, weight, gamma))


def _weighted_into_out(out: Tensor, f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> None:
    out.copy_(_weighted(f, r, weight, gamma))


def _dots_wide(f: Tensor, r: Tensor) -> Tensor:
    f64, r64 = f.to(torch.float64), r.to(torch.float64)
    return torch.stack([(f64 * r64).sum(), (r64 * r64).sum()])


def _dots_blocked(f: Tensor, r: Tensor) -> Tensor:
    # ``f`` and ``r`` come as (blocks, BLOCK). float32 products of half-precision values are
    # exact; float32 sums over short blocks stay accurate and vectorise, where a float64
    # conversion of each element does not on the CPU.
    f32, r32 = f.to(torch.float32), r.to(torch.float32)
    fr = (f32 * r32).sum(1).to(torch.float64).sum()
    rr = (r32 * r32).sum(1).to(torch.float64).sum()
    return torch.stack([fr, rr])


KERNELS: dict[str, Callable[..., Any]] = {
    fn.__name__.lstrip("_"): fn
    for fn in (
        _sago_into_retain,
        _sago_into_forget,
        _sago_into_out,
        _prefer_into_retain,
        _prefer_into_forget,
        _prefer_into_out,
        _linear_into_retain,
        _linear_into_forget,
        _linear_into_out,
        _linear_wide_into_retain,
        _linear_wide_into_forget,
        _linear_wide_into_out,
        _weighted_into_retain,
        _weighted_into_forget,
        _weighted_into_out,
        _dots_wide,
        _dots_blocked,
    )
}
