"""The public contract of SynthesizingOptimizer: delegation, bookkeeping, settings and refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import collect, linear_loss, small_model, task_losses, update_of, zero_params

import gradsynth
from gradsynth import Rule, SynthesizingOptimizer, register_rule, unregister_rule


def test_is_an_optimizer_that_shares_the_base_objects():
    base = torch.optim.AdamW(small_model().parameters(), lr=1e-3)
    opt = SynthesizingOptimizer(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    assert opt.optimizer is base
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


def test_unknown_attributes_reach_the_base():
    base = torch.optim.SGD(small_model().parameters(), lr=0.1)
    base.train_mode_flag = "from base"
    opt = SynthesizingOptimizer(base)
    assert opt.train_mode_flag == "from base"
    with pytest.raises(AttributeError):
        _ = opt.no_such_attribute


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'sagoo'.*'sago'.*'pcgrad_global'.*'sum'"):
        SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1), "sagoo")


@pytest.mark.parametrize(
    ("kw", "exc"),
    [({"alpha": -1.0}, ValueError), ({"gamma": float("nan")}, ValueError), ({"alpha": "1"}, TypeError)],
)
def test_bad_weights_are_refused(kw, exc):
    with pytest.raises(exc, match=r"alpha|gamma"):
        SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1), **kw)


def test_bad_group_settings_are_refused_at_construction():
    model = small_model()
    groups = [{"params": model[0].parameters(), "rule": "nope"}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        SynthesizingOptimizer(torch.optim.SGD(groups, lr=0.1))


def test_wrapping_twice_and_wrapping_a_non_optimizer_are_refused():
    opt = SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already"):
        SynthesizingOptimizer(opt)
    with pytest.raises(TypeError, match="wraps an optimizer"):
        SynthesizingOptimizer(small_model().parameters())


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = SynthesizingOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.backward_forget(emb(torch.tensor([1, 2])).sum())


def test_complex_parameters_are_refused():
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        SynthesizingOptimizer(torch.optim.SGD([p], lr=0.1))


def test_backward_after_synthesize_is_refused_until_step():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    collect(opt, model)
    opt.synthesize()
    with pytest.raises(RuntimeError, match="after synthesize"):
        opt.backward_forget(task_losses(model)[0])
    opt.step()
    opt.zero_grad()
    opt.backward_forget(task_losses(model)[0])  # fine again


def test_an_unattributed_backward_is_refused():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    lf, lr = task_losses(model)
    opt.backward_forget(lf)
    lr.backward()  # nobody says which task this belongs to
    with pytest.raises(RuntimeError, match="belongs to no task"):
        opt.step()


def test_backward_kwargs_and_loss_type():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    lf, _ = task_losses(model)
    opt.backward_forget(lf, retain_graph=True)
    opt.backward_forget(lf)  # the graph was kept
    with pytest.raises(TypeError, match="loss tensor"):
        opt.backward_retain(1.0)
    with pytest.raises(TypeError, match="no backward arguments"):
        opt.backward_retain(None, retain_graph=True)


def test_synthesize_is_idempotent_and_step_after_it_uses_the_same_gradient():
    params = zero_params([(5,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago")
    f, r = torch.randn(5), torch.randn(5)
    opt.backward_forget(linear_loss(params, [f]))
    opt.backward_retain(linear_loss(params, [r]))
    opt.synthesize()
    first = params[0].grad.clone()
    opt.synthesize()
    assert torch.equal(params[0].grad, first)
    assert not opt.pending
    opt.step()
    assert torch.equal(update_of(params)[0], first)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_drops_pending_task_gradients(set_to_none):
    params = zero_params([(5,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sum")
    opt.backward_forget(linear_loss(params, [torch.ones(5)]))
    assert opt.pending
    opt.zero_grad(set_to_none=set_to_none)
    assert not opt.pending
    opt.backward_retain(linear_loss(params, [torch.full((5,), 2.0)]))
    opt.step()
    torch.testing.assert_close(update_of(params)[0], torch.full((5,), 2.0))


@pytest.mark.parametrize("rule", ["sago", "pcgrad", "sum"])
def test_set_to_none_false_over_many_steps_matches_set_to_none_true(rule):
    """Stashing by reference would break here: the next backward would write into the stash."""
    results = {}
    for set_to_none in (True, False):
        model = small_model()
        opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rule)
        for step in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            collect(opt, model, step)
            opt.step()
        results[set_to_none] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_given_accumulation_adds_in_place_without_new_buffers():
    """With the loss given, the task's stash is put back into p.grad: autograd adds into it."""
    params = zero_params([(4, 4)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago")
    opt.backward_forget(linear_loss(params, [torch.ones(4, 4)]))
    stash = opt._tasks.peek(params[0])[0]
    assert params[0].grad is None
    opt.backward_retain(linear_loss(params, [torch.ones(4, 4)]))
    retain_stash = opt._tasks.peek(params[0])[1]
    opt.backward_forget(linear_loss(params, [torch.ones(4, 4)]))
    opt.backward_retain(linear_loss(params, [torch.ones(4, 4)]))
    assert opt._tasks.peek(params[0])[0] is stash
    assert opt._tasks.peek(params[0])[1] is retain_stash
    torch.testing.assert_close(stash, torch.full((4, 4), 2.0))
    opt.synthesize()
    # The synthesized gradient is written into the retain buffer: no third set.
    assert params[0].grad is retain_stash


def test_closure_is_followed_by_a_synthesis():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), "sago")
    calls = []

    def closure():
        opt.zero_grad()
        calls.append(1)
        return collect(opt, model)[1]

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert len(calls) >= 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_custom_rules_by_function_and_by_class():
    def halfway(f, r, *, alpha, gamma):
        return 0.5 * (gamma * f + alpha * r)

    class RetainOnly(Rule):
        def combine(self, forget, retain, *, alpha, gamma, out, context=None):
            out.copy_(retain * alpha)

    register_rule("halfway", halfway)
    register_rule("retain_only", RetainOnly)
    try:
        assert {"halfway", "retain_only"} <= set(gradsynth.available_rules())
        for rule, expect in [
            ("halfway", lambda f, r: 0.5 * (f + r)),
            ("retain_only", lambda f, r: r),
            (halfway, lambda f, r: 0.5 * (f + r)),
            (RetainOnly(), lambda f, r: r),
        ]:
            params = zero_params([(6,)])
            opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule)
            f, r = torch.randn(6), torch.randn(6)
            opt.backward_forget(linear_loss(params, [f]))
            opt.backward_retain(linear_loss(params, [r]))
            opt.step()
            torch.testing.assert_close(update_of(params)[0], expect(f, r))
        with pytest.raises(ValueError, match="registered already"):
            register_rule("halfway", halfway)
        with pytest.raises(ValueError, match="built-in"):
            register_rule("sago", halfway)
    finally:
        unregister_rule("halfway")
        unregister_rule("retain_only")


def test_register_rule_as_a_decorator():
    @register_rule("doubled_forget")
    def doubled(f, r, *, alpha, gamma):
        return 2 * gamma * f

    try:
        assert gradsynth.get_rule("doubled_forget").name == "doubled_forget"
        assert callable(doubled)
    finally:
        unregister_rule("doubled_forget")


def test_a_custom_function_returning_the_wrong_shape_is_reported():
    params = zero_params([(3,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), lambda f, r, *, alpha, gamma: f.sum())
    opt.backward_forget(linear_loss(params, [torch.ones(3)]))
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        opt.step()


def test_base_optimizer_owned_group_keys_stay_the_base():
    """RMSprop has its own `alpha`; the wrapper's alpha applies to its groups."""
    params = zero_params([(3,)])
    opt = SynthesizingOptimizer(torch.optim.RMSprop(params, lr=0.1, alpha=0.9), "sum", alpha=0.25)
    rule, alpha, gamma = opt.group_settings(opt.param_groups[0])
    assert (rule.name, alpha, gamma) == ("sum", 0.25, 1.0)
    assert opt.param_groups[0]["alpha"] == 0.9


def test_add_param_group_checks_settings():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="gamma"):
        opt.add_param_group({"params": model[2].parameters(), "gamma": -1})
    opt.add_param_group({"params": model[2].parameters(), "rule": "pcgrad", "alpha": 2.0})
    assert opt.group_settings(opt.param_groups[1])[0].name == "pcgrad"


def test_settings_can_be_changed_with_checks():
    opt = SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1))
    opt.rule = "pcgrad"
    opt.alpha = 0.5
    opt.gamma = 2.0
    assert (opt.rule.name, opt.alpha, opt.gamma) == ("pcgrad", 0.5, 2.0)
    with pytest.raises(ValueError):
        opt.gamma = -2.0
    assert "pcgrad" in repr(opt) and "SGD" in repr(opt)


def test_step_hooks_registered_on_the_wrapper_run():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    collect(opt, model)
    opt.step()
    assert seen == ["pre", "post"]


def test_geometry_is_none_unless_tracked():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    collect(opt, model)
    opt.step()
    assert opt.geometry is None


def test_a_failed_backward_leaves_the_task_gradients_consistent():
    params = zero_params([(3,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sum")
    opt.backward_forget(linear_loss(params, [torch.ones(3)]))
    with pytest.raises(RuntimeError):
        opt.backward_forget(torch.tensor(1.0))  # does not require grad: backward fails
    opt.backward_retain(linear_loss(params, [torch.full((3,), 2.0)]))
    opt.step()
    torch.testing.assert_close(update_of(params)[0], torch.full((3,), 3.0))


def test_a_rule_class_is_accepted_like_an_instance():
    from gradsynth.rules import Sago

    opt = SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1), Sago)
    assert opt.rule.name == "sago"


def test_step_after_a_plain_backward_is_refused():
    """loss.backward(); opt.step() names no task: refuse instead of stepping on an unsynthesized gradient."""
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    task_losses(model)[1].backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="belongs to no task"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_set_to_none_false_keeps_unreached_buffers_out_of_the_stashes():
    """Zeroed buffers of parameters a task did not reach are not taken as that task's gradient."""
    params = zero_params([(3,), (3,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sum")
    ones = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    opt.backward_forget(linear_loss(params, [ones, ones]))
    opt.backward_retain(linear_loss(params, [ones, ones]))
    opt.step()
    after_first = update_of(params)
    opt.zero_grad(set_to_none=False)  # p.grad of both parameters: zeroed buffers
    opt.backward_forget(linear_loss(params, [ones, None]))
    assert opt._tasks.peek(params[1]) == (None, None)
    opt.backward_retain(linear_loss(params, [ones, None]))
    opt.step()
    torch.testing.assert_close(update_of(params)[0], after_first[0] + 2 * ones)
    assert torch.equal(update_of(params)[1], after_first[1])
    assert torch.equal(params[1].grad, torch.zeros(3))  # plain set_to_none=False behaviour


def test_deepcopy_gives_an_independent_working_wrapper():
    import copy

    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "pcgrad", alpha=0.5)
    clone = copy.deepcopy(opt)
    assert (clone.rule.name, clone.alpha) == ("pcgrad", 0.5)
    assert clone.optimizer is not opt.optimizer
    weight = clone.param_groups[0]["params"][0]
    assert weight is not next(model.parameters())
    before = weight.detach().clone()
    clone.backward_forget(-weight.sum())
    clone.backward_retain(weight.pow(2).sum())
    clone.step()
    assert not torch.equal(weight.detach(), before)
    assert torch.equal(next(model.parameters()).detach(), before)  # the original is untouched
