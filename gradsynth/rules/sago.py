"""SAGO, Sign-Align Gradient Optimization, and its ``prefer_retain`` variant (Xiao et al., 2026).

Coordinate-wise, with ``c_i = 1`` where the signs of ``f_i`` and ``r_i`` are opposite and
``c_i = 0`` elsewhere (signs agree, or either is zero)::

    sago:               g_i = c_i * alpha * r_i + (1 - c_i) * gamma * f_i
    sago_prefer_retain: g_i = c_i * alpha * r_i + (1 - c_i) * (gamma * f_i + alpha * r_i)
                      = alpha * r_i + (1 - c_i) * gamma * f_i

Guarantee (alpha, gamma >= 0): ``g_i * r_i >= 0`` for every coordinate, so ``cos(g, r) >= 0``.

Written as products with ``c`` rather than a selection so that a non-finite value in either
gradient reaches ``g`` (``0 * inf`` is NaN): a forget overflow at a coordinate where retain
wins must still make a ``GradScaler`` skip the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules import kernels
from gradsynth.rules.base import TensorRule
from gradsynth.rules.geometry_sums import GeometrySink, fused_measured, measured


def _blend(
    forget: Tensor,
    retain: Tensor,
    alpha: float,
    gamma: float,
    out: Tensor | None,
    keep_retain: bool,
    geometry: GeometrySink | None = None,
) -> Tensor:
    if out is None:
        out = torch.empty_like(retain)
    if geometry is not None:
        # Where the compiled kernel would run: the C kernel of its operations, which writes g and
        # takes the sums in one loop.
        kind = "prefer" if keep_retain else "sago"
        if kernels.fuses_geometry(forget, retain, out) and fused_measured(
            kind, forget, retain, out, alpha, gamma, geometry
        ):
            return out
        # The same kernels, a chunk at a time, measured before each chunk of g is written.
        return measured(
            lambda f, r, g: _blend(f, r, alpha, gamma, g, keep_retain), forget, retain, out, geometry
        )
    run = kernels.prefer_retain if keep_retain else kernels.sago
    return run(forget, retain, out, alpha=alpha, gamma=gamma)


def sago(
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    out: Tensor | None = None,
    geometry: GeometrySink | None = None,
) -> Tensor:
    """SAGO: retain wins where signs conflict, forget alone elsewhere (see the module docstring).

    With ``geometry``, the tensor's geometry sums go to it, taken in the same pass
    (`gradsynth.rules.geometry_sums`).
    """
    return _blend(forget, retain, alpha, gamma, out, False, geometry)


def sago_prefer_retain(
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    out: Tensor | None = None,
    geometry: GeometrySink | None = None,
) -> Tensor:
    """SAGO variant: retain alone where signs conflict, ``gamma*f + alpha*r`` elsewhere (``geometry``
    as in `sago`)."""
    return _blend(forget, retain, alpha, gamma, out, True, geometry)


class Sago(TensorRule):
    """Rule ``"sago"``: `sago` per parameter tensor."""

    name = "sago"
    function = staticmethod(sago)


class SagoPreferRetain(TensorRule):
    """Rule ``"sago_prefer_retain"``: `sago_prefer_retain` per parameter tensor."""

    name = "sago_prefer_retain"
    function = staticmethod(sago_prefer_retain)
