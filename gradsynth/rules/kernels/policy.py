"""The user's backend policy: which family of implementations the selector may choose from.

``backend`` is ``"auto"`` (the default, or environment variable ``GRADSYNTH_BACKEND``): compiled
or C kernels where a tensor qualifies, the eager rules elsewhere; ``"compiled"``: the same, but a
failed compilation raises instead of falling back; ``"eager"``: no generated code at all.
``min_numel`` is the size below which a tensor stays eager (a compiled call costs ~25 us), and
``min_step_numel`` the size of a whole step below which ``"auto"`` stays eager (`for_step`).

Where the policy lives: a process default (`set_backend`, meant for set-up) and a scoped value
(a `contextvars.ContextVar`) that `use_backend` and `for_step` set for a block and reset, on
exit, to exactly what it was before. Nothing rewrites a process-wide value during a step, and a
block in one thread never changes what another thread runs. Code that runs a step's work on
another thread (autograd hooks) takes `current()` along and re-enters it with `using`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

BACKENDS = ("auto", "compiled", "eager")
#: Below this many elements the eager rules are as fast as a compiled call (~25 us overhead).
MIN_NUMEL = 1 << 15
#: Below this many elements in one step's synthesis, ``"auto"`` runs the eager rules (see
#: `for_step`): compiling costs seconds once, up to tens on a cold cache, and at this size the
#: eager rules cost a few milliseconds more per step, so a short run never wins it back.
MIN_STEP_NUMEL = 1 << 24


@dataclass(frozen=True)
class Policy:
    """What the user chose. ``backend`` is None when ``GRADSYNTH_BACKEND`` holds an unknown name:
    raised (naming the variable) at the first synthesis, not at import."""

    backend: str | None = "auto"
    min_numel: int = MIN_NUMEL
    min_step_numel: int = MIN_STEP_NUMEL

    def resolved(self) -> str:
        """The backend name; ``ValueError`` naming ``GRADSYNTH_BACKEND`` if it was unknown."""
        return self.backend if self.backend is not None else backend_from_env()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown synthesis backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def backend_from_env() -> str:
    """``GRADSYNTH_BACKEND`` (default ``"auto"``); ``ValueError`` naming the variable if unknown."""
    name = os.environ.get("GRADSYNTH_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(
            f"GRADSYNTH_BACKEND={name!r} is not a synthesis backend; set one of {', '.join(BACKENDS)} "
            "or unset it"
        )
    return name


def _initial_backend() -> str | None:
    # An unknown value must not make `import gradsynth` fail (a command line could not even
    # report it): it is raised at the first synthesis, and `gradsynth` checks it up front.
    try:
        return backend_from_env()
    except ValueError:
        return None


# The process default (set-up time only) and the scoped value that overrides it inside blocks.
_default: list[Policy] = [Policy(_initial_backend())]
_scoped: ContextVar[Policy | None] = ContextVar("gradsynth_kernel_policy", default=None)


def current() -> Policy:
    """The policy in force here: the innermost scoped one, else the process default."""
    scoped = _scoped.get()
    return _default[0] if scoped is None else scoped


def _changed(policy: Policy, name: str, min_numel: int | None, min_step_numel: int | None) -> Policy:
    return replace(
        policy,
        backend=_check_backend(name),
        min_numel=policy.min_numel if min_numel is None else int(min_numel),
        min_step_numel=policy.min_step_numel if min_step_numel is None else int(min_step_numel),
    )


def set_backend(name: str, *, min_numel: int | None = None, min_step_numel: int | None = None) -> None:
    """Choose how the rules run: ``"auto"`` (fused where possible), ``"compiled"`` or ``"eager"``.

    ``"compiled"`` uses the fused kernels wherever a tensor qualifies and raises if compilation
    fails. ``min_numel`` changes the size below which tensors stay on the eager path, and
    ``min_step_numel`` the size of a whole step below which ``"auto"`` stays eager (`for_step`).
    Inside a `use_backend` block it changes that block's policy only (restored at its end).
    """
    new = _changed(current(), name, min_numel, min_step_numel)
    if _scoped.get() is None:
        _default[0] = new
    else:
        _scoped.set(new)


def get_backend() -> str:
    """The current backend name (see `set_backend`)."""
    return current().resolved()


@contextmanager
def using(policy: Policy) -> Iterator[Policy]:
    """Run a block under ``policy``; on exit the scoped value is what it was before."""
    token = _scoped.set(policy)
    try:
        yield policy
    finally:
        _scoped.reset(token)


@contextmanager
def use_backend(
    name: str, *, min_numel: int | None = None, min_step_numel: int | None = None
) -> Iterator[None]:
    """Run a block with another backend (and size thresholds), restoring the previous ones."""
    with using(_changed(current(), name, min_numel, min_step_numel)):
        yield


@contextmanager
def for_step(numel: int) -> Iterator[None]:
    """Run one step's synthesis over ``numel`` elements in all: eagerly under ``"auto"`` if small.

    The choice depends on the model's size alone, so it is the same on every step, run and
    machine (a resumed run takes the path the uninterrupted one took). ``"compiled"`` and
    ``"eager"`` are left as they are.
    """
    policy = current()
    if policy.backend != "auto" or numel >= policy.min_step_numel:
        yield
        return
    with using(replace(policy, backend="eager")):
        yield
