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


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def task_losses(model: torch.nn.Module, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A forget loss (gradient ascent, -CE) and a retain loss (CE) on random batches fixed by ``seed``."""
    g = torch.Generator().manual_seed(100 + seed)
    xf, xr = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    yf, yr = torch.randint(0, 3, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)
    ce = torch.nn.functional.cross_entropy
    return -ce(model(xf), yf), ce(model(xr), yr)


def collect(opt, model: torch.nn.Module, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One micro-batch of each task through ``opt.backward_forget`` / ``opt.backward_retain``."""
    lf, lr = task_losses(model, seed)
    opt.backward_forget(lf)
    opt.backward_retain(lr)
    return lf, lr


def train_steps(opt, model: torch.nn.Module, steps: int, start: int = 0) -> None:
    """``steps`` full optimizer steps of `collect`'s two tasks, seeds ``start, start + 1, ...``."""
    for step in range(start, start + steps):
        opt.zero_grad()
        collect(opt, model, step)
        opt.step()


def without_progress(err: str) -> str:
    """``err`` without the progress lines (``gradsynth [  1.2s] ...``) a slow phase writes."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("gradsynth ["))
