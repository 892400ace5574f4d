"""Test helpers: losses whose gradients are chosen exactly, and reading an update back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def linear_loss(params: Sequence[Tensor], targets: Sequence[Tensor | None]) -> Tensor:
    """``sum_i <p_i, t_i>``: its gradient w.r.t. ``p_i`` is exactly ``t_i`` (None: p_i not reached)."""
    terms = [(p * t).sum() for p, t in zip(params, targets, strict=True) if t is not None]
    return torch.stack(terms).sum()


def zero_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    return [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]


def update_of(params: Sequence[Tensor]) -> list[Tensor]:
    """With zero-initialised params and SGD(lr=1), the step's gradient is ``-p``."""
    return [-p.detach().clone() for p in params]
