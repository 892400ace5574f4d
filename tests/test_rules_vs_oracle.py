"""Every rule, through the public API, against the float64 oracle in tests/oracle.py.

One SGD step with lr=1 from zero parameters turns the update into the gradient: ``g = -p``.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import RULES
from helpers import linear_loss, update_of, zero_params

from gradsynth import SynthesizingOptimizer

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,)]


def _random_grads(shapes, scale=1.0):
    return [torch.randn(s) * scale for s in shapes]


def _run(rule, forgets, retains, *, alpha=1.0, gamma=1.0, schedule="fr", loss_given=True):
    """One step; ``schedule`` lists the backward calls, e.g. "frfr" or "ffrr" (micro-batches).

    Each task's gradient is split evenly over that task's micro-batches.
    """
    params = zero_params(SHAPES)
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule, alpha=alpha, gamma=gamma)
    opt.zero_grad()
    totals = {"f": forgets, "r": retains}
    for task in schedule:
        targets = [None if t is None else t / schedule.count(task) for t in totals[task]]
        if all(t is None for t in targets):
            continue
        loss = linear_loss(params, targets)
        backward = opt.backward_forget if task == "f" else opt.backward_retain
        if loss_given:
            backward(loss)
        else:
            loss.backward()
            backward(None)
    opt.step()
    return params, update_of(params)


def _expected(rule, forgets, retains, alpha, gamma):
    fs = [torch.zeros(s) if t is None else t for s, t in zip(SHAPES, forgets, strict=True)]
    rs = [torch.zeros(s) if t is None else t for s, t in zip(SHAPES, retains, strict=True)]
    n = len(fs)
    return oracle.synthesize(rule, fs, rs, [alpha] * n, [gamma] * n)


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("schedule", ["fr", "rf"])
@pytest.mark.parametrize(("alpha", "gamma"), [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_rule_matches_oracle(rule, schedule, alpha, gamma):
    forgets, retains = _random_grads(SHAPES), _random_grads(SHAPES)
    _, got = _run(rule, forgets, retains, alpha=alpha, gamma=gamma, schedule=schedule)
    _assert_close(got, _expected(rule, forgets, retains, alpha, gamma))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("schedule", ["frfrfr", "rfrfrf", "fffrrr", "rrfff", "ffrfr"])
@pytest.mark.parametrize("loss_given", [True, False])
def test_accumulation_over_micro_batches(rule, schedule, loss_given):
    """Micro-batches per task, interleaved or not, give the synthesis of the sums."""
    forgets, retains = _random_grads(SHAPES), _random_grads(SHAPES)
    _, got = _run(rule, forgets, retains, schedule=schedule, loss_given=loss_given)
    _assert_close(got, _expected(rule, forgets, retains, 1.0, 1.0))


@pytest.mark.parametrize("rule", RULES)
def test_parameters_reached_by_one_task(rule):
    """A task that misses a parameter contributes a zero gradient there."""
    f_all, r_all = _random_grads(SHAPES), _random_grads(SHAPES)
    forgets = [f_all[0], None, f_all[2], None]
    retains = [r_all[0], r_all[1], None, None]
    params, got = _run(rule, forgets, retains, alpha=0.7, gamma=1.3)
    want = _expected(rule, forgets, retains, 0.7, 1.3)
    _assert_close(got[:3], want[:3])
    # Reached by neither task: the base optimizer skips it and p.grad stays None.
    assert params[3].grad is None
    assert torch.equal(params[3].detach(), torch.zeros(SHAPES[3]))


def test_sago_drops_parameters_only_retain_reached():
    """The paper's rule: agreement (a zero counts) takes the forget gradient alone."""
    retains = _random_grads(SHAPES)
    forgets = [None] * len(SHAPES)
    forgets[0] = torch.randn(SHAPES[0])
    _, got = _run("sago", forgets, retains)
    for g in got[1:]:
        assert torch.count_nonzero(g) == 0
    _, got_prefer = _run("sago_prefer_retain", forgets, retains)
    for g, r in zip(got_prefer[1:], retains[1:], strict=True):
        torch.testing.assert_close(g, r)


def test_sago_sign_underflow_is_a_conflict():
    """1e-30 * -1e-30 underflows to -0 in float32; SAGO must still see the conflict."""
    f = torch.tensor([1e-30, -1e-30, 1e-30, 0.0])
    r = torch.tensor([-1e-30, 1e-30, 1e-30, -1e-30])
    assert (f * r)[0] == 0  # the product really underflows
    params = zero_params([(4,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago")
    opt.backward_forget(linear_loss(params, [f]))
    opt.backward_retain(linear_loss(params, [r]))
    opt.step()
    got = update_of(params)[0]
    torch.testing.assert_close(got, torch.tensor([-1e-30, 1e-30, 1e-30, 0.0]), rtol=0, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_pcgrad_variants_tiny_and_huge_magnitudes(rule):
    """Float64 accumulation: tiny (1e-30) and huge (1e30) float32 gradients keep the projection right."""
    for scale in (1e-30, 1e30):
        forgets = [t * scale for t in _random_grads(SHAPES)]
        retains = [t * scale for t in _random_grads(SHAPES)]
        _, got = _run(rule, forgets, retains)
        want = _expected(rule, forgets, retains, 1.0, 1.0)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double() / scale, w / scale, rtol=1e-5, atol=1e-5)


def test_pcgrad_global_spans_param_groups_with_their_own_weights():
    f_all, r_all = _random_grads(SHAPES), _random_grads(SHAPES)
    params = zero_params(SHAPES)
    groups = [
        {"params": params[:2], "rule": "pcgrad_global", "alpha": 0.5, "gamma": 2.0},
        {"params": params[2:], "rule": "pcgrad_global"},
    ]
    opt = SynthesizingOptimizer(torch.optim.SGD(groups, lr=1.0), "sum", alpha=1.0, gamma=1.0)
    opt.backward_forget(linear_loss(params, f_all))
    opt.backward_retain(linear_loss(params, r_all))
    opt.step()
    want = oracle.pcgrad_global(f_all, r_all, [0.5, 0.5, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0])
    _assert_close(update_of(params), want)


def test_per_group_rules():
    """E.g. plain sum on one group, SAGO on the other."""
    f_all, r_all = _random_grads(SHAPES), _random_grads(SHAPES)
    params = zero_params(SHAPES)
    groups = [{"params": params[:1], "rule": "sum", "gamma": 0.5}, {"params": params[1:]}]
    opt = SynthesizingOptimizer(torch.optim.SGD(groups, lr=1.0), "sago")
    opt.backward_forget(linear_loss(params, f_all))
    opt.backward_retain(linear_loss(params, r_all))
    opt.step()
    got = update_of(params)
    _assert_close(got[:1], [oracle.weighted_sum(f_all[0], r_all[0], 1.0, 0.5)])
    _assert_close(got[1:], [oracle.sago(f, r, 1.0, 1.0) for f, r in zip(f_all[1:], r_all[1:], strict=True)])


@pytest.mark.parametrize("rule", RULES)
def test_geometry_matches_oracle(rule):
    forgets, retains = _random_grads(SHAPES), _random_grads(SHAPES)
    params = zero_params(SHAPES)
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule, alpha=0.8, track_geometry=True)
    opt.backward_forget(linear_loss(params, forgets))
    opt.backward_retain(linear_loss(params, retains))
    opt.step()
    want = oracle.geometry(forgets, retains, _expected(rule, forgets, retains, 0.8, 1.0))
    got = opt.geometry.as_dict()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["numel"] == sum(p.numel() for p in params)
    # The geometry-tracking path writes the same update as the plain one.
    _, plain = _run(rule, forgets, retains, alpha=0.8)
    for a, b in zip(update_of(params), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES)
def test_rules_in_other_dtypes(rule, dtype):
    forgets, retains = _random_grads(SHAPES), _random_grads(SHAPES)
    forgets = [t.to(dtype) for t in forgets]
    retains = [t.to(dtype) for t in retains]
    params = zero_params(SHAPES, dtype)
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule, alpha=0.5)
    opt.backward_forget(linear_loss(params, forgets))
    opt.backward_retain(linear_loss(params, retains))
    opt.step()
    got = update_of(params)
    want = _expected(rule, forgets, retains, 0.5, 1.0)
    tol = {torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * float(w.abs().max()))


@pytest.mark.parametrize("rule", RULES)
def test_chunked_reductions_match_the_oracle(rule, monkeypatch):
    """Long tensors are reduced and combined in chunks; force tiny chunks on small tensors."""
    import gradsynth.rules.reductions as reductions

    monkeypatch.setattr(reductions, "CHUNK_NUMEL", 5)
    forgets, retains = _random_grads(SHAPES), _random_grads(SHAPES)
    _, got = _run(rule, forgets, retains, alpha=0.5, gamma=1.5)
    _assert_close(got, _expected(rule, forgets, retains, 0.5, 1.5))


def test_non_contiguous_inputs_to_the_rule_functions(monkeypatch):
    import gradsynth.rules.reductions as reductions
    from gradsynth import pcgrad, sago

    monkeypatch.setattr(reductions, "CHUNK_NUMEL", 5)
    f, r = torch.randn(6, 4).t(), torch.randn(6, 4).t()
    assert not f.is_contiguous()
    torch.testing.assert_close(pcgrad(f, r, alpha=0.5).double(), oracle.pcgrad(f, r, 0.5, 1.0))
    torch.testing.assert_close(sago(f, r, gamma=2.0).double(), oracle.sago(f, r, 1.0, 2.0))
    out = r.clone()
    pcgrad(f, out, out=out)
    torch.testing.assert_close(out.double(), oracle.pcgrad(f, r, 1.0, 1.0))
