"""The fused (compiled) kernels: same results as the eager rules and the float64 oracle,
no recompilation per shape or weight, and an automatic, correct fallback when compiling fails."""

from __future__ import annotations

import warnings

import oracle
import pytest
import torch
from helpers import assert_near_terms as _assert_near
from helpers import rule_pair as _pair
from torch._dynamo.utils import counters

import gradsynth
from gradsynth.rules import fused, pcgrad, sago, sago_prefer_retain, weighted_sum
from gradsynth.rules.blur import Blur
from gradsynth.rules.kernels import compiled as compiled_kernels
from gradsynth.rules.kernels import implementation, report
from gradsynth.rules.pcgrad import PCGradGlobal

FUNCTIONS = {
    "sago": (sago, oracle.sago),
    "sago_prefer_retain": (sago_prefer_retain, oracle.sago_prefer_retain),
    "sum": (weighted_sum, oracle.weighted_sum),
    "pcgrad": (pcgrad, oracle.pcgrad),
}


@pytest.fixture
def compiled():
    with fused.use_backend("compiled", min_numel=0):
        yield


# Every aliasing of ``out`` in float32, the optimizer's own (out is retain) in the other dtypes:
# each combination is a compilation of its own, about a second each.
CASES = [(torch.float32, out) for out in ("retain", "forget", "new")] + [
    (dtype, "retain") for dtype in (torch.bfloat16, torch.float64)
]


@pytest.mark.parametrize(("dtype", "out"), CASES)
@pytest.mark.parametrize("rule", list(FUNCTIONS))
def test_fused_matches_oracle_and_eager(compiled, rule, dtype, out):
    fn, reference = FUNCTIONS[rule]
    f, r = _pair(dtype, shape=(5003,) if out == "new" else (1, 5003))
    alpha, gamma = 0.75, 1.5
    expected = reference(f, r, alpha, gamma)
    f_in, r_in = f.clone(), r.clone()
    with fused.use_backend("eager"):
        eager = fn(f.clone(), r.clone(), alpha=alpha, gamma=gamma)
    target = {"retain": r, "forget": f, "new": None}[out]
    got = fn(f, r, alpha=alpha, gamma=gamma, out=target)
    assert target is None or got is target
    assert got.dtype == dtype and got.shape == eager.shape
    _assert_near(got, expected, f_in, r_in, alpha, gamma)
    _assert_near(got, eager, f_in, r_in, alpha, gamma)


def test_fused_status_reports_compiled_kernels(compiled):
    f, r = _pair(torch.float32)
    sago(f, r, out=r)
    assert fused.status()["sago_into_retain[float32, cpu]"] == "compiled"


@pytest.mark.parametrize("rule", ["sago", "sago_prefer_retain", "sum", "pcgrad"])
def test_fused_non_finite_values_as_eager(compiled, rule):
    fn, _ = FUNCTIONS[rule]
    inf, nan = float("inf"), float("nan")
    f = torch.tensor([inf, -inf, nan, 1.0, -1.0, 2.0, 0.0, inf, 1e-30] * 600)
    r = torch.tensor([1.0, 1.0, 1.0, inf, -inf, nan, inf, -1.0, -1e-30] * 600)
    got = fn(f, r, alpha=0.5, gamma=2.0)
    with fused.use_backend("eager"):
        eager = fn(f, r, alpha=0.5, gamma=2.0)
    torch.testing.assert_close(got, eager, equal_nan=True)


def test_fused_detects_conflicts_whose_product_underflows(compiled):
    f = torch.full((4096,), 1e-30)
    r = torch.full((4096,), -1e-30)
    assert torch.equal(sago(f, r, alpha=1.0, gamma=1.0), r)


def test_fused_dots_are_float64_accurate(compiled):
    for dtype, rtol in [(torch.float32, 1e-12), (torch.bfloat16, 1e-6)]:
        f, r = _pair(dtype, n=3 * 4096 + 17)
        fr, rr = fused.dots(f, r)
        assert fr.dtype == rr.dtype == torch.float64
        torch.testing.assert_close(fr, (f.double() * r.double()).sum(), rtol=rtol, atol=0)
        torch.testing.assert_close(rr, (r.double() * r.double()).sum(), rtol=rtol, atol=0)


def test_fused_pcgrad_global_matches_oracle(compiled):
    fs = [_pair(torch.float32, n=n)[0] for n in (3000, 5000)]
    rs = [_pair(torch.float32, n=n)[1] for n in (3000, 5000)]
    rule = PCGradGlobal()
    alphas, gammas = [1.0, 0.5], [2.0, 1.0]
    context = rule.prepare(fs, rs, alpha=alphas, gamma=gammas)
    expected = oracle.pcgrad_global(fs, rs, alphas, gammas)
    for f, r, a, g, e in zip(fs, rs, alphas, gammas, expected, strict=True):
        rule.combine(f, r, alpha=a, gamma=g, out=r, context=context)
        torch.testing.assert_close(r.double(), e, rtol=2e-6, atol=1e-12)


def test_fused_blur_matches_oracle(compiled):
    fs = [_pair(torch.float32, n=n)[0] for n in (3000, 5000)]
    rs = [_pair(torch.float32, n=n)[1] for n in (3000, 5000)]
    rule = Blur()
    alphas, gammas = [1.0, 0.5], [2.0, 1.0]
    context = rule.prepare(fs, rs, alpha=alphas, gamma=gammas)
    expected = oracle.blur(fs, rs, alphas, gammas)
    c = float(context)
    for f, r, a, g, e in zip(fs, rs, alphas, gammas, expected, strict=True):
        # A float32 kernel rounds each term: its error is bounded by the terms' size, not by the
        # result's (the projection can cancel most of alpha * r).
        terms = a * r.double().abs() + abs(g - c) * f.double().abs()
        rule.combine(f, r, alpha=a, gamma=g, out=f, context=context)
        assert bool(((f.double() - e).abs() <= 4 * torch.finfo(torch.float32).eps * terms + 1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_weighted_apply_matches_oracle(compiled, dtype):
    # The kernel GPUs use for PCGrad's weight (a float64 tensor, never read on the host); run here
    # on the CPU through the dispatcher, so that it is tested on this machine too.
    f, r = _pair(dtype)
    weight = torch.tensor(0.3, dtype=torch.float64)
    expected = oracle.weighted_sum(f, r, 0.3, 1.5)
    f_in, r_in = f.clone(), r.clone()
    assert implementation("linear", "compiled device weight").run(f, r, r, weight, 1.5)
    _assert_near(r, expected, f_in, r_in, 0.3, 1.5)


def test_huge_pcgrad_weights_take_the_float64_path(compiled):
    f = torch.ones(5000)
    r = torch.full((5000,), -1e-30)
    assert not fused.linear_into(f, r, r, alpha=torch.tensor(1e70, dtype=torch.float64), gamma=1.0)
    got = pcgrad(f, r, alpha=1.0, gamma=1.0)
    with fused.use_backend("eager"):
        assert torch.equal(got, pcgrad(f, r, alpha=1.0, gamma=1.0))
    _assert_near(got, oracle.pcgrad(f, r, 1.0, 1.0), f, r, 1.0, 1.0)


def test_no_recompilation_for_new_shapes_or_weights(compiled):
    def graphs():
        return counters["stats"]["unique_graphs"]

    # Warm up (or already compiled) both kernels used below: into a new tensor, and into ``r``.
    sago(*_pair(torch.float32, n=4000), out=None)
    f, r = _pair(torch.float32, n=4000)
    sago(f, r, out=r)
    before = graphs()
    for n, alpha in [(5000, 0.3), (70000, 2.0), (12345, 1.0), (999, 7.5)]:
        f, r = _pair(torch.float32, n=n)
        sago(f, r, alpha=alpha, gamma=alpha / 2, out=r)
        sago(f.view(-1, n // 3 if n % 3 == 0 else 1), r.view(-1, n // 3 if n % 3 == 0 else 1), out=None)
    assert graphs() == before


def test_eligibility():
    f = torch.zeros(fused.MIN_NUMEL)
    with fused.use_backend("auto"):
        assert fused.eligible(f, f)
        assert not fused.eligible(f[:-1], f[:-1])  # too small for the call overhead to pay
        assert not fused.eligible(f.view(2, -1).t(), f.view(2, -1).t())  # not contiguous
        assert not fused.eligible(f.int(), f.int())
        assert not fused.eligible(f, f.double())
    with fused.use_backend("eager"):
        assert not fused.eligible(f, f)
    with pytest.raises(ValueError, match="unknown synthesis backend 'fast'"):
        gradsynth.set_backend("fast")


@pytest.fixture
def broken_compiler(monkeypatch):
    """torch.compile that fails the way a missing C++ toolchain does, on fresh kernel caches."""

    def failing_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    _fresh_status(monkeypatch)


def _fresh_status(monkeypatch):
    """No kernel compiled yet, and nothing reported as run (earlier tests ran kernels)."""
    monkeypatch.setattr(compiled_kernels, "_compiled", {})
    for table in ("compiled", "_last", "_seen"):
        monkeypatch.setattr(report, table, {})


@pytest.mark.parametrize("rule", list(FUNCTIONS))
def test_fallback_when_compilation_fails(broken_compiler, rule):
    fn, reference = FUNCTIONS[rule]
    f, r = _pair(torch.float32, n=fused.MIN_NUMEL + 5)
    with fused.use_backend("eager"):
        eager = fn(f.clone(), r.clone(), alpha=0.5, gamma=2.0)
    with fused.use_backend("auto"), pytest.warns(RuntimeWarning, match="torch.compile failed.*eager"):
        got = fn(f.clone(), r.clone(), alpha=0.5, gamma=2.0, out=None)
    assert torch.equal(got, eager)
    assert report.compiled and not any(report.compiled.values())  # every variant tried failed
    operation = {"sum": "linear", "pcgrad": "linear", "sago_prefer_retain": "prefer_retain"}.get(rule, rule)
    assert fused.status()[f"{operation}[float32, cpu]"] == "eager"  # what ran, after the fallback
    with fused.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls go straight to eager
        assert torch.equal(fn(f.clone(), r, alpha=0.5, gamma=2.0, out=None), eager)
    torch.testing.assert_close(eager.double(), reference(f, r, 0.5, 2.0), rtol=2e-6, atol=1e-30)


def test_compiled_backend_raises_instead_of_falling_back(broken_compiler):
    f, r = _pair(torch.float32, n=fused.MIN_NUMEL)
    with fused.use_backend("compiled"), pytest.raises(RuntimeError, match="InvalidCxxCompiler"):
        sago(f, r, out=r)


def test_failed_compilation_leaves_a_separate_out_untouched(broken_compiler):
    f, r = _pair(torch.float32, n=fused.MIN_NUMEL)
    out = torch.full_like(r, 7.0)
    with fused.use_backend("auto"), pytest.warns(RuntimeWarning):
        assert not fused.sago_into(f, r, out, alpha=1.0, gamma=1.0)
    assert torch.all(out == 7.0)


def test_optimizer_steps_agree_between_fused_and_eager_paths():
    from helpers import small_model, task_losses

    results = {}
    for backend in ("compiled", "eager"):
        model = small_model()
        opt = gradsynth.SynthesizingOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), rule="sago")
        with fused.use_backend(backend, min_numel=0):
            for seed in range(3):
                forget, retain = task_losses(model, seed)
                opt.zero_grad()
                opt.backward_forget(forget)
                opt.backward_retain(retain)
                opt.step()
        results[backend] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results["compiled"], results["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiles_under_warnings_as_errors(monkeypatch):
    # torch's compiler emits deprecation notices of its own; `-W error` must not turn them into
    # a failed compilation and a silent fallback.
    _fresh_status(monkeypatch)
    f, r = _pair(torch.float32, n=fused.MIN_NUMEL)
    with fused.use_backend("compiled"), warnings.catch_warnings():
        warnings.simplefilter("error")
        sago(f, r, out=r)
    assert fused.status() == {"sago_into_retain[float32, cpu]": "compiled", "sago[float32, cpu]": "compiled"}


@pytest.mark.parametrize("streaming", [False, True])
def test_auto_synthesizes_a_small_step_eagerly_and_a_large_one_fused(monkeypatch, streaming):
    from helpers import small_model, task_losses

    calls = []
    real = compiled_kernels.run
    monkeypatch.setattr(
        compiled_kernels, "run", lambda name, *a, **kw: calls.append(name) or real(name, *a, **kw)
    )

    def run(backend, **sizes):
        calls.clear()
        model = small_model()
        opt = gradsynth.SynthesizingOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), rule="sago", alpha=0.7, streaming=streaming
        )
        with fused.use_backend(backend, min_numel=0, **sizes):
            for seed in range(2):
                forget, retain = task_losses(model, seed)
                opt.zero_grad()
                opt.backward_forget(forget)
                opt.backward_retain(retain)
                opt.step()
        return list(calls), [p.detach().clone() for p in model.parameters()]

    small_calls, small = run("auto")  # a few thousand elements: below MIN_STEP_NUMEL
    assert small_calls == []
    _, eager = run("eager")
    assert all(torch.equal(a, b) for a, b in zip(small, eager, strict=True))  # the eager path exactly
    assert run("auto", min_step_numel=0)[0]  # a step at the threshold compiles
    assert run("compiled")[0]  # an explicit choice is kept whatever the size


@pytest.mark.parametrize("threads", [1, 2])
def test_mismatched_shapes_are_named_and_leave_the_kernels_on(threads):
    torch.set_num_threads(threads)  # the C inner products (one thread) and the compiled ones
    f, r = torch.randn(40_000), torch.randn(50_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compilation attempted on mismatched tensors
        with pytest.raises(ValueError, match="different shapes"):
            pcgrad(f, r)
    g = torch.randn(50_000)
    torch.testing.assert_close(pcgrad(g, r), oracle.pcgrad(g, r, 1.0, 1.0).float(), rtol=1e-5, atol=1e-5)
    assert fused.status().get("dots_wide[float32, cpu]") != "failed (eager fallback)"


def test_mismatched_shapes_never_reach_a_compiled_kernel():
    f, r = torch.randn(50_000), torch.randn(50_000)
    sago(f, r, out=r)  # compiled, so that a later call would take the direct path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="different shapes"):
            sago(torch.randn(40_000), r, out=r)  # was the compiled kernel's own AssertionError
    assert not fused.eligible(torch.randn(40_000), r)
    assert fused.status().get("sago_into_retain[float32, cpu]") == "compiled"
