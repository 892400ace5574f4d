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

from gradsynth.rules import kernels
from gradsynth.rules.base import Rule, TensorRule
from gradsynth.rules.geometry_sums import GeometrySink, fused_measured, measured
from gradsynth.rules.reductions import settled
from gradsynth.rules.weighted_sum import weighted_sum


def projection_coefficient(forget_dot_retain: Tensor, retain_sq_norm: Tensor) -> Tensor:
    """``k = <f, r> / ||r||^2`` where ``<f, r> < 0``, else 0 (a 0-dim tensor)."""
    safe_norm = retain_sq_norm.clamp_min(torch.finfo(retain_sq_norm.dtype).tiny)
    return torch.where(forget_dot_retain < 0, forget_dot_retain / safe_norm, 0.0)


def _local_inner_products(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
    return kernels.inner_products(forget, retain)


def inner_products(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors: one fused read where possible.

    For sharded tensors the two sums are stacked before use, so they are all-reduced once
    together, not once per operation that reads them.
    """
    fr, rr = _local_inner_products(forget, retain)
    if getattr(fr, "placements", None) is None:
        return fr, rr
    both = settled(torch.stack([fr, rr]))
    return both[0], both[1]


def pcgrad(
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    out: Tensor | None = None,
    geometry: GeometrySink | None = None,
) -> Tensor:
    """One-sided PCGrad on one tensor (see the module docstring).

    With ``geometry``, the tensor's geometry sums go to it, taken in the apply's pass
    (`gradsynth.rules.geometry_sums`).
    """
    if out is None:
        out = torch.empty_like(retain)
    if geometry is None:
        if kernels.pcgrad_into(forget, retain, out, alpha=alpha, gamma=gamma):
            return out
    else:
        plan = kernels.pcgrad_weight(forget, retain, out, alpha=alpha, gamma=gamma)
        if plan is not None:
            # The weight of the whole tensor, then the apply the plain path runs, measured by chunks.
            weight, large = plan
            if kernels.fuses_geometry(forget, retain, out, weight, large=large) and fused_measured(
                "linear", forget, retain, out, weight, gamma, geometry
            ):
                return out  # the compiled apply's operations and the sums in one C loop

            def apply(f: Tensor, r: Tensor, g: Tensor) -> None:
                if not kernels.pcgrad_apply(f, r, g, weight, large, gamma=gamma):
                    weighted_sum(f, r, alpha=torch.tensor(weight, dtype=torch.float64), gamma=gamma, out=g)

            return measured(apply, forget, retain, out, geometry)
    k = projection_coefficient(*inner_products(forget, retain))
    return weighted_sum(forget, retain, alpha=alpha - gamma * k, gamma=gamma, out=out, geometry=geometry)


def scope_inner_products(xs: Sequence[Tensor], ys: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``[sum_j w_j <x_j, y_j>, sum_j ||y_j||^2]`` over a rule's scope, as one float64 tensor.

    Tensors spread over several devices are reduced on the first one; for sharded tensors the
    two sums are all-reduced once, together, for the whole scope.
    """
    device = ys[0].device
    if all(type(t) is Tensor and t.device.type == "cpu" for t in (*xs, *ys)):
        # Python floats are float64, summed in the same order: the same values, without four
        # tiny tensor operations per parameter (more than a small parameter's kernel costs).
        xy_sum = yy_sum = 0.0
        for x, y, weight in zip(xs, ys, weights, strict=True):
            xy, yy = kernels.host_dots(x, y)
            xy_sum, yy_sum = xy_sum + weight * xy, yy_sum + yy
        return torch.tensor([xy_sum, yy_sum], dtype=torch.float64)
    total = None
    for x, y, weight in zip(xs, ys, weights, strict=True):
        xy, yy = (term.to(device) for term in _local_inner_products(x, y))
        term = torch.stack([weight * xy, yy])
        # Out of place: the terms may be DTensor partial sums that a plain tensor cannot absorb.
        total = term if total is None else total + term
    return settled(total)


class PCGrad(TensorRule):
    """Rule ``"pcgrad"``: `pcgrad` per parameter tensor."""

    name = "pcgrad"
    function = staticmethod(pcgrad)


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
        total = scope_inner_products(forget, retain, gamma)
        return projection_coefficient(total[0], total[1])

    measures_geometry = True

    def combine(
        self,
        forget: Tensor,
        retain: Tensor,
        *,
        alpha: float,
        gamma: float,
        out: Tensor,
        context: Any = None,
        geometry: GeometrySink | None = None,
    ) -> None:
        if not isinstance(context, Tensor):
            raise RuntimeError("pcgrad_global.combine needs the coefficient returned by its prepare()")
        weight = alpha - context.to(retain.device)
        weighted_sum(forget, retain, alpha=weight, gamma=gamma, out=out, geometry=geometry)
