"""The gradient-geometry sums of one tensor, taken in the same pass that writes its update.

For a forget gradient ``f``, retain gradient ``r`` and update ``g`` the sums are, in this order
(`SUMS`), as one float64 tensor of 7 values::

    ||f||^2, ||r||^2, <f, r>, ||g||^2, <g, f>, <g, r>, #{i : sign(f_i) = -sign(r_i) != 0}

A rule writes ``g`` over ``f`` or ``r`` (the optimizer's in-place synthesis), so the sums that
involve ``g`` must be taken while ``f`` and ``r`` are still there: `measured` runs a rule a
chunk at a time into a cache-sized scratch buffer, adds that chunk's sums, and only then writes
the chunk of ``g`` into ``out``. No gradient-sized temporary is needed; each chunk is read from
memory once.

Precision: every product is formed exactly in float64 and summed in float64, as
`gradsynth.rules.reductions.dot64` does. For float32 and bfloat16 on the CPU with one thread a C
kernel (`gradsynth.rules.native.add_geometry`) takes the sums of a chunk in one read of the
cached ``f``, ``r``, ``g``; elsewhere each chunk is widened to float64 and the six inner products
come from one float64 matrix product of the ``3 x chunk`` matrix with its transpose.

Nothing is read on the host: the sums stay tensors on the gradients' device (for DTensor shards,
partial sums that the caller reduces once per step). A *sink* receives them: any object with
``add_sums(sums, numel)`` (`gradsynth.optim.geometry.GeometryAccumulator`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from gradsynth.rules import native
from gradsynth.rules.kernels import report
from gradsynth.rules.kernels.select import select_geometry
from gradsynth.rules.reductions import dot64, sign_conflict

SUMS = ("ff", "rr", "fr", "gg", "gf", "gr", "conflicts")
#: Elements per measured chunk: float64 widenings of 3 such chunks (6 MiB on the CPU) stay in cache.
MEASURE_CHUNK = 1 << 18
ACCELERATOR_MEASURE_CHUNK = 1 << 22
# Where each sum sits in the flat Gram matrix of the rows (f, r, g), per device: made there
# once, since a copy from the host each time would wait for the device.
_GRAM_INDEX = (0, 4, 1, 8, 6, 7)
_gram_index: dict[torch.device, Tensor] = {}


def _index_on(device: torch.device) -> Tensor:
    index = _gram_index.get(device)
    if index is None:
        index = _gram_index[device] = torch.tensor(_GRAM_INDEX, device=device)
    return index


# How the sums were taken, per (dtype, device type), is recorded as operation "geometry" of
# `gradsynth.rules.kernels.report`: "C kernel with the rule" (`fused_measured`), "C kernel",
# "float64 matrix product" (no C kernel here: more than one thread, another dtype, or no
# compiler) or "whole tensor" (a DTensor shard or a non-contiguous view).
_RULE_OPERATION = {"sago": "sago", "prefer": "prefer_retain", "linear": "linear"}


def _took(dtype: torch.dtype, device: str, how: str) -> None:
    report.record("geometry", dtype, device, how)


def status() -> dict[str, str]:
    """How the geometry sums were taken, per dtype and device, so far in this process."""
    return {key: how for key, how in report.status().items() if key.startswith("geometry[")}


class GeometrySink(Protocol):
    """Receives one tensor's geometry sums (see the module docstring)."""

    def add_sums(self, sums: Tensor, numel: int) -> None: ...


def sums_of(forget: Tensor, retain: Tensor, update: Tensor) -> Tensor:
    """The 7 sums of whole tensors (any kind: DTensor shards give partial sums), out of place."""
    return torch.stack(
        [
            dot64(forget, forget),
            dot64(retain, retain),
            dot64(forget, retain),
            dot64(update, update),
            dot64(update, forget),
            dot64(update, retain),
            sign_conflict(forget, retain).sum(dtype=torch.float64),
        ]
    )


def fused_measured(
    kind: str, forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float, sink: GeometrySink
) -> bool:
    """``sago``, ``prefer`` or ``linear`` (see `native.rule_geometry`) with its sums in one loop,
    where the caller has checked (`gradsynth.rules.kernels.fuses_geometry`) that the kernel this
    loop repeats would run: float32's compiled kernel, bfloat16's C kernel; False (nothing
    written) where it cannot."""
    sums = torch.zeros(7, dtype=torch.float64)
    if not native.rule_geometry(kind, out, forget, retain, alpha, gamma, sums):
        return False
    _took(forget.dtype, "cpu", "C kernel with the rule")
    # (the rule's own update came from the same loop, standing in for its compiled kernel)
    report.record(_RULE_OPERATION[kind], forget.dtype, "cpu", "C kernel with the geometry")
    sink.add_sums(sums, forget.numel())
    return True


def _chunk_size(device: torch.device) -> int:
    return MEASURE_CHUNK if device.type == "cpu" else ACCELERATOR_MEASURE_CHUNK


def measured(
    combine: Callable[[Tensor, Tensor, Tensor], object],
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    sink: GeometrySink,
) -> Tensor:
    """``combine(f, r, g)`` chunk by chunk, adding the geometry sums to ``sink``; ``g`` lands in ``out``.

    ``combine`` writes the update of its chunk into its third argument (a scratch buffer) and
    must not write its inputs; ``out`` may be ``forget`` or ``retain``. How the sums are taken is
    chosen by `gradsynth.rules.kernels.select.select_geometry` among `MEASURES`.
    """
    how = select_geometry(forget, retain, out)
    _took(forget.dtype, forget.device.type, how)
    return MEASURES[how](combine, forget, retain, out, sink)


def _whole(
    combine: Callable[[Tensor, Tensor, Tensor], object],
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    sink: GeometrySink,
) -> Tensor:
    """Any tensors (DTensor shards: partial sums; non-contiguous views): combined whole into a
    temporary the size of the parameter, then measured by `sums_of`."""
    update = torch.empty_like(out)
    combine(forget, retain, update)
    sink.add_sums(sums_of(forget, retain, update), forget.numel())
    out.copy_(update)
    return out


def _chunking(forget: Tensor) -> tuple[int, int]:
    """``(numel, chunk size)``: chunks of equal size (within one element), each as large as a tensor
    of half the chunk size or more, so a kernel chooses for a chunk what it would for the whole."""
    numel = forget.numel()
    count = -(-numel // _chunk_size(forget.device))
    return numel, -(-numel // count)


def _c_chunks(
    combine: Callable[[Tensor, Tensor, Tensor], object],
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    sink: GeometrySink,
) -> Tensor:
    """Plain CPU tensors of one dtype: each chunk's sums by the C kernel, in one read of the cached
    ``f``, ``r``, ``g`` (`gradsynth.rules.native.add_geometry`)."""
    numel, size = _chunking(forget)
    scratch = torch.empty(size, dtype=out.dtype)
    flats = [t.view(-1) for t in (forget, retain, out)]
    sums = torch.zeros(7, dtype=torch.float64)
    for start in range(0, numel, size):
        f, r, o = (t[start : start + size] for t in flats)
        g = scratch[: f.numel()]
        combine(f, r, g)
        native.add_geometry(sums, f, r, g)
        o.copy_(g)
    sink.add_sums(sums, numel)
    return out


def _gram_chunks(
    combine: Callable[[Tensor, Tensor, Tensor], object],
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    sink: GeometrySink,
) -> Tensor:
    """Plain tensors on any device: each chunk widened to float64, the six inner products from one
    float64 matrix product of the ``3 x chunk`` matrix with its transpose."""
    numel, size = _chunking(forget)
    device = forget.device
    scratch = torch.empty(size, dtype=out.dtype, device=device)
    flats = [t.view(-1) for t in (forget, retain, out)]
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    wide = torch.empty(3, size, dtype=torch.float64, device=device)
    sign_f = torch.empty(size, dtype=forget.dtype, device=device)
    sign_r = torch.empty(size, dtype=forget.dtype, device=device)
    gram = torch.zeros(3, 3, dtype=torch.float64, device=device)
    for start in range(0, numel, size):
        f, r, o = (t[start : start + size] for t in flats)
        n = f.numel()
        g = scratch[:n]
        combine(f, r, g)
        rows = wide[:, :n]
        rows[0].copy_(f)
        rows[1].copy_(r)
        rows[2].copy_(g)
        gram.addmm_(rows, rows.t())
        sums[6] += sign_conflict(f, r, out=sign_f[:n], work=sign_r[:n]).sum(dtype=torch.float64)
        o.copy_(g)
    sums[:6] = gram.view(-1)[_index_on(device)]
    sink.add_sums(sums, numel)
    return out


#: The peers that take the geometry sums while a rule writes its update, by the name
#: `gradsynth.rules.kernels.select.select_geometry` gives (and `status` reports).
MEASURES: dict[str, Callable[..., Tensor]] = {
    "whole tensor": _whole,
    "C kernel": _c_chunks,
    "float64 matrix product": _gram_chunks,
}
