"""Fused kernels: each rule in one pass over memory, compiled with ``torch.compile``.

Synthesis is memory-bound. The eager rules chain several elementwise operations, each a full
pass; a fused kernel reads ``f`` and ``r`` once and writes ``g`` once, the traffic of
``torch.add(f, r, out=g)``. The kernels, written into ``r``, ``f`` or a third tensor::

    c = (f * S) * (r * S) < 0, S = 2**117 (2**600 for float64)   (the signs conflict)
    sago:               g = where(c, a*r + 0*(b*f), b*f + 0*(a*r))
    sago_prefer_retain: g = where(c, a*r + 0*(b*f), a*r + b*f)
    linear:             g = w*r + b*f                    (``sum``; PCGrad's apply, w = a - K)
    dots:               (<f, r>, ||r||^2)                (one read of f and r)

with ``a = alpha`` and ``b = gamma``. The ``0*x`` terms give exactly the non-finite behaviour of
the eager product forms (``0 * inf`` is NaN), so a ``GradScaler`` still sees a forget overflow.

Precision. SAGO's kernels compute half-precision inputs (bfloat16, float16) in float32 and
round once at the end, float32 in float32 and float64 in float64: they agree with the eager path
to a few units in the last place of the gradient's dtype, and exactly when
``alpha = gamma = 1``. The linear kernel (``sum``, PCGrad's apply) computes float32 and
half-precision gradients in float32 as ``w*r + gamma*f`` when the float weight ``w`` is 0 or a
normal float32 number: then ``w*r`` neither underflows nor overflows where it is representable.
A smaller weight (PCGrad's ``w`` can be 1e-67 against a retain coordinate of 1e30) goes to a
float64 kernel, and beyond ``2**64`` the eager float64 path applies it. PCGrad's weight is
read on the CPU (no device to wait for); on a GPU it stays a float64 tensor and the apply
computes in float64. The dots accumulate in float64. For float32 on the CPU with one thread,
a small C kernel that prefetches computes them (`gradsynth.rules.native`: ~0.75x ``torch.add``
where the compiled reduction took 0.9-1.2x on AVX2), falling back to the compiled one; for
bfloat16 likewise on x86 processors with AVX2 and FMA, every product exact in float64. Otherwise,
for half-precision gradients on the CPU, the products are formed in float32 (exact for float16;
exact for bfloat16 unless a product is below ``2**-126``) and summed in float32 over blocks of
4096, then in float64 (relative error ~1e-7).

bfloat16 on the CPU, one thread, AVX2 + FMA: the elementwise kernels (SAGO, prefer-retain,
linear) run as C kernels of `gradsynth.rules.native` too, at any size: the compiled kernels'
float32 operations in the same order, bit-identical to them, without the compiled code's
bfloat16 conversions, which cost it 1.0-1.4x ``torch.add`` on cached tensors on AVX2.

Call overhead. A call through ``torch.compile`` costs tens of microseconds of Python whatever
the size; after a kernel's first run the compiled graph is called directly (see `_run`).

When the kernels run (see `set_backend`): ``"auto"`` (the default, or environment variable
``GRADSYNTH_BACKEND``) uses them for plain dense contiguous tensors of at least `min_numel`
elements on the CPU or a CUDA device, and the eager rules otherwise (tensor subclasses such as
DTensor shards, non-contiguous views, tiny tensors whose call overhead dominates). Where
``torch.compile`` fails, ``"auto"`` warns once and falls back to the eager rules, which give
the same results; ``"compiled"`` raises instead and ``"eager"`` never compiles.

Each kernel is compiled once per dtype and device with dynamic shapes and Python-float weights,
so neither new parameter shapes nor new ``alpha``/``gamma`` values recompile.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules import geometry_sums, native
from gradsynth.rules.reductions import dot64

BACKENDS = ("auto", "compiled", "eager")
#: Below this many elements the eager rules are as fast as a compiled call (~25 us overhead).
MIN_NUMEL = 1 << 15
#: Below this many elements in one step's synthesis, ``"auto"`` runs the eager rules (see
#: `for_step`): compiling costs seconds once, up to tens on a cold cache, and at this size the
#: eager rules cost a few milliseconds more per step, so a short run never wins it back.
MIN_STEP_NUMEL = 1 << 24
#: Largest weight the CPU kernels take as a float (computing in the gradients' precision);
#: beyond it (PCGrad with a vanishing retain gradient) the eager float64 path runs.
MAX_HOST_WEIGHT = 2.0**64
_HALF = (torch.bfloat16, torch.float16)
_DTYPES = (torch.float32, torch.float64, *_HALF)
_BLOCK = 1 << 12
_FLOAT32_NORMAL = torch.finfo(torch.float32).smallest_normal


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


_state: dict[str, Any] = {
    "backend": _initial_backend(),
    "min_numel": MIN_NUMEL,
    "min_step_numel": MIN_STEP_NUMEL,
}
_compiled: dict[str, Callable[..., Any]] = {}
# (kernel, dtype, device type): compiled and run once (True) or failed to compile (False).
_status: dict[tuple[str, torch.dtype, str], bool] = {}


def set_backend(name: str, *, min_numel: int | None = None, min_step_numel: int | None = None) -> None:
    """Choose how the rules run: ``"auto"`` (fused where possible), ``"compiled"`` or ``"eager"``.

    ``"compiled"`` uses the fused kernels wherever a tensor qualifies and raises if compilation
    fails. ``min_numel`` changes the size below which tensors stay on the eager path, and
    ``min_step_numel`` the size of a whole step below which ``"auto"`` stays eager (`for_step`).
    """
    _state["backend"] = _check_backend(name)
    if min_numel is not None:
        _state["min_numel"] = int(min_numel)
    if min_step_numel is not None:
        _state["min_step_numel"] = int(min_step_numel)


def get_backend() -> str:
    """The current backend name (see `set_backend`)."""
    return _state["backend"] or backend_from_env()


@contextmanager
def use_backend(
    name: str, *, min_numel: int | None = None, min_step_numel: int | None = None
) -> Iterator[None]:
    """Run a block with another backend (and size thresholds), restoring the previous ones."""
    saved = dict(_state)
    set_backend(name, min_numel=min_numel, min_step_numel=min_step_numel)
    try:
        yield
    finally:
        _state.update(saved)


@contextmanager
def for_step(numel: int) -> Iterator[None]:
    """Run one step's synthesis over ``numel`` elements in all: eagerly under ``"auto"`` if small.

    The choice depends on the model's size alone, so it is the same on every step, run and
    machine (a resumed run takes the path the uninterrupted one took). ``"compiled"`` and
    ``"eager"`` are left as they are.
    """
    if _state["backend"] != "auto" or numel >= _state["min_step_numel"]:
        yield
        return
    _state["backend"] = "eager"
    try:
        yield
    finally:
        _state["backend"] = "auto"


def status() -> dict[str, str]:
    """For each kernel variant tried so far: ``"compiled"`` or ``"failed (eager fallback)"``; and
    for geometry tracked in the synthesis pass, how its sums were taken (``geometry[dtype,
    device]``: ``"C kernel"``, ``"float64 matrix product"`` or ``"whole tensor"``, see
    `gradsynth.rules.geometry_sums`)."""
    compiled = {
        f"{name}[{str(dtype).removeprefix('torch.')}, {device}]": "compiled"
        if ok
        else "failed (eager fallback)"
        for (name, dtype, device), ok in _status.items()
    }
    return compiled | geometry_sums.status()


def eligible(*tensors: Tensor) -> bool:
    """True when the fused kernels will handle these tensors (same shape, dtype and device)."""
    if _state["backend"] == "eager":
        return False
    if _state["backend"] is None:
        backend_from_env()  # raises, naming the variable
    first = tensors[0]
    # Mismatched shapes go to the eager rules, which name them: a kernel would fail its size
    # assertion, or its compilation (switching the kernel off for the process).
    return (
        first.numel() >= _state["min_numel"]
        and first.device.type in ("cpu", "cuda")
        and first.dtype in _DTYPES
        and all(
            type(t) is Tensor
            and t.shape == first.shape
            and t.is_contiguous()
            and t.dtype == first.dtype
            and t.device == first.device
            for t in tensors
        )
    )


# ----- kernel bodies (traced by torch.compile; plain tensor code) ---------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _conflict(f: Tensor, r: Tensor) -> Tensor:
    # The sign of a product decides, but never of ``f * r`` itself: 1e-30 * -1e-30 underflows to
    # -0 in float32 and would hide the conflict. Scaled up first, the smallest values multiply
    # to a normal number, and the largest overflow to an infinity that keeps its sign. Zeros stay
    # zero (no conflict); a NaN compares false, and both branches below turn it into NaN anyway.
    scale = 2.0**600 if f.dtype == torch.float64 else 2.0**117
    return (f * scale) * (r * scale) < 0


def _sago(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    a, b = alpha * r, gamma * f
    conflict = _conflict(f, r)
    kept, dropped = torch.where(conflict, a, b), torch.where(conflict, b, a)
    # ``kept + 0 * dropped``, but the compiler folds ``0 * x`` to 0; ``x - x`` is 0 for finite x
    # and NaN for inf or NaN (cheaper than an isfinite test, measured on bfloat16).
    return kept + (dropped - dropped)


def _prefer_retain(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    a, b = alpha * r, gamma * f
    return a + torch.where(_conflict(f, r), b - b, b)


def _upcast(*tensors: Tensor) -> list[Tensor]:
    compute = _compute_dtype(tensors[0].dtype)
    return [t.to(compute) for t in tensors]


# One function per rule and per destination of ``g`` (``r``, ``f`` or a third tensor): the
# compiler keeps a small cache of compilations per function, and the aliasings must not share one
# (a kernel compiled with ``g`` written over one input was seen to fail when later called to
# write over the other).


def _sago_into_retain(r: Tensor, f: Tensor, alpha: float, gamma: float) -> None:
    rc, fc = _upcast(r, f)
    r.copy_(_sago(fc, rc, alpha, gamma))


def _sago_into_forget(f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    f.copy_(_sago(fc, rc, alpha, gamma))


def _sago_into_out(out: Tensor, f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    out.copy_(_sago(fc, rc, alpha, gamma))


def _prefer_into_retain(r: Tensor, f: Tensor, alpha: float, gamma: float) -> None:
    rc, fc = _upcast(r, f)
    r.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _prefer_into_forget(f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    f.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _prefer_into_out(out: Tensor, f: Tensor, r: Tensor, alpha: float, gamma: float) -> None:
    fc, rc = _upcast(f, r)
    out.copy_(_prefer_retain(fc, rc, alpha, gamma))


def _linear(f: Tensor, r: Tensor, weight: float, gamma: float, compute: torch.dtype) -> Tensor:
    # ``w * r`` in one product: it cannot overflow or underflow where the result itself does not,
    # as long as ``w`` is itself a normal number of the computing precision (see `linear_into`).
    return r.to(compute) * weight + gamma * f.to(compute)


def _linear_into_retain(r: Tensor, f: Tensor, weight: float, gamma: float) -> None:
    r.copy_(_linear(f, r, weight, gamma, _compute_dtype(r.dtype)))


def _linear_into_forget(f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    f.copy_(_linear(f, r, weight, gamma, _compute_dtype(f.dtype)))


def _linear_into_out(out: Tensor, f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    out.copy_(_linear(f, r, weight, gamma, _compute_dtype(out.dtype)))


# Weights below float32's normal range (PCGrad's weight can be 1e-67 against a retain coordinate
# of 1e30): float64 throughout, where every such weight and product is a normal number.


def _linear_wide_into_retain(r: Tensor, f: Tensor, weight: float, gamma: float) -> None:
    r.copy_(_linear(f, r, weight, gamma, torch.float64))


def _linear_wide_into_forget(f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    f.copy_(_linear(f, r, weight, gamma, torch.float64))


def _linear_wide_into_out(out: Tensor, f: Tensor, r: Tensor, weight: float, gamma: float) -> None:
    out.copy_(_linear(f, r, weight, gamma, torch.float64))


def _weighted(f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> Tensor:
    # A float64 tensor weight (PCGrad on a device, never read on the host): float64 throughout.
    return weight * r.to(weight.dtype) + gamma * f.to(weight.dtype)


def _weighted_into_retain(r: Tensor, f: Tensor, weight: Tensor, gamma: float) -> None:
    r.copy_(_weighted(f, r, weight, gamma))


def _weighted_into_forget(f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> None:
    f.copy_(_weighted(f, r, weight, gamma))


def _weighted_into_out(out: Tensor, f: Tensor, r: Tensor, weight: Tensor, gamma: float) -> None:
    out.copy_(_weighted(f, r, weight, gamma))


def _dots_wide(f: Tensor, r: Tensor) -> Tensor:
    f64, r64 = f.to(torch.float64), r.to(torch.float64)
    return torch.stack([(f64 * r64).sum(), (r64 * r64).sum()])


def _dots_blocked(f: Tensor, r: Tensor) -> Tensor:
    # ``f`` and ``r`` come as (blocks, _BLOCK). float32 products of half-precision values are
    # exact; float32 sums over short blocks stay accurate and vectorise, where a float64
    # conversion of each element does not on the CPU.
    f32, r32 = f.to(torch.float32), r.to(torch.float32)
    fr = (f32 * r32).sum(1).to(torch.float64).sum()
    rr = (r32 * r32).sum(1).to(torch.float64).sum()
    return torch.stack([fr, rr])


_KERNELS: dict[str, Callable[..., Any]] = {
    fn.__name__.lstrip("_"): fn
    for fn in (
        _sago_into_retain,
        _sago_into_forget,
        _sago_into_out,
        _prefer_into_retain,
        _prefer_into_forget,
        _prefer_into_out,
        _linear_into_retain,
        _linear_into_forget,
        _linear_into_out,
        _linear_wide_into_retain,
        _linear_wide_into_forget,
        _linear_wide_into_out,
        _weighted_into_retain,
        _weighted_into_forget,
        _weighted_into_out,
        _dots_wide,
        _dots_blocked,
    )
}


# ----- dispatch -----------------------------------------------------------------------------------


def _capturing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor, keeping the compiled graph so that later calls can skip the frame machinery.

    A call through ``torch.compile`` costs ~40-120 us of Python (frame evaluation, guards,
    wrapping the float weights as tensors) whatever the tensor's size: on the tensors of a
    Llama-shaped gradient list that was up to 6x the kernel's own time. The graph compiled here
    is called directly by `_run` once it has run through ``torch.compile`` and `eligible` has
    checked what the guards would (dtype, device, contiguity; the shapes are dynamic).
    """
    compiled = _compile_fx(gm, example_inputs)
    _captured.append((gm, example_inputs, compiled))
    return compiled


try:  # the inductor entry point torch.compile itself uses; without it, calls go through dynamo
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    _BACKEND: Any = _capturing_backend
except ImportError:  # pragma: no cover - a torch without inductor has no fused path anyway
    _BACKEND = "inductor"

_captured: list[tuple[Any, list[Any], Callable[..., Any]]] = []
# (kernel, dtype, device type) -> (the torch.compile'd kernel it came from, compiled graph, how to
# build the graph's inputs from the call's arguments, whether the kernel returns a value).
_Key = tuple[str, torch.dtype, str]
_direct: dict[
    tuple[str, torch.dtype, torch.device], tuple[Any, Callable[..., Any], list[Callable[..., Any]], bool]
] = {}


def _call_plan(name: str, gm: Any, example_inputs: list[Any]) -> list[Callable[..., Any]] | None:
    """For each input of the compiled graph, how to get it from the kernel's arguments; None if unsure.

    The graph's inputs are the kernel's tensors (named ``l_<arg>_``), its float weights as 0-dim
    float64 tensors (same naming) and the symbolic sizes, each found as a dimension of an input.
    """
    params = list(inspect.signature(_KERNELS[name]).parameters)
    nodes = gm.graph.find_nodes(op="placeholder")
    names = [node.name for node in nodes]
    # The symbolic view of each input (the example inputs themselves are the first call's tensors).
    example_inputs = [node.meta.get("example_value") for node in nodes]
    position = {f"l_{p}_": i for i, p in enumerate(params)}
    plan: list[Callable[..., Any]] = []
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
            plan.append(lambda args, i=i, d=d: args[i].shape[d])
        elif node_name in position and isinstance(example, Tensor):
            i = position[node_name]
            # A size the compiler specialised on (a dimension of 1 on the first call) would only
            # be right for that size: such a graph stays behind dynamo's guards.
            static = [size for size in example.shape if not isinstance(size, torch.SymInt)]
            if static not in ([], [_BLOCK]) or (static and example.shape[-1] != _BLOCK):
                return None
            if example.dim() == 0 and example.dtype == torch.float64:
                plan.append(lambda args, i=i: _scalar(args[i]))
            else:
                plan.append(lambda args, i=i: args[i])
        else:
            return None
    return plan


_scalars: dict[float, Tensor] = {}


def _scalar(value: float | Tensor) -> Tensor:
    """A float weight as the 0-dim float64 tensor the compiled graph takes (cached per value)."""
    if isinstance(value, Tensor):
        return value
    tensor = _scalars.get(value)
    if tensor is None:
        if len(_scalars) > 256:  # PCGrad's weights change every step: keep the cache small
            _scalars.clear()
        tensor = _scalars[value] = torch.tensor(value, dtype=torch.float64)
    return tensor


def _run(name: str, *args: Any, rows: int | None = None) -> Any:
    """Run kernel ``name`` on ``args`` (tensors taken flat, or as ``rows`` blocks of `_BLOCK`).

    Raises `_CompileFailed` (nothing written) if the kernel cannot be compiled.
    """
    first = args[0]
    key = (name, first.dtype, first.device.type)
    # A compiled graph is bound to the device it was compiled for (a GPU's index included),
    # which dynamo's guards would check: the direct call is kept per device.
    direct_key = (name, first.dtype, first.device)
    direct = _direct.get(direct_key)
    kernel = _compiled.get(name)
    if direct is not None and direct[0] is kernel and not first.requires_grad:
        _, compiled, plan, returns = direct
        # No guards here, so plain views will do (cheaper than `_flat`'s aliases).
        shaped = [_view(a, rows) if isinstance(a, Tensor) and a.dim() else a for a in args]
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            outputs = compiled(*[get(shaped) for get in plan])
        finally:
            torch._C._set_grad_enabled(grad)
        return outputs[0] if returns else None
    args = tuple(_flat(a, rows) if isinstance(a, Tensor) and a.dim() else a for a in args)
    if _status.get(key) is False:
        raise _CompileFailed
    if kernel is None:
        kernel = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True, backend=_BACKEND)
        _compiled[name] = kernel
    # Compilation (the first call, or a recompilation for a new case) happens before anything is
    # written, so a failure leaves the inputs intact for the eager path.
    _captured.clear()
    try:
        if _status.get(key) and not torch.is_grad_enabled():
            return kernel(*args)
        # The compiler's own deprecation notices are not the user's business, and under
        # ``-W error`` they would abort the compilation.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = kernel(*args)
    except Exception as error:
        if _state["backend"] == "compiled":
            raise
        _status[key] = False
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        warnings.warn(
            f"gradsynth: torch.compile failed for the {name} kernel on {first.dtype} ({reason}); using "
            "the eager rules, which give the same results 3-6x slower. Set GRADSYNTH_BACKEND=eager "
            "to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        raise _CompileFailed from error
    _status[key] = True
    if len(_captured) == 1 and not first.requires_grad:
        gm, example_inputs, compiled = _captured[0]
        plan = _call_plan(name, gm, example_inputs)
        if plan is not None:
            _direct[direct_key] = (kernel, compiled, plan, result is not None)
    _captured.clear()
    return result


class _CompileFailed(Exception):
    """A kernel could not be compiled; the caller takes the eager path."""


def _flat(t: Tensor, rows: int | None = None) -> Tensor:
    """``t``'s memory as a 1-D tensor, or its first ``rows * _BLOCK`` elements as (rows, _BLOCK).

    Not a view: the compiler guards on the shape of a view's base tensor, and would compile
    again for each number of dimensions; an alias made with ``set_`` has no base.
    """
    shape, strides = ((t.numel(),), (1,)) if rows is None else ((rows, _BLOCK), (_BLOCK, 1))
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), shape, strides)


def _view(t: Tensor, rows: int | None = None) -> Tensor:
    """`_flat` as a plain view, for the direct calls that no guard inspects."""
    flat = t.view(-1)
    return flat if rows is None else flat[: rows * _BLOCK].view(rows, _BLOCK)


def _into(kernel: str, forget: Tensor, retain: Tensor, out: Tensor, *args: Any) -> bool:
    """Write ``kernel(f, r)`` into ``out``; False (nothing written) if the eager path must run.

    bfloat16 CPU tensors take the C kernel where one runs (`gradsynth.rules.native.apply_bf16`:
    the same float32 operations, without the compiled code's slow conversions on AVX2).
    """
    if (
        forget.dtype == torch.bfloat16
        and forget.device.type == "cpu"
        and kernel in native.APPLIES
        and native.apply_bf16(kernel, out, forget, retain, *args)
    ):
        return True
    aliased = "forget" if out is forget else "retain" if out is retain else None
    try:
        if aliased == "forget":
            _run(f"{kernel}_into_forget", forget, retain, *args)
        elif aliased == "retain":
            _run(f"{kernel}_into_retain", retain, forget, *args)
        else:
            # A kernel of its own, not a copy then the in-place kernel (5 passes over memory, not
            # 3: that cost 1.9x the add). Compilation comes before any write, so a failure leaves
            # ``out`` untouched.
            _run(f"{kernel}_into_out", out, forget, retain, *args)
    except _CompileFailed:
        return False
    return True


def sago_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """Fused `gradsynth.rules.sago`; returns False, writing nothing, where eager must run."""
    return _sized(forget, retain, out) and _into("sago", forget, retain, out, alpha, gamma)


def prefer_retain_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """Fused `gradsynth.rules.sago_prefer_retain`; False where eager must run."""
    return _sized(forget, retain, out) and _into("prefer", forget, retain, out, alpha, gamma)


def _sized(*tensors: Tensor) -> bool:
    # Below `min_numel`, bfloat16 CPU tensors still take the C kernels (a call costs microseconds).
    return eligible(*tensors) or _small_bf16(*tensors)


def linear_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float | Tensor, gamma: float) -> bool:
    """Fused ``gamma*f + alpha*r`` (``alpha`` a float or a 0-dim tensor); False where eager must run."""
    if eligible(forget, retain, out):
        return _linear_into(forget, retain, out, alpha, gamma)
    # Below `min_numel`, bfloat16 CPU tensors still take the C kernel (a call costs microseconds).
    return _small_bf16(forget, retain, out) and _native_linear_into(forget, retain, out, float(alpha), gamma)


def _small_bf16(*tensors: Tensor) -> bool:
    return _plain_cpu(torch.bfloat16, *tensors) and native.bf16_available()


def _host_weight(alpha: float) -> str | None:
    """Which linear kernel applies the float weight ``alpha``; None if only eager float64 can."""
    if not 0 <= alpha < MAX_HOST_WEIGHT:
        return None  # NaN, negative or beyond the range the float kernels are exact for
    # In float32 a weight below its normal range would lose digits or vanish (the float64 kernel
    # takes it); 0 is exact either way, and the common case.
    return "linear_wide" if 0 < alpha < _FLOAT32_NORMAL else "linear"


def float32_linear_applies(forget: Tensor, retain: Tensor, out: Tensor, weight: float) -> bool:
    """Whether the float32 ``linear`` kernel (not the float64 or eager one) applies ``weight`` here."""
    return (
        forget.dtype == torch.float32 and _host_weight(weight) == "linear" and eligible(forget, retain, out)
    )


def _native_linear_into(forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float) -> bool:
    # The C kernel computes what the float32 "linear" kernel does (the caller checked the tensors).
    return _host_weight(alpha) == "linear" and native.apply_bf16("linear", out, forget, retain, alpha, gamma)


def _host_linear_into(forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float) -> bool:
    kernel = _host_weight(alpha)
    return kernel is not None and _into(kernel, forget, retain, out, alpha, gamma)


def _linear_into(forget: Tensor, retain: Tensor, out: Tensor, alpha: float | Tensor, gamma: float) -> bool:
    if isinstance(alpha, Tensor):
        if retain.device.type != "cpu":
            # On a device, reading the weight would wait for it: apply it as a tensor, in float64.
            weight = alpha.detach().to(retain.device, torch.float64)
            return _into("weighted", forget, retain, out, weight, gamma)
        alpha = float(alpha)  # a CPU tensor: reading it waits for nothing
    return _host_linear_into(forget, retain, out, alpha, gamma)


def dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors in one read, or None where eager must run."""
    return _dots(forget, retain) if eligible(forget, retain) else None


def _dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor] | None:
    pair = _native_dots(forget, retain)
    if pair is not None:
        both = torch.tensor(pair, dtype=torch.float64)
        return both[0], both[1]
    return _compiled_dots(forget, retain)


def _compiled_dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor] | None:
    rows = forget.numel() // _BLOCK
    try:
        if forget.dtype in _HALF and forget.device.type == "cpu" and rows > 0:
            pair = _run("dots_blocked", forget, retain, rows=rows)
            if rows * _BLOCK < forget.numel():  # the last partial block, short: summed eagerly
                f, r = forget.reshape(-1)[rows * _BLOCK :], retain.reshape(-1)[rows * _BLOCK :]
                pair = pair + torch.stack([dot64(f, r), dot64(r, r)])
        else:
            pair = _run("dots_wide", forget, retain)
    except _CompileFailed:
        return None
    return pair[0], pair[1]


def _plain_cpu(dtype: torch.dtype, *tensors: Tensor) -> bool:
    """Plain contiguous CPU tensors of ``dtype`` and one shape, any size: what the C kernels take.

    Not under the "eager" backend, which runs no generated code.
    """
    if _state["backend"] is None:
        backend_from_env()  # raises, naming the variable
    first = tensors[0]
    return (
        _state["backend"] != "eager"
        and first.dtype == dtype
        and first.device.type == "cpu"
        and all(
            type(t) is Tensor
            and t.shape == first.shape
            and t.dtype == dtype
            and t.device == first.device
            and t.is_contiguous()
            for t in tensors
        )
    )


def _native_dots(forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    # Any size: a call of the C kernel costs ~2 us, where the eager float64 sums of a small
    # tensor cost tens.
    kernel = _NATIVE_DOTS.get(forget.dtype)
    return kernel(forget, retain) if kernel is not None and _plain_cpu(forget.dtype, forget, retain) else None


_NATIVE_DOTS: dict[torch.dtype, Callable[[Tensor, Tensor], tuple[float, float] | None]] = {
    torch.float32: lambda f, r: native.dots_f32(f, r),
    torch.bfloat16: lambda f, r: native.dots_bf16(f, r),
}


def host_dots(forget: Tensor, retain: Tensor) -> tuple[float, float]:
    """``(<f, r>, ||r||^2)`` of plain CPU tensors as Python floats (float64), on every path.

    On the CPU, reading a result waits for nothing; floats spare the tiny tensor operations
    that would otherwise cost more than a small tensor's kernel.
    """
    pair = _native_dots(forget, retain)
    if pair is None and eligible(forget, retain):
        pair = _compiled_floats(forget, retain)
    if pair is None:
        pair = dot64(forget, retain).item(), dot64(retain, retain).item()
    return pair


def _compiled_floats(forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    """The compiled one-read inner products as Python floats (CPU only: reading waits for nothing)."""
    both = _compiled_dots(forget, retain)
    return None if both is None else (both[0].item(), both[1].item())


_TINY64 = torch.finfo(torch.float64).tiny


def pcgrad_into(forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float) -> bool:
    """Fused `gradsynth.rules.pcgrad` on the CPU; False (nothing written) where the caller must run it.

    Tensors that `eligible` takes, and bfloat16 tensors of any size where the C kernels run:
    `pcgrad_weight`, then `pcgrad_apply`.
    """
    plan = pcgrad_weight(forget, retain, out, alpha=alpha, gamma=gamma)
    return plan is not None and pcgrad_apply(forget, retain, out, *plan, gamma=gamma)


def pcgrad_weight(
    forget: Tensor, retain: Tensor, out: Tensor, *, alpha: float, gamma: float
) -> tuple[float, bool] | None:
    """PCGrad's retain weight ``alpha - gamma * k`` of one CPU tensor as a float, and whether the
    tensor is large enough for the compiled apply (else the C one); None where eager must run.

    The two inner products come from one read (`dots`); the weight is then formed from them as
    Python floats, which are float64 like the tensor formula of
    `gradsynth.rules.pcgrad.projection_coefficient` and give the same value (the same IEEE
    operations, NaN and infinity included) without its half-dozen tiny tensor operations per
    parameter. Reading the products waits for nothing on the CPU.
    """
    if retain.device.type != "cpu":
        return None
    # Checked once: each check costs microseconds, a mid-size tensor's kernel not much more.
    large = eligible(forget, retain, out)
    if not (large or _small_bf16(forget, retain, out)):
        return None  # (a small bfloat16 tensor takes the C kernels: microseconds, not 200 of eager)
    kernel = _NATIVE_DOTS.get(forget.dtype)
    pair = kernel(forget, retain) if kernel is not None else None
    if pair is None:
        pair = _compiled_floats(forget, retain)
    if pair is None:
        return None  # not compiled: the eager rule runs, nothing was written
    fr, rr = pair
    k = fr / max(rr, _TINY64) if fr < 0 else 0.0
    return alpha - gamma * k, large


def pcgrad_apply(
    forget: Tensor, retain: Tensor, out: Tensor, weight: float, large: bool, *, gamma: float
) -> bool:
    """``out = weight * r + gamma * f`` with the kernel `pcgrad_weight` chose; False if eager must run."""
    if large:
        return _host_linear_into(forget, retain, out, weight, gamma)
    return _native_linear_into(forget, retain, out, weight, gamma)
