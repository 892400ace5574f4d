"""Slow, obviously correct float64 reference implementations of the rules.

Plain Python floats and loops over coordinates: nothing here shares code with gradsynth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _floats(t: Tensor) -> list[float]:
    return [float(x) for x in t.detach().to(torch.float64).reshape(-1).tolist()]


def _conflict(f: float, r: float) -> bool:
    return (f > 0 and r < 0) or (f < 0 and r > 0)


def sago(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    out = [
        alpha * ri if _conflict(fi, ri) else gamma * fi for fi, ri in zip(_floats(f), _floats(r), strict=True)
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(f.shape)


def sago_prefer_retain(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    out = [
        alpha * ri if _conflict(fi, ri) else gamma * fi + alpha * ri
        for fi, ri in zip(_floats(f), _floats(r), strict=True)
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(f.shape)


def weighted_sum(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    out = [gamma * fi + alpha * ri for fi, ri in zip(_floats(f), _floats(r), strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(f.shape)


def _project(fs: list[list[float]], rs: list[list[float]]) -> float:
    """The projection coefficient k = <f, r>/|r|^2 if <f, r> < 0 else 0, over all given tensors."""
    dot = math.fsum(fi * ri for f, r in zip(fs, rs, strict=True) for fi, ri in zip(f, r, strict=True))
    rr = math.fsum(ri * ri for r in rs for ri in r)
    return dot / rr if dot < 0 else 0.0


def pcgrad(f: Tensor, r: Tensor, alpha: float, gamma: float) -> Tensor:
    fl, rl = _floats(f), _floats(r)
    k = _project([fl], [rl])
    out = [gamma * (fi - k * ri) + alpha * ri for fi, ri in zip(fl, rl, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(f.shape)


def pcgrad_global(
    fs: list[Tensor], rs: list[Tensor], alphas: list[float], gammas: list[float]
) -> list[Tensor]:
    """Project the scope's gamma-weighted forget gradient: g_j = gamma_j f_j - K r_j + alpha_j r_j."""
    fl, rl = [_floats(f) for f in fs], [_floats(r) for r in rs]
    weighted = [[gamma * x for x in f] for f, gamma in zip(fl, gammas, strict=True)]
    k = _project(weighted, rl)
    results = []
    for f, fvals, rvals, alpha, gamma in zip(fs, fl, rl, alphas, gammas, strict=True):
        out = [gamma * fi - k * ri + alpha * ri for fi, ri in zip(fvals, rvals, strict=True)]
        results.append(torch.tensor(out, dtype=torch.float64).reshape(f.shape))
    return results


def blur(fs: list[Tensor], rs: list[Tensor], alphas: list[float], gammas: list[float]) -> list[Tensor]:
    """Project the scope's alpha-weighted retain gradient off f: g_j = alpha_j r_j - C f_j + gamma_j f_j."""
    fl, rl = [_floats(f) for f in fs], [_floats(r) for r in rs]
    pairs = zip(fl, rl, alphas, strict=True)
    dot = math.fsum(alpha * ri * fi for f, r, alpha in pairs for fi, ri in zip(f, r, strict=True))
    ff = math.fsum(fi * fi for f in fl for fi in f)
    c = dot / ff if ff > 0 else 0.0
    results = []
    for f, fvals, rvals, alpha, gamma in zip(fs, fl, rl, alphas, gammas, strict=True):
        out = [alpha * ri - c * fi + gamma * fi for fi, ri in zip(fvals, rvals, strict=True)]
        results.append(torch.tensor(out, dtype=torch.float64).reshape(f.shape))
    return results


GLOBAL = {"pcgrad_global": pcgrad_global, "blur": blur}

PER_TENSOR = {
    "sago": sago,
    "sago_prefer_retain": sago_prefer_retain,
    "sum": weighted_sum,
    "pcgrad": pcgrad,
}


def synthesize(
    rule: str, fs: list[Tensor], rs: list[Tensor], alphas: list[float], gammas: list[float]
) -> list[Tensor]:
    """The oracle update for every tensor, given one rule for all of them."""
    if rule in GLOBAL:
        return GLOBAL[rule](fs, rs, alphas, gammas)
    fn = PER_TENSOR[rule]
    return [fn(f, r, a, g) for f, r, a, g in zip(fs, rs, alphas, gammas, strict=True)]


def geometry(fs: list[Tensor], rs: list[Tensor], gs: list[Tensor]) -> dict[str, float]:
    f = [x for t in fs for x in _floats(t)]
    r = [x for t in rs for x in _floats(t)]
    g = [x for t in gs for x in _floats(t)]

    def dot(a: list[float], b: list[float]) -> float:
        return math.fsum(x * y for x, y in zip(a, b, strict=True))

    def cos(a: list[float], b: list[float]) -> float:
        return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))

    return {
        "cos_fr": cos(f, r),
        "cos_gr": cos(g, r),
        "cos_gf": cos(g, f),
        "conflict_fraction": sum(_conflict(a, b) for a, b in zip(f, r, strict=True)) / len(f),
        "norm_f": math.sqrt(dot(f, f)),
        "norm_r": math.sqrt(dot(r, r)),
        "norm_g": math.sqrt(dot(g, g)),
    }


def dots(f: Tensor, r: Tensor) -> tuple[float, float]:
    """``(<f, r>, ||r||^2)``, exactly rounded (every product of two float32 values is exact in float64)."""
    fs, rs = _floats(f), _floats(r)
    return math.fsum(a * b for a, b in zip(fs, rs, strict=True)), math.fsum(b * b for b in rs)
