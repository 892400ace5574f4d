"""The naive GradDiff baseline: ``g = gamma * f + alpha * r``.

Also the final step of both PCGrad rules, which differ from it only in the retain weight
(a 0-dim tensor there, so that no host sync is needed to apply it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules import kernels
from gradsynth.rules.base import TensorRule
from gradsynth.rules.geometry_sums import GeometrySink, fused_measured, measured


def weighted_sum(
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float | Tensor = 1.0,
    gamma: float = 1.0,
    out: Tensor | None = None,
    geometry: GeometrySink | None = None,
) -> Tensor:
    """Return ``gamma * f + alpha * r``, written into ``out`` (which may be ``f`` or ``r``).

    With ``geometry``, the tensor's geometry sums go to it, taken in the same pass
    (`gradsynth.rules.geometry_sums`).

    ``alpha`` may be a 0-dim tensor, applied without reading it on the host; then the sum is
    formed in float64, because such a weight (PCGrad's ``alpha - gamma * k``) may lie beyond the
    range of the gradients' dtype even where its product with ``r`` does not.
    """
    if out is None:
        out = torch.empty_like(retain)
    if geometry is not None:
        weight = alpha
        if isinstance(weight, Tensor) and type(weight) is Tensor and weight.device.type == "cpu":
            weight = float(weight)  # as the fused path reads it (a CPU tensor: waits for nothing)
        if (
            not isinstance(weight, Tensor)
            and kernels.fuses_geometry(forget, retain, out, weight)
            and fused_measured("linear", forget, retain, out, weight, gamma, geometry)
        ):
            return out  # the compiled kernel's operations and the sums in one C loop
        return measured(
            lambda f, r, g: weighted_sum(f, r, alpha=alpha, gamma=gamma, out=g), forget, retain, out, geometry
        )
    return kernels.linear(forget, retain, out, alpha=alpha, gamma=gamma)


class WeightedSum(TensorRule):
    """Rule ``"sum"``: `weighted_sum`, the naive baseline with no conflict handling."""

    name = "sum"
    function = staticmethod(weighted_sum)
