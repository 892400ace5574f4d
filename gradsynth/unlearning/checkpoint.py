"""What the unlearning loop needs to continue a run exactly where it stopped (`LoopState`), and how it
is asked to save one (`Checkpointing`).

A state is taken at a step boundary: after step ``k``'s ``optimizer.step()`` and its record, before
step ``k + 1`` draws its batches. It holds

- the trained parameters (all of them; a PEFT model's adapters; RMU's chosen weights), by name;
- the optimizer's state dict (`SynthesizingOptimizer.state_dict`: AdamW's moments and step counts,
  the rule and its weights);
- each batch cycle's position: its ``random.Random`` state and the rest of its current shuffle;
- torch's CPU random state, and the records of steps ``1..k``.

Loading it into a run built from the same model, data and settings and running steps ``k+1..N``
gives what steps ``1..N`` give without a stop: the same batches, the same optimizer arithmetic.
A stop inside step ``k + 1`` (an interrupt during its backward passes) loses only that step's
partial gradients: the caller's ``guard`` keeps a signal from landing between the weight update and
the record that says it happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class CheckpointMismatch(ValueError):
    """A checkpoint whose parameters are not the ones this run trains (another model or setting)."""


@dataclass
class LoopState:
    """The loop after ``step`` completed steps (see the module docstring)."""

    step: int
    weights: dict[str, Tensor]
    optimizer: dict[str, Any]
    cycles: dict[str, dict[str, Any]]  # "forget"/"retain": {"rng": random state, "order": [...]}
    torch_rng: Tensor
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Checkpointing:
    """How `gradsynth.unlearning.loop.unlearn` saves and resumes.

    ``save(state, interrupted)`` is called every ``every`` steps (not after the last one) and, with
    ``interrupted=True``, when a ``KeyboardInterrupt`` stops the loop. ``start``: a state to continue
    from. ``guard()``: a context manager around the weight update and its record (e.g. one that
    holds signals back until the block ends)."""

    save: Callable[[LoopState, bool], None]
    every: int | None = None
    start: LoopState | None = None
    guard: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext


def check_weights(state: LoopState, named: dict[str, Tensor]) -> None:
    """Refuse a state whose parameter names or shapes are not those of ``named`` (what the run trains)."""
    missing = sorted(set(named) - set(state.weights))
    extra = sorted(set(state.weights) - set(named))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this run does not train"
        raise CheckpointMismatch(
            f"the checkpoint {which} ({len(state.weights)} tensors saved, {len(named)} trained here)"
        )
    for name, p in named.items():
        saved = state.weights[name]
        if tuple(saved.shape) != tuple(p.shape) or saved.dtype != p.dtype:
            raise CheckpointMismatch(
                f"the checkpoint's {name} is {saved.dtype} {tuple(saved.shape)}, the model's "
                f"{p.dtype} {tuple(p.shape)}"
            )
