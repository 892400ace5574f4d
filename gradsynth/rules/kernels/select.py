"""The one choice: which implementation runs an operation, from the resolved arguments.

Every operation lists its implementations as peers (`IMPLEMENTATIONS`, by name), and one
function per kind of operation picks one from what it is called on (dtype, device, size, tensor
kind and layout), what this process can run (C kernels: built, the processor's features, one
torch thread) and the user's policy (`gradsynth.rules.kernels.policy`):

=================== ============================================================================
operation           implementations (chosen in this order)
=================== ============================================================================
``sago``            ``C kernel`` (bfloat16 on the CPU, any size), ``compiled`` (`eligible`),
``prefer_retain``   ``eager`` (everything else: DTensor shards, views, tiny tensors, policy)
``linear``          ``compiled device weight`` (a tensor weight off the CPU, in float64),
                    ``compiled float64`` (a float weight below float32's normal range),
                    ``C kernel`` / ``compiled`` (weight 0 or a normal float32 number up to
                    `MAX_HOST_WEIGHT`), ``eager`` (a NaN, negative or huge weight; as above)
``dots``            ``C kernel`` (float32 or bfloat16 on the CPU, any size), ``compiled``
                    (`eligible`), ``eager`` (float64 chunked sums)
``geometry``        ``C kernel with the rule`` (`fuses_geometry`), else by `select_geometry`:
                    ``C kernel``, ``float64 matrix product``, ``whole tensor`` (the peers are
                    `gradsynth.rules.geometry_sums.MEASURES`)
=================== ============================================================================

Under the ``"eager"`` policy only the eager implementations run. A compiled implementation
that cannot be compiled writes nothing and the caller runs the eager one (`gradsynth.rules.
kernels.ops`), which is what `gradsynth.rules.kernels.report` then reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from gradsynth.rules.kernels import c, compiled, eager
from gradsynth.rules.kernels.bodies import HALF
from gradsynth.rules.kernels.policy import Policy, current

#: Largest weight the CPU kernels take as a float (computing in the gradients' precision);
#: beyond it (PCGrad with a vanishing retain gradient) the eager float64 path runs.
MAX_HOST_WEIGHT = 2.0**64
DTYPES = (torch.float32, torch.float64, *HALF)
_FLOAT32_NORMAL = torch.finfo(torch.float32).smallest_normal


@dataclass(frozen=True)
class Implementation:
    """One way to run ``operation``; ``run`` returns False (writing nothing) where it could not
    run after all (a compiled kernel that failed to compile), None/a value as the operation says."""

    operation: str
    name: str
    run: Callable[..., Any]


def _peers(operation: str, **runs: Callable[..., Any]) -> dict[str, Implementation]:
    return {
        name.replace("_", " "): Implementation(operation, name.replace("_", " "), fn)
        for name, fn in runs.items()
    }


#: operation -> implementation name -> `Implementation`. Elementwise ones take ``(f, r, out, alpha,
#: gamma)``; ``dots`` takes ``(f, r)`` and returns ``(<f, r>, ||r||^2)`` (floats from C, tensors
#: otherwise) or None.
IMPLEMENTATIONS: dict[str, dict[str, Implementation]] = {
    "sago": _peers(
        "sago", C_kernel=partial(c.apply, "sago"), compiled=partial(compiled.apply, "sago"), eager=eager.sago
    ),
    "prefer_retain": _peers(
        "prefer_retain",
        C_kernel=partial(c.apply, "prefer"),
        compiled=partial(compiled.apply, "prefer"),
        eager=eager.prefer_retain,
    ),
    "linear": _peers(
        "linear",
        C_kernel=partial(c.apply, "linear"),
        compiled=partial(compiled.apply, "linear"),
        compiled_float64=partial(compiled.apply, "linear_wide"),
        compiled_device_weight=lambda f, r, out, alpha, gamma: compiled.apply(
            "weighted", f, r, out, alpha.detach().to(r.device, torch.float64), gamma
        ),
        eager=eager.linear,
    ),
    "dots": _peers("dots", C_kernel=c.dots, compiled=compiled.dots, eager=eager.dots),
}


def implementation(operation: str, name: str) -> Implementation:
    """The implementation ``name`` of ``operation`` (``KeyError`` naming both if there is none)."""
    try:
        return IMPLEMENTATIONS[operation][name]
    except KeyError:
        known = {op: list(peers) for op, peers in IMPLEMENTATIONS.items()}
        raise KeyError(f"no implementation {name!r} of {operation!r}; there are {known}") from None


def _plain(tensors: tuple[Tensor, ...]) -> bool:
    """Plain (not subclassed) contiguous tensors of one shape, dtype and device."""
    first = tensors[0]
    shape, dtype, device = first.shape, first.dtype, first.device
    for t in tensors:  # (a loop, not all(...): this runs per tensor of every step)
        if type(t) is not Tensor or t.shape != shape or t.dtype != dtype or t.device != device:
            return False
        if not t.is_contiguous():
            return False
    return True


def _generated_code_allowed(policy: Policy) -> bool:
    return policy.resolved() != "eager"  # (raises naming GRADSYNTH_BACKEND if it was unknown)


def eligible(*tensors: Tensor, policy: Policy | None = None) -> bool:
    """True when the compiled kernels take these tensors (same shape, dtype and device): not under
    ``"eager"``, at least ``min_numel`` elements, plain and contiguous, on the CPU or CUDA."""
    policy = current() if policy is None else policy
    if not _generated_code_allowed(policy):
        return False
    first = tensors[0]
    # Mismatched shapes go to the eager rules, which name them: a kernel would fail its size
    # assertion, or its compilation (switching the kernel off for the process).
    return (
        first.numel() >= policy.min_numel
        and first.device.type in ("cpu", "cuda")
        and first.dtype in DTYPES
        and _plain(tensors)
    )


def c_takes(
    operation: str, *tensors: Tensor, policy: Policy | None = None, plain: bool | None = None
) -> bool:
    """Whether the C kernel of ``operation`` (``apply`` or ``dots``) takes these tensors, any size:
    plain contiguous CPU tensors of one shape, not under ``"eager"``, where it runs (`c.available`).
    ``plain`` is `_plain` of the tensors if the caller knows it (`eligible` implies it)."""
    policy = current() if policy is None else policy
    first = tensors[0]
    return (
        _generated_code_allowed(policy)
        and first.device.type == "cpu"
        and (_plain(tensors) if plain is None else plain)
        and c.available(operation, first.dtype)
    )


def select_elementwise(operation: str, forget: Tensor, retain: Tensor, out: Tensor) -> Implementation:
    """The implementation of ``sago`` or ``prefer_retain`` for these tensors."""
    peers = IMPLEMENTATIONS[operation]
    policy = current()
    if forget.dtype == torch.bfloat16 and c_takes("apply", forget, retain, out, policy=policy):
        return peers["C kernel"]  # (a call costs microseconds: any size)
    return peers["compiled" if eligible(forget, retain, out, policy=policy) else "eager"]


def host_weight_kernel(weight: float) -> str | None:
    """Which compiled linear kernel applies the float ``weight``: ``linear`` (the gradients' precision),
    ``linear_wide`` (float64), or None if only the eager float64 path can."""
    if not 0 <= weight < MAX_HOST_WEIGHT:
        return None  # NaN, negative or beyond the range the float kernels are exact for
    # In float32 a weight below its normal range would lose digits or vanish (the float64 kernel
    # takes it); 0 is exact either way, and the common case.
    return "linear_wide" if 0 < weight < _FLOAT32_NORMAL else "linear"


def select_linear(
    forget: Tensor,
    retain: Tensor,
    out: Tensor,
    weight: float | Tensor,
    *,
    large: bool | None = None,
    bf16_c: bool | None = None,
) -> tuple[Implementation, float | Tensor]:
    """The implementation of ``out = weight * r + gamma * f`` for these tensors, and the weight to
    pass it: a float for the host-float ones, the tensor as given for the others.

    ``weight`` is a float, or a 0-dim tensor (read on the host only for CPU gradients; off the
    CPU applied as a tensor). ``large`` is `eligible` and ``bf16_c`` whether the C bfloat16 apply
    takes the tensors, if the caller has checked them already.
    """
    peers = IMPLEMENTATIONS["linear"]
    policy = current()
    large = eligible(forget, retain, out, policy=policy) if large is None else large
    if bf16_c is None:
        bf16_c = forget.dtype == torch.bfloat16 and c_takes(
            "apply", forget, retain, out, policy=policy, plain=True if large else None
        )
    if large:
        host = weight
        if isinstance(weight, Tensor):
            if retain.device.type != "cpu":
                # On a device, reading the weight would wait for it: apply it as a tensor, in float64.
                return peers["compiled device weight"], weight
            host = float(weight)  # a CPU tensor: reading it waits for nothing
        kernel = host_weight_kernel(host)
        if kernel == "linear_wide":
            return peers["compiled float64"], host
        if kernel == "linear":
            return peers["C kernel" if bf16_c else "compiled"], host
        return peers["eager"], weight
    # Below `min_numel`, bfloat16 CPU tensors still take the C kernel (a call costs microseconds);
    # it computes what the float32 "linear" kernel does, for the weights that kernel takes.
    if bf16_c:
        host = float(weight)  # plain CPU gradients; pcgrad_global moves its weight to their device
        if host_weight_kernel(host) == "linear":
            return peers["C kernel"], host
    return peers["eager"], weight


def select_dots(
    forget: Tensor, retain: Tensor, *, any_size: bool, large: bool | None = None
) -> Implementation:
    """The implementation of ``(<f, r>, ||r||^2)`` for these tensors.

    ``any_size``: the C kernel for tensors of any size (a call costs ~2 us, where the eager
    float64 sums of a small tensor cost tens; the host-float callers); otherwise only where the
    compiled kernel would run too (`eligible`), so that a small tensor's sums are the eager ones.
    ``large`` is `eligible` if the caller has checked it already.
    """
    peers = IMPLEMENTATIONS["dots"]
    policy = current()
    large = eligible(forget, retain, policy=policy) if large is None else large
    if (any_size or large) and c_takes("dots", forget, retain, policy=policy, plain=True if large else None):
        return peers["C kernel"]
    return peers["compiled" if large else "eager"]


def fuses_geometry(
    forget: Tensor, retain: Tensor, out: Tensor, weight: float | None = None, *, large: bool | None = None
) -> bool:
    """Whether a one-loop C kernel of a rule with its geometry sums (`gradsynth.rules.native.
    rule_geometry`) stands in here, on the CPU: where the kernel it repeats would run for the rule
    (``weight`` None: sago or prefer-retain; else the linear apply of that float weight), i.e.
    float32's compiled kernel (`eligible`; ``large`` if the caller has checked it) or bfloat16's C
    kernel (any size); the C loop performs that kernel's operations in order."""
    if forget.device.type != "cpu" or forget.dtype not in (torch.float32, torch.bfloat16):
        return False
    if weight is not None and host_weight_kernel(weight) != "linear":
        return False
    if forget.dtype == torch.bfloat16:
        return c_takes("apply", forget, retain, out)
    return eligible(forget, retain, out) if large is None else large


def select_geometry(forget: Tensor, retain: Tensor, out: Tensor) -> str:
    """How `gradsynth.rules.geometry_sums.measured` takes the sums of these tensors, by name:
    ``"whole tensor"`` (not viewable flat: DTensor shards, non-contiguous views; or empty),
    ``"C kernel"`` (CPU, one dtype, `c.available`), else ``"float64 matrix product"``."""
    if forget.numel() == 0 or not all(type(t) is Tensor and t.is_contiguous() for t in (forget, retain, out)):
        return "whole tensor"
    if (
        forget.device.type == "cpu"
        and out.dtype == forget.dtype == retain.dtype
        and c.available("geometry", forget.dtype)
    ):
        return "C kernel"
    return "float64 matrix product"
