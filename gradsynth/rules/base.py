"""The rule protocol: how a forget gradient ``f`` and a retain gradient ``r`` become one update ``g``.

A rule works in two phases, so that rules which need quantities over many tensors (a global
projection) and rules that look at one tensor at a time share one interface:

1. ``context = rule.prepare(forgets, retains, alpha=alphas, gamma=gammas)`` once per synthesis,
   over every parameter the rule governs (its *scope*; ``alphas``/``gammas`` hold each tensor's
   weights), for quantities that span tensors. Most rules return ``None``.
2. ``rule.combine(f, r, alpha=..., gamma=..., out=..., context=context)`` once per parameter
   tensor, writing ``g`` into ``out``.

``out`` may be ``f`` itself, ``r`` itself (the same object) or a separate tensor of the same
shape, dtype and device, so ``combine`` must read what it needs before it writes. ``alpha``
weights the retain part and ``gamma`` the forget part, both non-negative. Nothing may call
``.item()``, ``float()`` or branch in Python on tensor values: on an accelerator that is a host
sync per parameter, and on a sharded tensor it silently reads the local part only. (The fused
kernels read PCGrad's inner products and weight only for plain CPU tensors, where neither applies.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

#: A rule written as a plain function: ``fn(forget, retain, *, alpha, gamma) -> g``.
RuleFunction = Callable[..., Tensor]


class Rule(ABC):
    """Base class of every synthesis rule; subclass it to write your own (see the docs)."""

    #: The name the rule is registered and saved under.
    name: str = ""
    #: True when `combine` takes ``geometry=``, a sink for the tensor's geometry sums taken in the
    #: same pass that writes ``out`` (`gradsynth.rules.geometry_sums`). Otherwise the optimizer
    #: combines into a new tensor and measures ``f``, ``r`` and ``g`` after.
    measures_geometry: bool = False

    def prepare(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        *,
        alpha: Sequence[float],
        gamma: Sequence[float],
    ) -> Any:
        """Compute quantities that span the whole scope; the default needs none."""
        return None

    @abstractmethod
    def combine(
        self,
        forget: Tensor,
        retain: Tensor,
        *,
        alpha: float,
        gamma: float,
        out: Tensor,
        context: Any = None,
    ) -> None:
        """Write the synthesized gradient of one parameter tensor into ``out``."""

    def __repr__(self) -> str:
        # A rule registered under a name of its own (a renamed copy) says so.
        renamed = self.name != type(self).name
        return f"{type(self).__name__}({f'name={self.name!r}' if renamed else ''})"


class FunctionRule(Rule):
    """Adapts a per-tensor function ``fn(f, r, *, alpha, gamma) -> g`` to the `Rule` protocol.

    The function may return a new tensor; it is copied into ``out``. It sees one parameter
    tensor at a time and gets no context.
    """

    def __init__(self, fn: RuleFunction, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a rule function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def combine(
        self,
        forget: Tensor,
        retain: Tensor,
        *,
        alpha: float,
        gamma: float,
        out: Tensor,
        context: Any = None,
    ) -> None:
        result = self.fn(forget, retain, alpha=alpha, gamma=gamma)
        if not isinstance(result, Tensor) or result.shape != out.shape:
            got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
            raise ValueError(
                f"rule function {self.name!r} must return a tensor of shape {tuple(out.shape)}, got {got}"
            )
        if result is not out:
            out.copy_(result)

    def __repr__(self) -> str:
        return f"FunctionRule({self.name!r})"


class TensorRule(Rule):
    """A rule that is one function of a tensor pair, ``fn(f, r, *, alpha, gamma, out, geometry)``
    (`sago`, `sago_prefer_retain`, `pcgrad`, `weighted_sum`): `combine` calls it, geometry included."""

    measures_geometry = True
    #: The per-tensor function (a ``staticmethod`` of the subclass).
    function: Callable[..., Tensor]

    def combine(
        self,
        forget: Tensor,
        retain: Tensor,
        *,
        alpha: float,
        gamma: float,
        out: Tensor,
        context: Any = None,
        geometry: Any = None,
    ) -> None:
        type(self).function(forget, retain, alpha=alpha, gamma=gamma, out=out, geometry=geometry)
