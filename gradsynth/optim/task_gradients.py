"""Bookkeeping of the two task gradients between ``backward_*`` calls and the synthesis.

Invariant after every ``backward_forget`` / ``backward_retain`` call: each task's accumulated
gradient lives in its own stash, and ``p.grad`` holds nothing pending: it is ``None`` or a
*known-empty buffer* (a zeroed ``p.grad`` we must not take, such as a DDP bucket view, or one
that ``zero_grad(set_to_none=False)`` zeroed). So whatever the next backward adds to ``p.grad``
belongs, without doubt, to the next task named, and a gradient that arrives with no task named
afterwards is caught (its buffer is not ``None`` and not known-empty).

A known-empty buffer is recognised by its version counter (``Tensor._version``, host metadata:
reading it costs no device sync), which every in-place write bumps.

Memory (gradient sets beyond params + one gradient set, as plain training holds):

- moving ``p.grad`` into an empty stash is a pointer move (the tensor is taken over and
  ``p.grad`` is set to ``None``); into a filled stash it is one ``add_``;
- when the task is known before the backward (``backward_forget(loss)``), the task's stash is
  put back into ``p.grad`` first, so autograd accumulates straight into it: at most one extra
  gradient set, whatever the accumulation pattern;
- when the backward ran elsewhere (``backward_forget(None)``), a backward on top of two filled
  stashes allocates a third set for its fresh gradient.

Buffers we do not own (``p.grad`` is a view into someone's storage) are copied, never taken.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

FORGET = "forget"
RETAIN = "retain"
TASKS = (FORGET, RETAIN)


def other_task(task: str) -> str:
    """The task that is not ``task``."""
    return RETAIN if task == FORGET else FORGET


def _check_dense(param: Tensor, grad: Tensor) -> None:
    if grad.layout != torch.strided:
        kind = "sparse" if grad.is_sparse or "sparse" in str(grad.layout) else str(grad.layout)
        raise RuntimeError(
            f"gradsynth cannot synthesize a {kind} gradient (parameter of shape {tuple(param.shape)}): "
            "the rules are defined on dense gradients. Use a dense layout, e.g. "
            "nn.Embedding(..., sparse=False)."
        )


def _owned(grad: Tensor) -> bool:
    """True when the gradient tensor is not a view into storage that someone else manages."""
    return grad._base is None


class TaskGradients:
    """Per-parameter stashes of the forget and retain gradients of the current step."""

    def __init__(self) -> None:
        self._stash: dict[str, dict[Tensor, Tensor]] = {task: {} for task in TASKS}
        # p.grad buffers whose content is accounted for (known empty, or holding this step's
        # synthesized update), with their version counter when last seen so.
        self._known: dict[Tensor, int] = {}

    @property
    def pending(self) -> bool:
        """True when either task holds a gradient that has not been synthesized."""
        return any(self._stash[task] for task in TASKS)

    def _holds_new_values(self, param: Tensor) -> bool:
        grad = param.grad
        return grad is not None and self._known.get(param) != grad._version

    def _remember_known(self) -> None:
        # Views of one storage share one version counter: read them after all the writing.
        for p in list(self._known):
            if p.grad is None:
                del self._known[p]
            else:
                self._known[p] = p.grad._version

    def mark_empty(self, params: Iterable[Tensor]) -> None:
        """Record that every non-None ``p.grad`` holds nothing (after ``zero_grad(set_to_none=False)``)."""
        for p in params:
            if p.grad is not None:
                self._known[p] = -1
        self._remember_known()

    def before_backward(self, task: str, params: Iterable[Tensor]) -> None:
        """Put ``task``'s stash back into ``p.grad`` so the next backward adds into it.

        An empty ``p.grad`` takes the stash over; an existing buffer (a DDP bucket view) gets it
        added in place. Under DDP's ``no_sync`` this matters: the next synchronised backward
        all-reduces whatever ``p.grad`` holds, so the task's un-reduced micro-batches must be
        there, not in the stash. What such a buffer already holds goes to ``task``, as the
        following `absorb` would have attributed it anyway (DDP re-creates its bucket views,
        zero-filled copies, when it rebuilds its buckets after the first iteration).
        """
        stash = self._stash[task]
        buffers = []
        for p in params:
            if p not in stash:
                continue
            if p.grad is None:
                p.grad = stash.pop(p)
            else:
                buffers.append((p, self._holds_new_values(p)))
        # Decide first, write after: views of one storage share a version counter, so a write
        # into one bucket view makes its siblings look written.
        for p, holds_values in buffers:
            if holds_values:
                p.grad.add_(stash.pop(p))
            else:
                p.grad.copy_(stash.pop(p))
            self._known.pop(p, None)
        if buffers:
            self._remember_known()

    def absorb(self, task: str, params: Iterable[Tensor]) -> None:
        """Move what ``p.grad`` accumulated since the last call into ``task``'s stash."""
        fresh = []
        for p in params:
            if p.grad is not None:
                _check_dense(p, p.grad)
            if self._holds_new_values(p):
                fresh.append(p)
        stash = self._stash[task]
        for p in fresh:
            grad = p.grad
            held = stash.get(p)
            if _owned(grad):
                if held is None:
                    stash[p] = grad
                else:
                    held.add_(grad)
                p.grad = None
            else:
                if held is None:
                    stash[p] = grad.clone()
                else:
                    held.add_(grad)
                grad.zero_()
                self._known[p] = -1
        self._remember_known()

    def unattributed(self, params: Iterable[Tensor]) -> Tensor | None:
        """A parameter whose ``p.grad`` gained values after the last ``backward_*`` call, if any."""
        return next((p for p in params if self._holds_new_values(p)), None)

    def take(self, param: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Remove and return ``(forget, retain)`` of one parameter; ``None`` for a task that missed it."""
        return self._stash[FORGET].pop(param, None), self._stash[RETAIN].pop(param, None)

    def take_task(self, task: str, param: Tensor) -> Tensor | None:
        """Remove and return one task's gradient of one parameter (``None`` if it missed it)."""
        return self._stash[task].pop(param, None)

    def holds(self, task: str) -> bool:
        """True when ``task`` has a pending gradient for any parameter."""
        return bool(self._stash[task])

    def settle(self, params: Iterable[Tensor]) -> None:
        """Record that these ``p.grad`` hold this step's synthesized update, not a new gradient."""
        for p in params:
            self._known[p] = p.grad._version

    def peek(self, param: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(forget, retain)`` of one parameter, left in place."""
        return self._stash[FORGET].get(param), self._stash[RETAIN].get(param)

    def reached(self, param: Tensor) -> bool:
        """True when either task holds a gradient for ``param``."""
        return param in self._stash[FORGET] or param in self._stash[RETAIN]

    def place(self, param: Tensor, update: Tensor) -> None:
        """Make ``update`` the parameter's gradient (copied into a known-empty buffer if there is one)."""
        if param.grad is None:
            param.grad = update
        else:
            param.grad.copy_(update)
            self._known.pop(param, None)

    def clear(self) -> None:
        """Drop every pending task gradient and every record of empty buffers."""
        for task in TASKS:
            self._stash[task].clear()
        self._known.clear()
