"""The paper's guarantees as properties over random gradients (hypothesis).

- SAGO: ``g_i * r_i >= 0`` on every coordinate (both variants).
- PCGrad (per tensor and global): ``<g, r> >= 0``.
- BLUR (the forget-first baseline): the retain part is orthogonal to ``f`` over the scope, so
  ``<g, f> = sum_j gamma_j ||f_j||^2``.
- Every rule: a non-finite value in either task gradient reaches the update.
- Every built-in rule is positively homogeneous: ``rule(s*f, s*r) = s * rule(f, r)`` for s > 0,
  which is what makes synthesizing before ``GradScaler.unscale_`` exact.

Inputs span zeros, tiny (1e-30) and huge magnitudes, and float32/bfloat16/float16. The whole
module runs twice: on the eager rules and on the fused (compiled) kernels, forced on every size.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from conftest import RULES
from helpers import linear_loss, update_of, zero_params
from hypothesis import given

from gradsynth import SynthesizingOptimizer, pcgrad, sago, sago_prefer_retain, weighted_sum
from gradsynth.rules import Blur, PCGradGlobal, fused


@pytest.fixture(autouse=True, scope="module", params=["eager", "fused"])
def backend(request):
    """Every property holds on both paths (module-scoped: hypothesis re-runs the test body)."""
    # From 2 elements: a 1-element tensor is a separate compilation per dtype, and the compiler
    # keeps only 8 per kernel (real gradients never go below fused.MIN_NUMEL).
    name, min_numel = ("eager", None) if request.param == "eager" else ("compiled", 2)
    with fused.use_backend(name, min_numel=min_numel):
        yield request.param


DTYPES = {
    torch.float32: (1e-30, 1e30),
    torch.bfloat16: (1e-30, 1e30),
    torch.float16: (1e-4, 1e3),
}


@st.composite
def gradient_pairs(draw, max_len=64, dtype=None):
    """Two same-shaped gradients in one dtype, each entry zero, small, ordinary or huge."""
    if dtype is None:
        dtype = draw(st.sampled_from(list(DTYPES)))
    tiny, huge = DTYPES[dtype]
    n = draw(st.integers(1, max_len))
    magnitude = st.sampled_from([0.0, tiny, 1e-3, 1.0, 7.5, huge])
    value = st.builds(lambda m, s, u: s * m * u, magnitude, st.sampled_from([-1.0, 1.0]), st.floats(0.5, 2.0))
    f = torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.float64).to(dtype)
    r = torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.float64).to(dtype)
    alpha = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    gamma = draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
    return f, r, alpha, gamma


@given(gradient_pairs())
@pytest.mark.parametrize("rule", [sago, sago_prefer_retain])
def test_sago_never_opposes_retain_on_any_coordinate(rule, case):
    f, r, alpha, gamma = case
    g = rule(f, r, alpha=alpha, gamma=gamma)
    assert g.dtype == f.dtype
    assert torch.all(g.double() * r.double() >= 0)


def _rounding_slack(g, f, r, gamma, dtype):
    """How far below 0 rounding the update to its dtype can push ``<g, r>``.

    Each stored ``g_i`` is off by at most ``eps * |g_i|`` relative (plus the cancellation of
    ``gamma * f_i`` against the projection), or by half the smallest subnormal where the exact
    value underflows: ``<g, r> >= 0`` holds exactly, and for the stored ``g`` up to this.
    """
    info = torch.finfo(dtype)
    spacing = info.smallest_normal * info.eps  # the gap between subnormals
    relative = 4 * info.eps * (float(g.abs() @ r.abs()) + gamma * float(f.abs() @ r.abs()))
    return relative + 4 * spacing * float(r.abs().sum())


@given(gradient_pairs())
def test_pcgrad_update_has_nonnegative_inner_product_with_retain(case):
    f, r, alpha, gamma = case
    g = pcgrad(f, r, alpha=alpha, gamma=gamma).double()
    fd, rd = f.double(), r.double()
    inner = float((g * rd).sum())
    assert math.isfinite(inner)  # finite inputs, finite update
    assert inner >= -_rounding_slack(g, fd, rd, gamma, f.dtype)


@given(
    st.sampled_from(list(DTYPES)).flatmap(
        lambda dtype: st.lists(gradient_pairs(max_len=16, dtype=dtype), min_size=1, max_size=4)
    )
)
def test_pcgrad_global_inner_product_over_the_scope(cases):
    dtype = cases[0][0].dtype
    rule = PCGradGlobal()
    forgets, retains = [c[0] for c in cases], [c[1] for c in cases]
    alphas, gammas = [c[2] for c in cases], [c[3] for c in cases]
    k = rule.prepare(forgets, retains, alpha=alphas, gamma=gammas)
    inner = 0.0
    slack = 0.0
    for f, r, alpha, gamma in cases:
        out = torch.empty_like(r)
        rule.combine(f, r, alpha=alpha, gamma=gamma, out=out, context=k)
        g, rd = out.double(), r.double()
        inner += float((g * rd).sum())
        slack += _rounding_slack(g, f.double(), rd, gamma, dtype)
    assert inner >= -slack


@given(
    st.sampled_from(list(DTYPES)).flatmap(
        lambda dtype: st.lists(gradient_pairs(max_len=16, dtype=dtype), min_size=1, max_size=4)
    )
)
def test_blur_retain_part_is_orthogonal_to_forget_over_the_scope(cases):
    dtype = cases[0][0].dtype
    rule = Blur()
    forgets, retains = [c[0] for c in cases], [c[1] for c in cases]
    alphas, gammas = [c[2] for c in cases], [c[3] for c in cases]
    c = rule.prepare(forgets, retains, alpha=alphas, gamma=gammas)
    inner = 0.0  # <g - Gamma f, f>, exactly 0 before g is rounded to its dtype
    slack = 0.0
    info = torch.finfo(dtype)
    for f, r, alpha, gamma in cases:
        out = torch.empty_like(r)
        rule.combine(f, r, alpha=alpha, gamma=gamma, out=out, context=c)
        g, fd = out.double(), f.double()
        assert torch.isfinite(g).all()  # finite inputs, finite update
        inner += float(((g - gamma * fd) * fd).sum())
        # The retain part and its projection cancel: their size bounds the rounding too.
        terms = float(g.abs() @ fd.abs()) + gamma * float(fd.abs() @ fd.abs())
        scale = terms + alpha * float(r.double().abs() @ fd.abs())
        slack += 4 * info.eps * scale + 4 * info.smallest_normal * info.eps * float(fd.abs().sum())
    assert abs(inner) <= slack


NONFINITE = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("where", ["forget", "retain"])
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_reaches_the_update(rule, where, bad):
    """Even where the rule picks the other task's finite value at that coordinate."""
    f = torch.tensor([1.0, -2.0, 3.0, 0.0])
    r = torch.tensor([-1.0, 2.0, 3.0, 1.0])
    for i in range(4):
        fi, ri = f.clone(), r.clone()
        (fi if where == "forget" else ri)[i] = bad
        params = zero_params([(4,)])
        opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule)
        opt.backward_forget(linear_loss(params, [fi]))
        opt.backward_retain(linear_loss(params, [ri]))
        opt.synthesize()
        assert not torch.isfinite(params[0].grad).all(), (rule, where, bad, i)


@given(gradient_pairs(), st.sampled_from([2.0**-8, 0.5, 2.0, 2.0**16]))
@pytest.mark.parametrize("rule", ["sago", "sago_prefer_retain", "pcgrad", "sum"])
def test_rules_commute_with_a_common_scale(rule, case, scale):
    f, r, alpha, gamma = case
    if f.dtype != torch.float32:
        return  # powers of two are exact scalings only away from the dtype's range limits
    f, r = f.clamp(-1e30, 1e30), r.clamp(-1e30, 1e30)
    fn = {"sago": sago, "sago_prefer_retain": sago_prefer_retain, "pcgrad": pcgrad, "sum": weighted_sum}[rule]
    g = fn(f, r, alpha=alpha, gamma=gamma).double()
    gs = fn(f * scale, r * scale, alpha=alpha, gamma=gamma).double() / scale
    torch.testing.assert_close(gs, g, rtol=1e-6, atol=1e-30)


@given(gradient_pairs(max_len=24))
def test_sago_through_the_optimizer_never_opposes_retain(case):
    f, r, alpha, gamma = case
    params = zero_params([tuple(f.shape)], f.dtype)
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago", alpha=alpha, gamma=gamma)
    opt.backward_forget(linear_loss(params, [f]))
    opt.backward_retain(linear_loss(params, [r]))
    opt.step()
    g = update_of(params)[0]
    assert torch.all(g.double() * r.double() >= 0)


FUNCTIONS = {"sago": sago, "sago_prefer_retain": sago_prefer_retain, "pcgrad": pcgrad, "sum": weighted_sum}


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(("alpha", "gamma"), [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 2.0)])
def test_rule_functions_are_alias_safe_and_propagate_non_finite(name, alpha, gamma):
    fn = FUNCTIONS[name]
    torch.manual_seed(1)
    f, r = torch.randn(9), torch.randn(9)
    want = fn(f, r, alpha=alpha, gamma=gamma)
    for mode in ("f", "r", "separate"):
        fi, ri = f.clone(), r.clone()
        out = {"f": fi, "r": ri, "separate": torch.empty(9)}[mode]
        got = fn(fi, ri, alpha=alpha, gamma=gamma, out=out)
        assert got is out
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for bad in NONFINITE:
            for which in ("f", "r"):
                fi, ri = f.clone(), r.clone()
                (fi if which == "f" else ri)[4] = bad
                out = {"f": fi, "r": ri, "separate": torch.empty(9)}[mode]
                assert not torch.isfinite(fn(fi, ri, alpha=alpha, gamma=gamma, out=out)).all()
