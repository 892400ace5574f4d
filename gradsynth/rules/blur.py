"""BLUR, the reference code's forget-first baseline: the retain gradient is projected off ``f``.

It is the mirror image of PCGrad's roles, kept as a baseline the paper's authors compare
against. Over the whole scope of the rule (every parameter whose param group uses it), with
``R = (alpha_1 r_1, alpha_2 r_2, ...)`` the alpha-weighted retain gradient::

    C = <R, f> / ||f||^2                  (C = 0 where ||f|| = 0)
    g_j = alpha_j r_j - C f_j + gamma_j f_j

With one ``alpha`` and ``gamma`` for every tensor this is the reference's
``g = gamma * f + alpha * (r - <r, f>/||f||^2 * f)``. Unlike PCGrad the projection is
unconditional: the retain part is made orthogonal to ``f`` whether or not the two conflict.

Guarantee (the retain part never touches the forget direction): ``<R - C f, f> = 0`` over the
scope, hence ``<g, f> = sum_j gamma_j ||f_j||^2 >= 0``. Nothing protects retention: ``<g, r>``
may be negative, which is why the paper treats it as a baseline, not a method.

The sums are accumulated in float64 and ``C`` stays a 0-dim tensor on the device (no host sync);
for sharded gradients the two sums of the whole scope are all-reduced once, together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules.base import Rule
from gradsynth.rules.geometry_sums import GeometrySink, measured
from gradsynth.rules.pcgrad import scope_inner_products
from gradsynth.rules.weighted_sum import weighted_sum


def blur_coefficient(retain_dot_forget: Tensor, forget_sq_norm: Tensor) -> Tensor:
    """``C = <R, f> / ||f||^2``, 0 where ``f`` is zero (then ``<R, f>`` is zero too)."""
    return retain_dot_forget / forget_sq_norm.clamp_min(torch.finfo(forget_sq_norm.dtype).tiny)


class Blur(Rule):
    """Rule ``"blur"``: project the alpha-weighted retain gradient off ``f`` over the scope."""

    name = "blur"

    def prepare(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        *,
        alpha: Sequence[float],
        gamma: Sequence[float],
    ) -> Tensor | None:
        """Return ``C = <R, f> / ||f||^2`` over the scope."""
        if not forget:
            return None
        # (<r, f>, ||f||^2): PCGrad's scope sums with the roles swapped, weighted by alpha.
        total = scope_inner_products(retain, forget, alpha)
        return blur_coefficient(total[0], total[1])

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
            raise RuntimeError("blur.combine needs the coefficient returned by its prepare()")
        # weighted_sum(a, b, alpha=w_b, gamma=w_a) = w_a*a + w_b*b takes a 0-dim tensor weight on b
        # only, so the roles are swapped: the tensor weight (gamma - C) lands on f.
        weight = gamma - context.to(forget.device)
        if geometry is None:
            weighted_sum(retain, forget, alpha=weight, gamma=alpha, out=out)
        else:  # measured with f and r in their own roles
            measured(
                lambda f, r, g: weighted_sum(r, f, alpha=weight, gamma=alpha, out=g),
                forget,
                retain,
                out,
                geometry,
            )
