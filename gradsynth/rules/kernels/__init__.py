"""How a rule's tensor operation runs: every implementation as a peer, one selector, one status.

Synthesis is memory-bound: the eager rules chain several elementwise operations, each a full
pass, where a fused kernel reads ``f`` and ``r`` once and writes ``g`` once, the traffic of
``torch.add(f, r, out=g)``. Each operation therefore has several implementations, in the shape of
``torch.optim``'s single-tensor / foreach / fused ones behind one choice:

- `eager` — chunked torch operations; any tensor (DTensor shards, views, tiny tensors);
- `compiled` — the bodies of `bodies` through ``torch.compile`` (one pass over memory), with the
  direct call of `direct_call` (the one place that relies on torch's private details);
- `c` — the C kernels of `gradsynth.rules.native` (float32 inner products, bfloat16 SAGO,
  prefer-retain, linear and inner products; one thread).

`select` holds the operations' peers (``select.IMPLEMENTATIONS``) and the one choice among them,
made from the resolved arguments and the user's `policy` (a scoped value, never a process-wide
one rewritten during a step); `ops` runs the choice, falls back to eager where compilation
fails, and records it for `status`, which reports which implementation ran for each
(operation, dtype, device), the C kernels included.

Precision. SAGO's kernels compute half-precision inputs (bfloat16, float16) in float32 and
round once at the end, float32 in float32 and float64 in float64: they agree with the eager path
to a few units in the last place of the gradient's dtype, and exactly when ``alpha = gamma = 1``.
The linear kernel (``sum``, PCGrad's apply) computes float32 and half-precision gradients in
float32 as ``w*r + gamma*f`` when the float weight ``w`` is 0 or a normal float32 number: then
``w*r`` neither underflows nor overflows where it is representable. A smaller weight (PCGrad's
``w`` can be 1e-67 against a retain coordinate of 1e30) goes to a float64 kernel, and beyond
``2**64`` the eager float64 path applies it. PCGrad's weight is read on the CPU (no device to
wait for); on a GPU it stays a float64 tensor and the apply computes in float64. The inner
products accumulate in float64 (C: every product exact; compiled half precision on the CPU:
float32 block sums of 4096 products, then float64, relative error ~1e-7). The C elementwise
kernels perform the compiled kernels' float32 operations in the same order: bit-identical.
"""

from __future__ import annotations

from gradsynth.rules.kernels.ops import (
    dots,
    host_dots,
    inner_products,
    linear,
    linear_into,
    pcgrad_apply,
    pcgrad_into,
    pcgrad_weight,
    prefer_retain,
    prefer_retain_into,
    sago,
    sago_into,
)
from gradsynth.rules.kernels.policy import (
    BACKENDS,
    MIN_NUMEL,
    MIN_STEP_NUMEL,
    Policy,
    backend_from_env,
    current,
    for_step,
    get_backend,
    set_backend,
    use_backend,
    using,
)
from gradsynth.rules.kernels.report import history, status
from gradsynth.rules.kernels.select import (
    IMPLEMENTATIONS,
    MAX_HOST_WEIGHT,
    Implementation,
    eligible,
    fuses_geometry,
    implementation,
)

__all__ = [
    "BACKENDS",
    "IMPLEMENTATIONS",
    "MAX_HOST_WEIGHT",
    "MIN_NUMEL",
    "MIN_STEP_NUMEL",
    "Implementation",
    "Policy",
    "backend_from_env",
    "current",
    "dots",
    "eligible",
    "for_step",
    "fuses_geometry",
    "get_backend",
    "history",
    "host_dots",
    "implementation",
    "inner_products",
    "linear",
    "linear_into",
    "pcgrad_apply",
    "pcgrad_into",
    "pcgrad_weight",
    "prefer_retain",
    "prefer_retain_into",
    "sago",
    "sago_into",
    "set_backend",
    "status",
    "use_backend",
    "using",
]
