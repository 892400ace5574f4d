"""The fused kernels' former home, kept so that existing imports work: everything here is
`gradsynth.rules.kernels`, which decides how each rule's tensor operation runs (eager, compiled,
C) and reports what ran (`status`).

When the kernels run (see `set_backend`): ``"auto"`` (the default, or environment variable
``GRADSYNTH_BACKEND``) uses them for plain dense contiguous tensors of at least ``min_numel``
elements on the CPU or a CUDA device (bfloat16 CPU tensors take the C kernels at any size), and
the eager rules otherwise; where ``torch.compile`` fails, ``"auto"`` warns once and falls back to
the eager rules, which give the same results; ``"compiled"`` raises instead and ``"eager"``
never compiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules.kernels import (
    BACKENDS,
    MAX_HOST_WEIGHT,
    MIN_NUMEL,
    MIN_STEP_NUMEL,
    backend_from_env,
    dots,
    eligible,
    for_step,
    fuses_geometry,
    get_backend,
    host_dots,
    linear_into,
    pcgrad_apply,
    pcgrad_into,
    pcgrad_weight,
    prefer_retain_into,
    sago_into,
    set_backend,
    status,
    use_backend,
)


def float32_linear_applies(forget: Tensor, retain: Tensor, out: Tensor, weight: float) -> bool:
    """Whether the float32 ``linear`` kernel (not the float64 or eager one) applies ``weight`` here."""
    return forget.dtype == torch.float32 and fuses_geometry(forget, retain, out, weight)


__all__ = [
    "BACKENDS",
    "MAX_HOST_WEIGHT",
    "MIN_NUMEL",
    "MIN_STEP_NUMEL",
    "backend_from_env",
    "dots",
    "eligible",
    "float32_linear_applies",
    "for_step",
    "get_backend",
    "host_dots",
    "linear_into",
    "pcgrad_apply",
    "pcgrad_into",
    "pcgrad_weight",
    "prefer_retain_into",
    "sago_into",
    "set_backend",
    "status",
    "use_backend",
]
