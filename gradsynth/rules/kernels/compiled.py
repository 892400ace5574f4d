"""The compiled implementations: the bodies of `gradsynth.rules.kernels.bodies` run through
``torch.compile`` (inductor), one compilation per variant with dynamic shapes and Python-float
weights, so neither new parameter shapes nor new ``alpha``/``gamma`` values recompile.

`apply` writes ``kernel(f, r)`` into ``r``, ``f`` or a third tensor (one compiled variant per
destination: the compiler keeps a small cache per function, and a kernel compiled with ``g``
written over one input was seen to fail when later called to write over the other); `dots`
returns ``(<f, r>, ||r||^2)``. Both return None/False, writing nothing, where the kernel cannot
be compiled: under the ``"auto"`` backend that warns once per (variant, dtype, device) and the
caller runs the eager implementation; under ``"compiled"`` the error is raised.

After a kernel's first run its graph is called directly (`gradsynth.rules.kernels.direct_call`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules.kernels import direct_call, policy, report
from gradsynth.rules.kernels.bodies import BLOCK, HALF, KERNELS
from gradsynth.rules.reductions import dot64

# variant name -> its torch.compile'd function (compiled lazily, per dtype and device inside).
_compiled: dict[str, Callable[..., Any]] = {}
_parameters = {name: direct_call.parameters(fn) for name, fn in KERNELS.items()}


class CompileFailed(Exception):
    """A kernel could not be compiled; the caller takes the eager path (nothing was written)."""


def run(name: str, *args: Any, rows: int | None = None) -> Any:
    """Run compiled variant ``name`` on ``args`` (tensors taken flat, or as ``rows`` blocks of `BLOCK`).

    Raises `CompileFailed` (nothing written) if the kernel cannot be compiled.
    """
    first = args[0]
    kernel = _compiled.get(name)
    hit, result = direct_call.call(name, kernel, args, rows)
    if hit:
        return result
    key = (name, first.dtype, first.device.type)
    args = tuple(flat(a, rows) if isinstance(a, Tensor) and a.dim() else a for a in args)
    if report.compiled.get(key) is False:
        raise CompileFailed
    if kernel is None:
        kernel = torch.compile(KERNELS[name], dynamic=True, fullgraph=True, backend=direct_call.BACKEND)
        _compiled[name] = kernel
    # Compilation (the first call, or a recompilation for a new case) happens before anything is
    # written, so a failure leaves the inputs intact for the eager path.
    direct_call.begin()
    try:
        if report.compiled.get(key) and not torch.is_grad_enabled():
            return kernel(*args)
        # The compiler's own deprecation notices are not the user's business, and under
        # ``-W error`` they would abort the compilation.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = kernel(*args)
    except Exception as error:
        if policy.current().backend == "compiled":
            raise
        report.compiled[key] = False
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        warnings.warn(
            f"gradsynth: torch.compile failed for the {name} kernel on {first.dtype} ({reason}); using "
            "the eager rules, which give the same results 3-6x slower. Set GRADSYNTH_BACKEND=eager "
            "to skip the attempt.",
            RuntimeWarning,
            stacklevel=5,
        )
        raise CompileFailed from error
    report.compiled[key] = True
    direct_call.remember(name, kernel, _parameters[name], first, result is not None)
    return result


def flat(t: Tensor, rows: int | None = None) -> Tensor:
    """``t``'s memory as a 1-D tensor, or its first ``rows * BLOCK`` elements as (rows, BLOCK).

    Not a view: the compiler guards on the shape of a view's base tensor, and would compile
    again for each number of dimensions; an alias made with ``set_`` has no base.
    """
    shape, strides = ((t.numel(),), (1,)) if rows is None else ((rows, BLOCK), (BLOCK, 1))
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), shape, strides)


def apply(kernel: str, forget: Tensor, retain: Tensor, out: Tensor, *args: Any) -> bool:
    """Write compiled ``kernel`` (``sago``, ``prefer``, ``linear``, ``linear_wide``, ``weighted``)
    of ``(f, r, *args)`` into ``out``; False (nothing written) if it cannot be compiled."""
    try:
        if out is forget:
            run(f"{kernel}_into_forget", forget, retain, *args)
        elif out is retain:
            run(f"{kernel}_into_retain", retain, forget, *args)
        else:
            # A kernel of its own, not a copy then the in-place kernel (5 passes over memory, not
            # 3: that cost 1.9x the add). Compilation comes before any write, so a failure leaves
            # ``out`` untouched.
            run(f"{kernel}_into_out", out, forget, retain, *args)
    except CompileFailed:
        return False
    return True


def dots_variant(forget: Tensor) -> str:
    """Which compiled inner-product variant runs on ``forget``'s kind of tensor."""
    rows = forget.numel() // BLOCK
    return (
        "dots_blocked" if forget.dtype in HALF and forget.device.type == "cpu" and rows > 0 else "dots_wide"
    )


def dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors in one compiled read; None if not compiled.

    Half-precision CPU tensors: float32 products (exact for float16; for bfloat16 unless below
    ``2**-126``) summed in float32 over blocks of `BLOCK`, then in float64 (`dots_variant`).
    """
    try:
        if dots_variant(forget) == "dots_blocked":
            rows = forget.numel() // BLOCK
            pair = run("dots_blocked", forget, retain, rows=rows)
            if rows * BLOCK < forget.numel():  # the last partial block, short: summed eagerly
                f, r = forget.reshape(-1)[rows * BLOCK :], retain.reshape(-1)[rows * BLOCK :]
                pair = pair + torch.stack([dot64(f, r), dot64(r, r)])
        else:
            pair = run("dots_wide", forget, retain)
    except CompileFailed:
        return None
    return pair[0], pair[1]
