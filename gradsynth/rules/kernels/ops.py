"""The operations the rules call: select an implementation (`gradsynth.rules.kernels.select`),
run it, fall back to the eager one where a compiled kernel could not be compiled, and record
what ran (`gradsynth.rules.kernels.report`).

The plain functions (`sago`, `prefer_retain`, `linear`, `inner_products`, `host_dots`) always
produce the result. The ``*_into`` functions and `dots`, `pcgrad_weight`, `pcgrad_apply` run
generated code only, returning False/None (nothing written) where the eager implementation must
run: the rules use them where the eager fallback is not the operation's own (PCGrad recomputes
its weight as a tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules.kernels import report
from gradsynth.rules.kernels.select import (
    IMPLEMENTATIONS,
    Implementation,
    c_takes,
    eligible,
    select_dots,
    select_elementwise,
    select_linear,
)

_TINY64 = torch.finfo(torch.float64).tiny


def _ran(implementation: Implementation, forget: Tensor) -> None:
    report.record(implementation.operation, forget.dtype, forget.device.type, implementation.name)


def _elementwise(
    operation: str, forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float, fast_only: bool
) -> bool:
    chosen = select_elementwise(operation, forget, retain, out)
    if chosen.name == "eager" and fast_only:
        return False
    if not chosen.run(forget, retain, out, alpha, gamma):
        if fast_only:
            return False
        chosen = IMPLEMENTATIONS[operation]["eager"]  # not compiled: nothing was written
        chosen.run(forget, retain, out, alpha, gamma)
    _ran(chosen, forget)
    return True


def sago(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """SAGO into ``out`` by the selected implementation (see `gradsynth.rules.sago`)."""
    _elementwise("sago", forget, retain, out, alpha, gamma, False)
    return out


def prefer_retain(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """Prefer-retain SAGO into ``out`` by the selected implementation."""
    _elementwise("prefer_retain", forget, retain, out, alpha, gamma, False)
    return out


def sago_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """SAGO by generated code (C or compiled); False, writing nothing, where eager must run."""
    return _elementwise("sago", forget, retain, out, alpha, gamma, True)


def prefer_retain_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """Prefer-retain SAGO by generated code; False, writing nothing, where eager must run."""
    return _elementwise("prefer_retain", forget, retain, out, alpha, gamma, True)


def _linear(
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    alpha: float | Tensor,
    gamma: float,
    fast_only: bool,
    large: bool | None = None,
    bf16_c: bool | None = None,
) -> bool:
    chosen, weight = select_linear(forget, retain, out, alpha, large=large, bf16_c=bf16_c)
    if chosen.name == "eager" and fast_only:
        return False
    if not chosen.run(forget, retain, out, weight, gamma):
        if fast_only:
            return False
        chosen = IMPLEMENTATIONS["linear"]["eager"]  # the caller's weight, float or tensor
        chosen.run(forget, retain, out, alpha, gamma)
    _ran(chosen, forget)
    return True


def linear(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float | Tensor, gamma: float) -> Tensor:
    """``out = gamma * f + alpha * r`` (``alpha`` a float or a 0-dim tensor), by the selected peer."""
    _linear(forget, retain, out, alpha, gamma, False)
    return out


def linear_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float | Tensor, gamma: float) -> bool:
    """``gamma*f + alpha*r`` by generated code; False, writing nothing, where eager must run."""
    return _linear(forget, retain, out, alpha, gamma, True)


def dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors in one read by generated code, or None
    where eager must run (tensors the compiled kernels do not take, or no compilation)."""
    chosen = select_dots(forget, retain, any_size=False)
    if chosen.name == "eager":
        return None
    pair = chosen.run(forget, retain)
    if pair is None:
        return None
    _ran(chosen, forget)
    if chosen.name == "C kernel":
        both = torch.tensor(pair, dtype=torch.float64)
        return both[0], both[1]
    return pair


def inner_products(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
    """`dots`, or the eager float64 sums where it returns None (any kind of tensor)."""
    pair = dots(forget, retain)
    if pair is not None:
        return pair
    chosen = IMPLEMENTATIONS["dots"]["eager"]
    _ran(chosen, forget)
    return chosen.run(forget, retain)


def _floats(chosen: Implementation, forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    """``chosen``'s inner products as Python floats (CPU tensors only: reading waits for nothing)."""
    pair = chosen.run(forget, retain)
    if pair is None or chosen.name == "C kernel":
        return pair
    return pair[0].item(), pair[1].item()


def host_dots(forget: Tensor, retain: Tensor) -> tuple[float, float]:
    """``(<f, r>, ||r||^2)`` of plain CPU tensors as Python floats (float64), on every path.

    On the CPU, reading a result waits for nothing; floats spare the tiny tensor operations
    that would otherwise cost more than a small tensor's kernel.
    """
    chosen = select_dots(forget, retain, any_size=True)
    pair = _floats(chosen, forget, retain)
    if pair is None:  # not compiled
        chosen = IMPLEMENTATIONS["dots"]["eager"]
        pair = _floats(chosen, forget, retain)
    _ran(chosen, forget)
    return pair


def pcgrad_weight(
    forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float
) -> tuple[float, bool] | None:
    """PCGrad's retain weight ``alpha - gamma * k`` of one CPU tensor as a float, and whether the
    tensor is large enough for the compiled apply (`eligible`); None where eager must run.

    The two inner products come from one read; the weight is then formed from them as Python
    floats, which are float64 like the tensor formula of
    `gradsynth.rules.pcgrad.projection_coefficient` and give the same value (the same IEEE
    operations, NaN and infinity included) without its half-dozen tiny tensor operations per
    parameter. Reading the products waits for nothing on the CPU.
    """
    plan = _pcgrad_weight(forget, retain, out, alpha, gamma)
    return None if plan is None else plan[:2]


def _pcgrad_weight(
    forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float
) -> tuple[float, bool, bool] | None:
    """`pcgrad_weight`, and whether the C bfloat16 kernels take the tensors (for the apply)."""
    if retain.device.type != "cpu":
        return None
    # Checked once: each check costs microseconds, a mid-size tensor's kernel not much more.
    large = eligible(forget, retain, out)
    bf16_c = forget.dtype == torch.bfloat16 and c_takes(
        "apply", forget, retain, out, plain=True if large else None
    )
    if not (large or bf16_c):
        return None  # (a small bfloat16 tensor takes the C kernels: microseconds, not 200 of eager)
    # (the C bfloat16 inner products run wherever the C bfloat16 apply does)
    chosen = (
        IMPLEMENTATIONS["dots"]["C kernel"]
        if bf16_c
        else select_dots(forget, retain, any_size=True, large=large)
    )
    pair = _floats(chosen, forget, retain)
    if pair is None:
        return None  # not compiled: the eager rule runs, nothing was written
    _ran(chosen, forget)
    fr, rr = pair
    k = fr / max(rr, _TINY64) if fr < 0 else 0.0
    return alpha - gamma * k, large, bf16_c


def pcgrad_apply(
    forget: Tensor, retain: Tensor, out: Tensor, weight: float, large: bool, *, gamma: float
) -> bool:
    """``out = weight * r + gamma * f`` by generated code, for the weight of `pcgrad_weight`;
    False (nothing written) if eager must run."""
    return _linear(forget, retain, out, weight, gamma, True, large=large)


def pcgrad_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """One-sided PCGrad by generated code on the CPU (`pcgrad_weight`, then `pcgrad_apply`);
    False (nothing written) where the caller must run it."""
    plan = _pcgrad_weight(forget, retain, out, alpha, gamma)
    if plan is None:
        return False
    weight, large, bf16_c = plan
    return _linear(forget, retain, out, weight, gamma, True, large=large, bf16_c=bf16_c)
