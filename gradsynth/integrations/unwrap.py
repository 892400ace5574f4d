"""Finding the `SynthesizingOptimizer` inside the wrappers a training stack puts around it.

Accelerate wraps an optimizer in ``AcceleratedOptimizer`` (its ``.optimizer`` is ours); other
stacks do the same with an ``.optimizer`` attribute. The search follows ``.optimizer`` links
from the outside in and stops at the first `SynthesizingOptimizer`, whose own ``.optimizer``
is the base optimizer.
"""

from __future__ import annotations

from typing import Any

from gradsynth.optim import SynthesizingOptimizer

# Deep enough for any real stack (Accelerate adds one level, DeepSpeed two); a cycle cannot hang us.
_MAX_DEPTH = 8


def find_synthesizing_optimizer(optimizer: Any) -> SynthesizingOptimizer | None:
    """The `SynthesizingOptimizer` that ``optimizer`` is or wraps, or ``None`` if there is none."""
    current = optimizer
    for _ in range(_MAX_DEPTH):
        if isinstance(current, SynthesizingOptimizer):
            return current
        current = getattr(current, "optimizer", None)
        if current is None:
            return None
    return None


def require_synthesizing_optimizer(optimizer: Any) -> SynthesizingOptimizer:
    """Like `find_synthesizing_optimizer`, but a missing wrapper is an error that names the fix."""
    found = find_synthesizing_optimizer(optimizer)
    if found is None:
        raise TypeError(
            f"{type(optimizer).__name__} is not a SynthesizingOptimizer and wraps none; wrap the base "
            "optimizer before accelerator.prepare: "
            "optimizer = SynthesizingOptimizer(torch.optim.AdamW(model.parameters()), rule='sago')"
        )
    return found
