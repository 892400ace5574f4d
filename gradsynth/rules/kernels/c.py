"""The C implementations: thin calls into `gradsynth.rules.native` (built on first use).

``apply(kernel, ...)``: bfloat16 SAGO, prefer-retain and linear, the compiled kernels' float32
operations in their order, bit-identical to them (``bf16.c``); `dots`: float32 or bfloat16
inner products, every product exact in float64 and summed in float64 (``dots.c``). Each runs on
plain contiguous CPU tensors of one shape, on one thread; `available` says whether it runs here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules import native

#: The elementwise kernels `apply` takes.
APPLIES = native.APPLIES


def available(operation: str, dtype: torch.dtype) -> bool:
    """Whether the C kernel of ``operation`` (``apply``, ``dots`` or ``geometry``: the chunk sums of
    `gradsynth.rules.geometry_sums`) runs on ``dtype`` here and now (built and checked, the
    processor's features, one torch thread)."""
    if operation == "geometry":
        return native.geometry_available(dtype)
    if dtype == torch.bfloat16:
        return native.bf16_available()
    if operation == "dots" and dtype == torch.float32:
        return torch.get_num_threads() == 1 and native.library() is not None
    return False


def apply(
    kernel: str, forget: Tensor, retain: Tensor, out: Tensor, alpha: float | Tensor, gamma: float
) -> bool:
    """bfloat16 ``kernel`` of `APPLIES` into ``out``; False (nothing written) where it cannot run."""
    return native.apply_bf16(kernel, out, forget, retain, alpha, gamma)


def dots(forget: Tensor, retain: Tensor) -> tuple[float, float] | None:
    """``(<f, r>, ||r||^2)`` as Python floats, or None where no C kernel runs for this dtype."""
    if forget.dtype == torch.float32:
        return native.dots_f32(forget, retain)
    if forget.dtype == torch.bfloat16:
        return native.dots_bf16(forget, retain)
    return None
