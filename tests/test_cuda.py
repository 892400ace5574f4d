"""The synthesis on a CUDA device: results, non-finite values, AMP, no host sync, streaming, 8-bit bases.

Marked ``cuda`` (``pytest -m cuda``) and skipped without a CUDA device; ``benchmarks/gpu_check.py``
runs them on a lent GPU and its ``--dry-run`` collects them on the CPU, so they cannot rot.

- every rule, fused (``"compiled"``) and eager, against the float64 oracle in float32, bfloat16
  and float16;
- a non-finite task gradient reaches the update; a float16 ``GradScaler`` skips a step whose
  forget gradient overflowed where retain wins;
- ``step()``'s synthesis makes no host sync, for every rule, with and without geometry and
  streaming, checked with ``torch.cuda.set_sync_debug_mode("error")`` (it raises on any
  synchronising CUDA call);
- ``streaming=True`` gives the update of the plain path;
- bitsandbytes' 8-bit AdamW as the base takes the synthesized gradient.
"""

from __future__ import annotations

import contextlib

import oracle
import pytest
import torch
from conftest import RULES
from helpers import linear_loss

from gradsynth import SynthesizingOptimizer
from gradsynth.rules import fused

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ["compiled", "eager"]
STREAMABLE = ["sago", "sago_prefer_retain", "pcgrad", "sum"]
# Relative to the size of the terms |alpha*r| + |gamma*f| (a sum may cancel): a few roundings.
TOLERANCE = {torch.float32: 4e-7, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Above `fused.MIN_NUMEL`, so that "compiled" runs the fused kernels on every tensor.
SIZES = [(40, 1000), (1 << 15,), (3, 12289)]


def _pairs(dtype: torch.dtype, sizes=SIZES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fs, rs = [], []
    for shape in sizes:
        f = torch.randn(shape, generator=g, dtype=torch.float64)
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        f.view(-1)[::7] = 0.0  # zeros are never conflicts
        r.view(-1)[::11] = -f.view(-1)[::11]  # exact opposites are
        fs.append(f.to(DEVICE, dtype))
        rs.append(r.to(DEVICE, dtype))
    return fs, rs


def _synthesize(rule: str, fs, rs, alphas, gammas, backend: str):
    """The update of one ``SynthesizingOptimizer`` step (SGD, lr=1, from zero), a param group per tensor."""
    params = [torch.zeros_like(f, requires_grad=True) for f in fs]
    groups = [{"params": [p], "alpha": a, "gamma": g} for p, a, g in zip(params, alphas, gammas, strict=True)]
    opt = SynthesizingOptimizer(torch.optim.SGD(groups, lr=1.0), rule)
    with fused.use_backend(backend):
        opt.backward_forget(linear_loss(params, fs))
        opt.backward_retain(linear_loss(params, rs))
        opt.step()
    return [-p.detach() for p in params]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", RULES)
def test_fused_and_eager_match_the_oracle_on_cuda(rule, dtype):
    dtype = DTYPES[dtype]
    fs, rs = _pairs(dtype)
    alphas, gammas = [0.75, 1.0, 0.5], [1.5, 1.0, 2.0]
    expected = oracle.synthesize(rule, [f.cpu() for f in fs], [r.cpu() for r in rs], alphas, gammas)
    fused_out = _synthesize(rule, fs, rs, alphas, gammas, "compiled")
    eager_out = _synthesize(rule, fs, rs, alphas, gammas, "eager")
    for got, eager, want, f, r, a, g in zip(
        fused_out, eager_out, expected, fs, rs, alphas, gammas, strict=True
    ):
        assert got.device.type == "cuda" and got.dtype == dtype
        # Projections scale the weights: bound by the terms the kernel actually adds.
        c = (want.double() - g * f.cpu().double() - a * r.cpu().double()).abs()
        scale = a * r.cpu().double().abs() + g * f.cpu().double().abs() + c
        bound = TOLERANCE[dtype] * scale + 1e-30
        for name, out in (("fused", got), ("eager", eager)):
            error = (out.cpu().double() - want).abs()
            assert torch.all(error <= bound), f"{name}: max error/bound {(error / bound).max():.3g}"


NONFINITE = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_forget_reaches_the_update_on_cuda(rule, backend):
    n = 1 << 15
    for bad in NONFINITE:
        f = torch.ones(n, device=DEVICE)
        r = -torch.ones(n, device=DEVICE)  # every coordinate conflicts: retain wins everywhere
        f[123] = bad
        (update,) = _synthesize(rule, [f], [r], [1.0], [1.0], backend)
        assert not torch.isfinite(update[123]), (rule, bad)


@pytest.mark.parametrize("rule", RULES)
def test_fp16_grad_scaler_skips_a_forget_overflow_on_cuda(rule):
    """Autocast float16: the scaled forget backward overflows where retain wins; the step is skipped."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256, bias=False).to(DEVICE)
    before = layer.weight.detach().clone()
    opt = SynthesizingOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), rule)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    x = torch.randn(8, 256, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.float16):
        lf = -(layer(x * 1e3).float() ** 2).mean()  # its scaled gradient exceeds float16's range
        lr = (layer(x).float() ** 2).mean()
    opt.backward_forget(scaler.scale(lf))
    opt.backward_retain(scaler.scale(lr))
    opt.synthesize()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(layer.weight.detach(), before)  # step skipped
    assert scaler.get_scale() < 2.0**16  # and the scale backed off


@contextlib.contextmanager
def no_sync():
    """Raise on any synchronising CUDA call inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _sync_free_step(rule, dtype, *, geometry, streaming, backend, check):
    params = [torch.zeros(s, device=DEVICE, dtype=dtype, requires_grad=True) for s in SIZES]
    opt = SynthesizingOptimizer(
        torch.optim.SGD(params, lr=1.0),
        rule,
        alpha=0.75,
        gamma=1.5,
        track_geometry=geometry,
        streaming=streaming,
    )
    fs, rs = _pairs(dtype, seed=1)
    lf, lr = linear_loss(params, fs), linear_loss(params, rs)
    guard = no_sync() if check else contextlib.nullcontext()
    with fused.use_backend(backend):
        opt.backward_forget(lf)
        if streaming:
            with guard:  # the second backward synthesizes in its hooks
                opt.backward_retain(lr)
        else:
            opt.backward_retain(lr)
            with guard:
                opt.synthesize()
        opt.step()
    return [p.detach().clone() for p in params], opt.geometry


CASES = [(rule, False) for rule in RULES] + [(rule, True) for rule in STREAMABLE]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [False, True], ids=["plain", "geometry"])
@pytest.mark.parametrize(("rule", "streaming"), CASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_synthesis_makes_no_host_sync_on_cuda(dtype, rule, streaming, geometry, backend):
    dtype = DTYPES[dtype]
    kwargs = dict(geometry=geometry, streaming=streaming, backend=backend)
    want, _ = _sync_free_step(rule, dtype, check=False, **kwargs)  # warm-up: compilation may sync
    got, got_geometry = _sync_free_step(rule, dtype, check=True, **kwargs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert (got_geometry is not None) == geometry


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", STREAMABLE)
def test_streaming_gives_the_plain_update_on_cuda(rule, backend):
    plain, _ = _sync_free_step(
        rule, torch.float32, geometry=False, streaming=False, backend=backend, check=False
    )
    streamed, _ = _sync_free_step(
        rule, torch.float32, geometry=False, streaming=True, backend=backend, check=False
    )
    for a, b in zip(streamed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_bitsandbytes_adamw8bit_base_on_cuda(rule):
    bnb = pytest.importorskip("bitsandbytes")

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64)).to(
            DEVICE
        )

    def losses(m, step):
        g = torch.Generator(device=DEVICE).manual_seed(step)
        xf, xr = (torch.randn(16, 64, device=DEVICE, generator=g) for _ in range(2))
        return -(m(xf) ** 2).mean(), (m(xr) - 1).pow(2).mean()

    ref_model, net = model(), model()
    ref = bnb.optim.AdamW8bit(ref_model.parameters(), lr=1e-2)
    probe = SynthesizingOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.0), rule)
    opt = SynthesizingOptimizer(bnb.optim.AdamW8bit(net.parameters(), lr=1e-2), rule)
    for step in range(3):
        for wrapper, m in ((probe, ref_model), (opt, net)):
            wrapper.zero_grad()
            lf, lr = losses(m, step)
            wrapper.backward_forget(lf)
            wrapper.backward_retain(lr)
        probe.synthesize()
        ref.step()
        opt.step()
    assert opt.state[net[2].weight]["state1"].dtype == torch.uint8  # the 8-bit path ran
    for a, b in zip(ref_model.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
