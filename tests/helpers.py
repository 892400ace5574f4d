"""Test helpers: losses whose gradients are chosen exactly, and reading an update back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

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


# Relative to the size of the terms |alpha*r| + |gamma*f| (a sum may cancel): a few roundings.
TERM_TOLERANCE = {torch.float32: 4e-7, torch.bfloat16: 1.6e-2, torch.float64: 1e-15}


def assert_near_terms(
    got: Tensor, expected: Tensor, f: Tensor, r: Tensor, alpha: float, gamma: float
) -> None:
    """``got`` within a few roundings of ``expected``, relative to ``|alpha*r| + |gamma*f|``."""
    scale = alpha * r.double().abs() + gamma * f.double().abs()
    error = (got.double() - expected.double()).abs()
    bound = TERM_TOLERANCE[f.dtype] * scale
    assert torch.all(error <= bound), f"max error/bound {(error / bound.clamp_min(1e-300)).max():.3g}"


def rule_pair(
    dtype: torch.dtype, n: int = 5003, shape: tuple[int, ...] | None = None
) -> tuple[Tensor, Tensor]:
    """A random ``(f, r)`` of ``dtype`` with zeros (never conflicts) and exact opposites (conflicts)."""
    f, r = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    f[::7] = 0.0  # zeros are never conflicts
    r[::11] = -f[::11]  # exact opposites are
    f, r = f.to(dtype), r.to(dtype)
    return (f, r) if shape is None else (f.view(shape), r.view(shape))


@contextlib.contextmanager
def cache_env(cache: Path) -> Iterator[None]:
    """``GRADSYNTH_CACHE`` set to ``cache`` for the block, and restored (or unset) after it. For
    module-scoped fixtures, where pytest's function-scoped ``monkeypatch`` is not available."""
    old = os.environ.get("GRADSYNTH_CACHE")
    os.environ["GRADSYNTH_CACHE"] = str(cache)
    try:
        yield
    finally:
        if old is None:
            del os.environ["GRADSYNTH_CACHE"]
        else:
            os.environ["GRADSYNTH_CACHE"] = old


def one_line(capsys, *parts: str) -> str:
    """The command's stderr, checked to be one ``gradsynth: error:`` line (progress lines aside)
    containing every one of ``parts``."""
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: "), err
    for part in parts:
        assert part in err, err
    return err
