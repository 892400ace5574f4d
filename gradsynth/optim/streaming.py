"""Streaming synthesis: each parameter is combined while the second task's backward runs.

Without streaming, both task gradients are held in full until the synthesis: one gradient set
beyond plain training. With ``streaming=True``, the backward of the second task named in a step
fires a hook on each parameter as soon as autograd has finished its gradient
(``Tensor.register_post_accumulate_grad_hook``); the hook combines it with the first task's
stashed gradient, ``p.grad = rule(f, r)``, and drops that stash. The first task's gradients
are released while the backward proceeds, so the peak holds only what it has not reached yet
beside what it has produced: a fraction of a gradient set (the largest parameters in flight).

The contract of a streaming step: any number of ``backward_*`` calls for one task, then exactly
one, with its loss, for the other (so the wrapper runs that backward with its hooks in place).

Refused, because it would be wrong:

- a rule that needs every gradient before combining any (``pcgrad_global``, or any rule whose
  ``prepare`` is not the default): the hooks see one parameter at a time;
- distributed training (a process group of several ranks, or DTensor parameters): the hook sees
  the local gradient before the all-reduce, and SAGO of local gradients is not SAGO of the
  averaged gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradsynth.optim.combine import combine_one
from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.optim.task_gradients import RETAIN, TaskGradients, other_task
from gradsynth.rules import kernels
from gradsynth.rules.base import Rule


def _distributed_reason(params: Iterable[Tensor]) -> str | None:
    if not torch.distributed.is_available():
        return None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return f"a process group of {torch.distributed.get_world_size()} ranks is initialized"
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        return "the parameters are DTensors (FSDP2 / tensor parallel)"
    return None


def check_streamable(rules: Iterable[Rule], params: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` naming the fix where streaming synthesis would compute the wrong update."""
    for rule in rules:
        if type(rule).prepare is not Rule.prepare:
            raise ValueError(
                f"rule {rule.name or type(rule).__name__!r} needs every gradient of its scope before it "
                "can combine any (its prepare() spans tensors), so it cannot stream; use "
                "streaming=False, or a per-tensor rule such as 'pcgrad' or 'sago'"
            )
    reason = _distributed_reason(params)
    if reason is not None:
        raise ValueError(
            f"streaming=True cannot be used here: {reason}. A streaming hook sees each gradient "
            "before it is all-reduced across ranks, and the rules are not linear (SAGO of local "
            "gradients is not SAGO of the averaged gradient). Use streaming=False (the default)."
        )


class StreamingBackward:
    """Hooks that combine each parameter's gradients as the second task's backward finishes it.

    ``settings`` maps each managed parameter to its ``(rule, alpha, gamma)``. Use as a context
    manager around the backward; ``done`` lists the parameters combined.
    """

    def __init__(
        self,
        tasks: TaskGradients,
        task: str,
        settings: dict[Tensor, tuple[Rule, float, float]],
        geometry: GeometryAccumulator | None,
    ) -> None:
        self._tasks = tasks
        self._task = task
        self._first = other_task(task)
        self._settings = settings
        self._numel = sum(p.numel() for p in settings)  # the step's size decides the path (`for_step`)
        self._geometry = geometry
        self._handles: list[Any] = []
        # The backend policy in force where the backward starts: the hooks may run on another
        # thread (an accelerator's autograd thread), which does not see this one's scoped value.
        self._policy = kernels.current()
        self.done: list[Tensor] = []

    def __enter__(self) -> StreamingBackward:
        self._policy = kernels.current()
        self._handles = [p.register_post_accumulate_grad_hook(self._arrived) for p in self._settings]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _arrived(self, param: Tensor) -> None:
        first = self._tasks.take_task(self._first, param)
        if first is None:
            return  # reached by this task only: combined with zeros by the synthesis that follows
        rule, alpha, gamma = self._settings[param]
        grad = param.grad
        forget, retain = (first, grad) if self._task == RETAIN else (grad, first)
        with kernels.using(self._policy), kernels.for_step(self._numel):
            param.grad = combine_one(rule, forget, retain, alpha=alpha, gamma=gamma, geometry=self._geometry)
        self.done.append(param)
