"""Reference-style synthesis, the way research code commonly writes it: the baseline to beat.

Written here from the paper's formulas in that style (clones of both gradients, boolean-mask
indexing into a zeroed result, a host ``.item()`` per tensor, a concatenated copy for the global
projection, a new result list). Used only by the benchmarks, to measure how much faster and leaner
the library's rules are on the same gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sago(forget: list[Tensor], retain: list[Tensor], alpha: float, gamma: float) -> list[Tensor]:
    out = []
    for f, r in zip(forget, retain, strict=True):
        f, r = f.clone(), r.clone()
        conflict = (f * r) < 0
        g = torch.zeros_like(f)
        g[conflict] = alpha * r[conflict]
        g[~conflict] = gamma * f[~conflict]
        out.append(g)
    return out


def sago_prefer_retain(
    forget: list[Tensor], retain: list[Tensor], alpha: float, gamma: float
) -> list[Tensor]:
    out = []
    for f, r in zip(forget, retain, strict=True):
        f, r = f.clone(), r.clone()
        conflict = (f * r) < 0
        g = torch.zeros_like(f)
        g[conflict] = alpha * r[conflict]
        g[~conflict] = gamma * f[~conflict] + alpha * r[~conflict]
        out.append(g)
    return out


def weighted_sum(forget: list[Tensor], retain: list[Tensor], alpha: float, gamma: float) -> list[Tensor]:
    return [gamma * f.clone() + alpha * r.clone() for f, r in zip(forget, retain, strict=True)]


def pcgrad(forget: list[Tensor], retain: list[Tensor], alpha: float, gamma: float) -> list[Tensor]:
    out = []
    for f, r in zip(forget, retain, strict=True):
        f, r = f.clone(), r.clone()
        dot = (f * r).sum().item()
        if dot < 0:
            f = f - dot / (r.norm() ** 2).item() * r
        out.append(gamma * f + alpha * r)
    return out


def pcgrad_global(forget: list[Tensor], retain: list[Tensor], alpha: float, gamma: float) -> list[Tensor]:
    f = torch.cat([t.flatten() for t in forget])
    r = torch.cat([t.flatten() for t in retain])
    dot = (f * r).sum().item()
    if dot < 0:
        f = f - dot / (r.norm() ** 2).item() * r
    g = gamma * f + alpha * r
    return [piece.view_as(t) for piece, t in zip(g.split([t.numel() for t in retain]), retain, strict=True)]


RULES = {
    "sago": sago,
    "sago_prefer_retain": sago_prefer_retain,
    "sum": weighted_sum,
    "pcgrad": pcgrad,
    "pcgrad_global": pcgrad_global,
}
