"""Per-task losses and gradient geometry gathered between two Trainer log calls.

Losses: each micro-batch adds its task losses already divided by the number of micro-batches
of its step, so one step contributes the mean over its micro-batches; a log reports the mean
over the steps since the previous log (averaged over processes). Geometry: the mean of each
`GradientGeometry` field over those steps, NaN values (a task with a zero gradient) left out.
Each step's geometry is kept as its sums (tensors, seven numbers) and read on the host only when
the window is logged: the logging interval, not the step, decides when the device is waited for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gradsynth.optim import GradientGeometry
from gradsynth.optim.geometry import GeometryAccumulator

#: Geometry fields that go into the logs, under ``"geometry/<field>"``.
LOGGED_GEOMETRY = ("cos_fr", "cos_gr", "cos_gf", "conflict_fraction", "norm_f", "norm_r", "norm_g")


class StepStats:
    """Running sums for one logging window."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._forget: Tensor | None = None
        self._retain: Tensor | None = None
        self._steps = 0
        self._geometries: list[GradientGeometry | GeometryAccumulator] = []

    def add_losses(self, forget: Tensor, retain: Tensor) -> None:
        """One micro-batch's task losses (detached, pre-scaled); stays on the device, no sync."""
        self._forget = forget if self._forget is None else self._forget + forget
        self._retain = retain if self._retain is None else self._retain + retain

    def end_step(self, geometry: GradientGeometry | GeometryAccumulator | None) -> None:
        """Close one optimizer step, with the geometry of its synthesis if it was tracked (its
        unread sums: read when the window is logged)."""
        self._steps += 1
        if geometry is not None:
            self._geometries.append(geometry)

    def drain(self, mean_over_processes: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """The window's log entries; resets the sums."""
        logs: dict[str, float] = {}
        if self._steps and self._forget is not None and self._retain is not None:
            losses = mean_over_processes(torch.stack([self._forget, self._retain]).float()) / self._steps
            logs["forget_loss"], logs["retain_loss"] = losses.tolist()
        sums, counts = dict.fromkeys(LOGGED_GEOMETRY, 0.0), dict.fromkeys(LOGGED_GEOMETRY, 0)
        for pending in self._geometries:
            geometry = pending.result() if isinstance(pending, GeometryAccumulator) else pending
            if geometry is None:
                continue
            for name in LOGGED_GEOMETRY:
                value = getattr(geometry, name)
                if not math.isnan(value):
                    sums[name] += value
                    counts[name] += 1
        for name in LOGGED_GEOMETRY:
            if counts[name]:
                logs[f"geometry/{name}"] = sums[name] / counts[name]
        self._reset()
        return logs
