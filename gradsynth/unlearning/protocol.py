"""The comparable-forgetting protocol: stop at a forget target, with a learning-rate ladder.

Rules forget at different speeds, so a fixed number of steps compares them at different amounts
of forgetting, and geometry averaged over a fixed budget is mostly measured after forgetting is
done. The protocol instead runs each rule until the first step at which forget recall is at
most a target ``R`` (`UnlearnSettings.forget_target`, checked after every step), with a step
cap ``N`` (`UnlearnSettings.steps`). A run that does not reach ``R`` within ``N`` steps is
started again **from the original model, with the same batches**, at the next rung of a
geometric learning-rate ladder::

    lr_k = lr_0 * factor**k,   k = 0, 1, ..., rungs - 1

and the first rung that reaches the target is the result. If none does, the last rung (the
largest rate, run to the cap) is the result, marked as not reached. The step and learning rate
each rule needed are what the protocol reports, and geometry is averaged over the steps
actually taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradsynth.unlearning.loop import StepRecord


def ladder(start: float, factor: float, rungs: int) -> list[float]:
    """``[start, start*factor, ..., start*factor**(rungs-1)]``."""
    if not start > 0 or not factor > 1 or rungs < 1:
        raise ValueError(
            f"a ladder needs start > 0, factor > 1 and rungs >= 1; got {start}, {factor}, {rungs}"
        )
    return [start * factor**k for k in range(rungs)]


def reached(records: list[StepRecord], target: float) -> bool:
    """Whether the run's last step measured forget recall at or below ``target``."""
    last = records[-1].forget_recall if records else None
    return last is not None and last <= target


@dataclass
class Rung:
    """One rung climbed: its learning rate, the steps it took, and whether it reached the target."""

    lr: float
    steps: int
    reached: bool
    forget_recall: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "steps": self.steps,
            "reached": self.reached,
            "forget_recall": self.forget_recall,
        }


def climb(
    run: Callable[[float], tuple[Any, list[StepRecord]]], lrs: list[float], target: float
) -> tuple[Any, list[StepRecord], list[Rung]]:
    """Call ``run(lr)`` (a fresh run from the original model, returning its result and records)
    for each rate of ``lrs`` in turn until one reaches ``target``; returns that run's result and
    records (or the last rung's) and every rung climbed."""
    if not lrs:
        raise ValueError("the ladder is empty; give at least one learning rate")
    rungs: list[Rung] = []
    for lr in lrs:
        result, records = run(lr)
        hit = reached(records, target)
        last = records[-1].forget_recall if records else None
        rungs.append(Rung(lr, len(records), hit, last))
        if hit:
            break
    return result, records, rungs
