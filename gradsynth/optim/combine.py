"""One parameter's synthesis: ``g = rule.combine(f, r; alpha, gamma)``, with its geometry if tracked.

Without geometry the update is written over the retain gradient (no allocation). With geometry,
``f`` and ``r`` must survive the combination to be measured against ``g``, so ``g`` goes into a
new tensor the size of the parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.rules.base import Rule


def combine_one(
    rule: Rule,
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float,
    gamma: float,
    context: Any = None,
    geometry: GeometryAccumulator | None = None,
) -> Tensor:
    """Return one parameter's synthesized gradient: in ``retain``'s buffer, or new with geometry."""
    if geometry is None:
        rule.combine(forget, retain, alpha=alpha, gamma=gamma, out=retain, context=context)
        return retain
    update = torch.empty_like(retain)
    rule.combine(forget, retain, alpha=alpha, gamma=gamma, out=update, context=context)
    geometry.add(forget, retain, update)
    return update
