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

The ladder also descends when asked (``min_steps`` > 1): a first rung that reaches the target
in fewer than ``min_steps`` steps (one AdamW step at a large rate can erase a whole forget set,
which compares rules after one step) is run again from the original model at
``lr_0 / factor``, then ``lr_0 / factor**2``, ... (at most ``descents`` times): the first of these
that reaches the target in ``min_steps`` steps or more is the result; if one no longer reaches the
target within the cap, the previous (faster) rung stays the result; after the last descent, the
last rung that reached the target is the result, still too fast.
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
    run: Callable[[float], tuple[Any, list[StepRecord]]],
    lrs: list[float],
    target: float,
    *,
    min_steps: int = 1,
    factor: float = 2.0,
    descents: int = 0,
) -> tuple[Any, list[StepRecord], list[Rung]]:
    """Call ``run(lr)`` (a fresh run from the original model, returning its result and records)
    for each rate of ``lrs`` in turn until one reaches ``target``; returns that run's result and
    records (or the last rung's) and every rung climbed, in the order run. With ``min_steps`` > 1
    and ``descents`` > 0, a first rung that reached the target too fast descends (see above)."""
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
    if not (hit and len(rungs) == 1 and len(records) < min_steps):
        return result, records, rungs
    lr = lrs[0]
    for _ in range(descents):
        lr /= factor
        lower, lower_records = run(lr)
        lower_hit = reached(lower_records, target)
        last = lower_records[-1].forget_recall if lower_records else None
        rungs.append(Rung(lr, len(lower_records), lower_hit, last))
        if not lower_hit:
            break  # too slow now: the faster rung that reached the target stays the result
        result, records = lower, lower_records
        if len(records) >= min_steps:
            break
    return result, records, rungs
