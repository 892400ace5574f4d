"""The one place that relies on torch's private details: calling a compiled graph directly.

A call through ``torch.compile`` costs ~40-120 us of Python (frame evaluation, guards, wrapping
the float weights as tensors) whatever the tensor's size: on the tensors of a Llama-shaped
gradient list that was up to 6x the kernel's own time. So the compiled implementations
(`gradsynth.rules.kernels.compiled`) compile through `BACKEND`, which is inductor keeping the graph
it compiled, and once a kernel has run through ``torch.compile`` call that graph directly,
after the selector has checked what the guards would (dtype, device, contiguity; the shapes are
dynamic).

What this depends on, beyond documented API (checked by ``tests/test_kernels.py``, which fails
loudly when torch changes it):

- ``torch._inductor.compile_fx.compile_fx``, the entry point ``torch.compile`` itself uses;
- the graph's placeholders are named ``l_<argument>_`` after the kernel's parameters, and
  their ``meta["example_value"]`` holds the symbolic (``SymInt``) sizes, matched by their
  printed expressions (``str(size.node.expr)``);
- the compiled graph takes (tensors, 0-dim float64 tensors for the float weights, sizes) and
  returns a sequence of outputs.

Where any of it does not hold, `plan` returns None and every call goes through ``torch.compile``
(correct, only slower).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules.kernels.bodies import BLOCK

_captured: list[tuple[Any, list[Any], Callable[..., Any]]] = []
# (kernel, dtype, device) -> (the torch.compile'd kernel it came from, compiled graph, how to
# build the graph's inputs from the call's arguments, whether the kernel returns a value). A
# compiled graph is bound to the device it was compiled for (a GPU's index included), which
# dynamo's guards would check: the direct call is kept per device.
_direct: dict[
    tuple[str, torch.dtype, torch.device], tuple[Any, Callable[..., Any], list[Callable[..., Any]], bool]
] = {}
_scalars: dict[float, Tensor] = {}


def _capturing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor, keeping the compiled graph so that later calls can skip the frame machinery."""
    compiled = _compile_fx(gm, example_inputs)
    _captured.append((gm, example_inputs, compiled))
    return compiled


try:  # the inductor entry point torch.compile itself uses; without it, calls go through dynamo
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    #: The ``backend=`` the compiled implementations pass to ``torch.compile``.
    BACKEND: Any = _capturing_backend
except ImportError:  # pragma: no cover - a torch without inductor has no fused path anyway
    BACKEND = "inductor"


def begin() -> None:
    """Forget graphs captured so far: the next `remember` sees only this call's compilation."""
    _captured.clear()


def remember(name: str, kernel: Callable[..., Any], params: list[str], first: Tensor, returns: bool) -> None:
    """After ``kernel`` ran through ``torch.compile`` once: keep its graph for direct calls, if
    exactly one was compiled and `plan` understands it."""
    if len(_captured) == 1 and not first.requires_grad:
        gm, example_inputs, compiled = _captured[0]
        steps = plan(params, gm, example_inputs)
        if steps is not None:
            _direct[(name, first.dtype, first.device)] = (kernel, compiled, steps, returns)
    _captured.clear()


def known(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether kernel ``name`` is called directly on tensors of ``dtype`` on ``device``."""
    return (name, dtype, device) in _direct


def call(name: str, kernel: Callable[..., Any], args: tuple[Any, ...], rows: int | None) -> tuple[bool, Any]:
    """``(True, result)`` of the direct call of ``kernel``'s graph, or ``(False, None)`` if none is kept."""
    first = args[0]
    direct = _direct.get((name, first.dtype, first.device))
    if direct is None or direct[0] is not kernel or first.requires_grad:
        return False, None
    _, compiled, steps, returns = direct
    # No guards here, so plain views will do (cheaper than the aliases dynamo needs).
    shaped = [_view(a, rows) if isinstance(a, Tensor) and a.dim() else a for a in args]
    grad = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        outputs = compiled(*[get(shaped) for get in steps])
    finally:
        torch._C._set_grad_enabled(grad)
    return True, (outputs[0] if returns else None)


def _view(t: Tensor, rows: int | None = None) -> Tensor:
    """``t`` flat, or its first ``rows * BLOCK`` elements as (rows, BLOCK), as a plain view."""
    flat = t.view(-1)
    return flat if rows is None else flat[: rows * BLOCK].view(rows, BLOCK)


def parameters(fn: Callable[..., Any]) -> list[str]:
    """The names of ``fn``'s parameters, in order (what the placeholders are named after)."""
    return list(inspect.signature(fn).parameters)


def plan(params: list[str], gm: Any, example_inputs: list[Any]) -> list[Callable[..., Any]] | None:
    """For each input of the compiled graph, how to get it from the kernel's arguments; None if unsure.

    The graph's inputs are the kernel's tensors (named ``l_<arg>_``), its float weights as 0-dim
    float64 tensors (same naming) and the symbolic sizes, each found as a dimension of an input.
    """
    nodes = gm.graph.find_nodes(op="placeholder")
    names = [node.name for node in nodes]
    # The symbolic view of each input (the example inputs themselves are the first call's tensors).
    example_inputs = [node.meta.get("example_value") for node in nodes]
    position = {f"l_{p}_": i for i, p in enumerate(params)}
    steps: list[Callable[..., Any]] = []
    for node_name, example in zip(names, example_inputs, strict=True):
        if isinstance(example, torch.SymInt):
            where = [
                (position[n], d)
                for n, e in zip(names, example_inputs, strict=True)
                if n in position and isinstance(e, Tensor)
                for d, size in enumerate(e.shape)
                if isinstance(size, torch.SymInt) and str(size.node.expr) == str(example.node.expr)
            ]
            if not where:
                return None
            i, d = where[0]
            steps.append(lambda args, i=i, d=d: args[i].shape[d])
        elif node_name in position and isinstance(example, Tensor):
            i = position[node_name]
            # A size the compiler specialised on (a dimension of 1 on the first call) would only
            # be right for that size: such a graph stays behind dynamo's guards.
            static = [size for size in example.shape if not isinstance(size, torch.SymInt)]
            if static not in ([], [BLOCK]) or (static and example.shape[-1] != BLOCK):
                return None
            if example.dim() == 0 and example.dtype == torch.float64:
                steps.append(lambda args, i=i: scalar(args[i]))
            else:
                steps.append(lambda args, i=i: args[i])
        else:
            return None
    return steps


def scalar(value: float | Tensor) -> Tensor:
    """A float weight as the 0-dim float64 tensor the compiled graph takes (cached per value)."""
    if isinstance(value, Tensor):
        return value
    tensor = _scalars.get(value)
    if tensor is None:
        if len(_scalars) > 256:  # PCGrad's weights change every step: keep the cache small
            _scalars.clear()
        tensor = _scalars[value] = torch.tensor(value, dtype=torch.float64)
    return tensor
