"""One-sided PCGrad, the paper's adaptation: only the forget gradient is ever projected.

::

    if <f, r> < 0:  f' = f - <f, r> / ||r||^2 * r     else: f' = f
    g = gamma * f' + alpha * r  =  gamma * f + (alpha - gamma * k) * r,
    with k = min(<f, r>, 0) / ||r||^2

``pcgrad`` takes ``<f, r>`` and ``||r||^2`` per parameter tensor (as the reference code does).

``pcgrad_global`` takes them once over the whole scope of the rule (every parameter whose param
group uses it). Param groups may weight their forget gradients differently, so it projects the
weighted forget gradient ``F = (gamma_1 f_1, gamma_2 f_2, ...)`` of the whole scope::

    K = min(<F, r>, 0) / ||r||^2          g_j = gamma_j f_j + (alpha_j - K) r_j

which is the formula above, ``K = gamma * k``, when every group has the same ``gamma``.

Guarantee (alpha, gamma >= 0): ``<f', r> >= 0``, hence ``<g, r> = gamma <f', r> + alpha ||r||^2
>= 0`` over the tensor (``pcgrad``); for ``pcgrad_global``, ``<F - K r, r> >= 0`` and so
``<g, r> >= 0`` over the scope. Unlike SAGO, single coordinates may still oppose retention.

The inner products are accumulated in float64 and ``k`` stays a 0-dim tensor on the device:
no host sync, no underflow for tiny gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules import fused
from gradsynth.rules.base import Rule
from gradsynth.rules.reductions import dot64
from gradsynth.rules.weighted_sum import weighted_sum


def projection_coefficient(forget_dot_retain: Tensor, retain_sq_norm: Tensor) -> Tensor:
    """``k = <f, r> / ||r||^2`` where ``<f, r> < 0``, else 0 (a 0-dim tensor)."""
    safe_norm = retain_sq_norm.clamp_min(torch.finfo(retain_sq_norm.dtype).tiny)
    return torch.where(forget_dot_retain < 0, forget_dot_retain / safe_norm, 0.0)


def inner_products(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors: one fused read where possible."""
    pair = fused.dots(forget, retain)
    return pair if pair is not None else (dot64(forget, retain), dot64(retain, retain))


def pcgrad(
    forget: Tensor, retain: Tensor, *, alpha: float = 1.0, gamma: float = 1.0, out: Tensor | None = None
) -> Tensor:
    """One-sided PCGrad on one tensor (see the module docstring)."""
    k = projection_coefficient(*inner_products(forget, retain))
    return weighted_sum(forget, retain, alpha=alpha - gamma * k, gamma=gamma, out=out)


class PCGrad(Rule):
    """Rule ``"pcgrad"``: `pcgrad` per parameter tensor."""

    name = "pcgrad"

    def combine(
        self, forget: Tensor, retain: Tensor, *, alpha: float, gamma: float, out: Tensor, context: Any = None
    ) -> None:
        pcgrad(forget, retain, alpha=alpha, gamma=gamma, out=out)


class PCGradGlobal(Rule):
    """Rule ``"pcgrad_global"``: one projection coefficient over every tensor in the scope."""

    name = "pcgrad_global"

    def prepare(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        *,
        alpha: Sequence[float],
        gamma: Sequence[float],
    ) -> Tensor | None:
        """Return ``K = min(<F, r>, 0) / ||r||^2`` over the scope, ``F`` the gamma-weighted forget."""
        if not retain:
            return None
        # Tensors spread over several devices are reduced on the first one. Out-of-place adds:
        # the terms may be tensor subclasses (DTensor partial sums) that a plain tensor cannot absorb.
        device = retain[0].device
        fr = rr = None
        for f, r, weight in zip(forget, retain, gamma, strict=True):
            fr_pair, rr_term = inner_products(f, r)
            fr_term, rr_term = weight * fr_pair.to(device), rr_term.to(device)
            fr = fr_term if fr is None else fr + fr_term
            rr = rr_term if rr is None else rr + rr_term
        return projection_coefficient(fr, rr)

    def combine(
        self, forget: Tensor, retain: Tensor, *, alpha: float, gamma: float, out: Tensor, context: Any = None
    ) -> None:
        if not isinstance(context, Tensor):
            raise RuntimeError("pcgrad_global.combine needs the coefficient returned by its prepare()")
        weighted_sum(forget, retain, alpha=alpha - context.to(retain.device), gamma=gamma, out=out)
