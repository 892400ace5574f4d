"""The eager implementations: chunked torch operations, for every kind of tensor.

They take anything the rules accept (DTensor shards, non-contiguous views, tiny tensors, any
float dtype, any device) and are the reference the other implementations agree with. Long plain
tensors are processed in cache-sized chunks with reused temporaries
(`gradsynth.rules.reductions.flat_chunks`): a whole-tensor eager SAGO costs ~20x an add, ~3x in
chunks. Every function writes into ``out``, which may be ``forget`` or ``retain`` itself: each
chunk of both inputs is read in full before its chunk of ``out`` is written.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradsynth.rules.reductions import dot64, fit, flat_chunks, scratch, sign_conflict


def blend(forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float, keep_retain: bool) -> bool:
    """SAGO (``keep_retain=False``) or prefer-retain into ``out``, with ``c`` the sign conflict::

    sago:          g = c * alpha * r + (1 - c) * gamma * f
    prefer_retain: g = alpha * r + (1 - c) * gamma * f
    """
    chunks = flat_chunks(forget, retain, out, elementwise=True)
    buf_c, buf_k = scratch(chunks, forget.dtype, 2)
    for f, r, o in chunks:
        c, k = fit(buf_c, f), fit(buf_k, f)
        sign_conflict(f, r, out=c, work=k)  # c = 1 where the signs conflict, then k = 1 - c
        forget_part = torch.neg(c, out=k).add_(1).mul_(f)
        if gamma != 1.0:
            forget_part.mul_(gamma)
        if keep_retain:
            # c*alpha*r + (1-c)*(gamma*f + alpha*r) == alpha*r + (1-c)*gamma*f
            retain_part = torch.mul(r, alpha, out=c)
        else:
            retain_part = c.mul_(r)
            if alpha != 1.0:
                retain_part.mul_(alpha)
        # Both inputs are fully read above, so ``o`` may alias either of them.
        torch.add(forget_part, retain_part, out=o)
    return True


def sago(forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float) -> bool:
    """Eager SAGO into ``out`` (see `blend`)."""
    return blend(forget, retain, out, alpha, gamma, False)


def prefer_retain(forget: Tensor, retain: Tensor, out: Tensor, alpha: float, gamma: float) -> bool:
    """Eager prefer-retain SAGO into ``out`` (see `blend`)."""
    return blend(forget, retain, out, alpha, gamma, True)


def linear(forget: Tensor, retain: Tensor, out: Tensor, alpha: float | Tensor, gamma: float) -> bool:
    """``out = gamma * f + alpha * r``; a tensor ``alpha`` is applied in float64, chunk by chunk,
    without reading it on the host (PCGrad's weight may lie beyond the gradients' range)."""
    if isinstance(alpha, Tensor):
        weight = alpha.to(torch.float64)
        chunks = flat_chunks(forget, retain, out)
        buf_f, buf_r = scratch(chunks, torch.float64, 2)
        for f, r, o in chunks:
            f64, r64 = fit(buf_f, f), fit(buf_r, r)
            o.copy_(r64.copy_(r).mul_(weight).add_(f64.copy_(f), alpha=gamma))
        return True
    if out is retain:
        (out if alpha == 1.0 else out.mul_(alpha)).add_(forget, alpha=gamma)
    elif out is forget:
        (out if gamma == 1.0 else out.mul_(gamma)).add_(retain, alpha=alpha)
    else:
        torch.mul(retain, alpha, out=out).add_(forget, alpha=gamma)
    return True


def dots(forget: Tensor, retain: Tensor) -> tuple[Tensor, Tensor]:
    """``(<f, r>, ||r||^2)`` as 0-dim float64 tensors (two chunked float64 reductions)."""
    return dot64(forget, retain), dot64(retain, retain)
