"""Gradient-geometry diagnostics of one synthesis: the quantities the paper reports.

Over all managed parameters, with f, r, g the forget, retain and synthesized gradients flattened::

    cos_fr = <f, r> / (|f| |r|)     cos_gr = <g, r> / (|g| |r|)     cos_gf = <g, f> / (|g| |f|)
    conflict_fraction = #{i : sign(f_i) = -sign(r_i) != 0} / #coordinates
    norm_f = |f|,  norm_r = |r|,  norm_g = |g|

The sums (`gradsynth.rules.geometry_sums`) are taken by the rules themselves, in the pass that
writes ``g``; they stay float64 tensors on each device while the optimizer loops over parameters
(nothing is read on the host during a step) and are added up once, in `GeometryAccumulator.reduce`,
and read on the host only when `GeometryAccumulator.result` is called (the logging decides when).
A cosine with a zero-norm side is NaN.

Sharded gradients (FSDP2 DTensors) give partial sums, one per rank; `GeometryAccumulator.reduce`
turns them into global ones with one all-reduce of seven numbers per device mesh. It is a
collective, so every rank calls it (the optimizer does, at the end of each synthesis), and
`result` then reads the same global geometry on every rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gradsynth.rules.geometry_sums import SUMS, sums_of

_FF, _RR, _FR, _GG, _GF, _GR, _CONFLICTS = (SUMS.index(name) for name in SUMS)


@dataclass(frozen=True)
class GradientGeometry:
    """Gradient geometry of one synthesis (see `gradsynth.optim.geometry`)."""

    cos_fr: float
    cos_gr: float
    cos_gf: float
    conflict_fraction: float
    norm_f: float
    norm_r: float
    norm_g: float
    numel: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a flat dict, e.g. for a logger."""
        return asdict(self)


def _cos(dot: float, sq_a: float, sq_b: float) -> float:
    denom = math.sqrt(sq_a * sq_b)
    return dot / denom if denom > 0 else math.nan


class GeometryAccumulator:
    """Adds up the sums behind `GradientGeometry` one parameter tensor at a time."""

    def __init__(self) -> None:
        # Keyed by device and device mesh (None for plain tensors): partial sums over a mesh
        # cannot be added to plain tensors or to partial sums over another mesh. Plain tensors'
        # sums are kept in a list and added up at `reduce` (one operation, not one per tensor).
        self._parts: dict[tuple[torch.device, object], list[Tensor]] = {}
        self._totals: dict[tuple[torch.device, object], Tensor] = {}
        self._numel = 0

    def add(self, forget: Tensor, retain: Tensor, update: Tensor) -> None:
        """Account for one parameter tensor from its three gradients, measured after; no host sync."""
        self.add_sums(sums_of(forget, retain, update), forget.numel())

    def add_sums(self, sums: Tensor, numel: int) -> None:
        """Account for one parameter tensor's 7 sums (`gradsynth.rules.geometry_sums.SUMS`)."""
        key = (sums.device, getattr(sums, "device_mesh", None))
        if key[1] is None:
            self._parts.setdefault(key, []).append(sums)
        elif key in self._totals:
            # Out of place: DTensor partial sums.
            self._totals[key] = self._totals[key] + sums
        else:
            self._totals[key] = sums
        self._numel += numel

    def _gather(self) -> None:
        for key, parts in self._parts.items():
            total = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
            self._totals[key] = total + self._totals[key] if key in self._totals else total
        self._parts.clear()

    def reduce(self) -> None:
        """Make the sums of sharded tensors (DTensors) global; a collective call on every rank.

        All of a mesh's sums are reduced together, once. No-op for plain tensors. Without it,
        `result` would see one rank's share only.
        """
        self._gather()
        for key, total in self._totals.items():
            full_tensor = getattr(total, "full_tensor", None)
            if full_tensor is not None:
                self._totals[key] = full_tensor()

    def result(self) -> GradientGeometry | None:
        """Read the sums (one host sync per device) and form the geometry; None if empty."""
        self._gather()
        if not self._totals:
            return None
        total = sum(t.to("cpu") for t in self._totals.values())
        s = total.tolist()
        return GradientGeometry(
            cos_fr=_cos(s[_FR], s[_FF], s[_RR]),
            cos_gr=_cos(s[_GR], s[_GG], s[_RR]),
            cos_gf=_cos(s[_GF], s[_GG], s[_FF]),
            conflict_fraction=s[_CONFLICTS] / self._numel if self._numel else math.nan,
            norm_f=math.sqrt(s[_FF]),
            norm_r=math.sqrt(s[_RR]),
            norm_g=math.sqrt(s[_GG]),
            numel=self._numel,
        )
