"""Recipes from the docs, checked end to end: schedulers, clipping, GradScaler, checkpoints, bases."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import RULES
from helpers import collect, linear_loss, small_model, task_losses, train_steps, zero_params

from gradsynth import SynthesizingOptimizer, register_rule, unregister_rule


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


BASES = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("base", list(BASES))
def test_sum_rule_equals_plain_training_on_the_weighted_loss(base):
    """Rule "sum" is invisible: the trajectory of one backward of gamma*Lf + alpha*Lr per step."""
    alpha, gamma = 0.7, 0.3
    plain_model, wrapped_model = small_model(), small_model()
    plain = BASES[base](plain_model.parameters())
    wrapped = SynthesizingOptimizer(BASES[base](wrapped_model.parameters()), "sum", alpha=alpha, gamma=gamma)
    for step in range(5):
        plain.zero_grad()
        lf, lr = task_losses(plain_model, step)
        (gamma * lf + alpha * lr).backward()
        plain.step()
        wrapped.zero_grad()
        collect(wrapped, wrapped_model, step)
        wrapped.step()
    for a, b in zip(_params(plain_model), _params(wrapped_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("rule", RULES)
def test_every_base_takes_the_synthesized_gradient(base, rule):
    """The base optimizer sees exactly the synthesized gradient: compare with feeding it by hand."""
    ref_model, model = small_model(), small_model()
    ref = BASES[base](ref_model.parameters())
    opt = SynthesizingOptimizer(BASES[base](model.parameters()), rule)
    probe = SynthesizingOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.0), rule)
    for step in range(3):
        probe.zero_grad()
        collect(probe, ref_model, step)
        probe.synthesize()  # p.grad of ref_model now holds the synthesized gradient
        ref.step()
        opt.zero_grad()
        collect(opt, model, step)
        opt.step()
        probe.zero_grad()
    for a, b in zip(_params(ref_model), _params(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lr_scheduler_drives_the_base_learning_rate():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    lrs = []
    for step in range(3):
        opt.zero_grad()
        collect(opt, model, step)
        opt.step()
        sched.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert lrs == [0.5, 0.25, 0.125]
    assert sched.state_dict()["last_epoch"] == 3


def test_onecycle_and_cosine_schedulers_accept_the_wrapper():
    opt = SynthesizingOptimizer(torch.optim.AdamW(small_model().parameters(), lr=1e-3))
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)


@pytest.mark.parametrize("rule", RULES)
def test_clipping_acts_on_the_synthesized_gradient(rule):
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), rule)
    collect(opt, model, 0)
    opt.synthesize()
    synthesized = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in synthesized]))
    max_norm = float(total) / 4
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.testing.assert_close(returned, total)
    before = _params(model)
    opt.step()
    for b, a, g in zip(before, _params(model), synthesized, strict=True):
        torch.testing.assert_close(b - a, g * (max_norm / float(total)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base", ["sgd_momentum", "adamw_fused"])
@pytest.mark.parametrize("rule", RULES)
def test_grad_scaler_recipe_gives_the_unscaled_update(rule, base):
    """scaler.scale on each task, synthesize, unscale_, clip, scaler.step == the run without a scaler.

    A fused base optimizer could unscale by itself; the wrapper keeps GradScaler on the plain path.
    """
    ref_model, model = small_model(), small_model()
    ref = SynthesizingOptimizer(BASES[base](ref_model.parameters()), rule)
    opt = SynthesizingOptimizer(BASES[base](model.parameters()), rule)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        ref.zero_grad()
        collect(ref, ref_model, step)
        ref.synthesize()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        ref.step()

        opt.zero_grad()
        lf, lr = task_losses(model, step)
        opt.backward_forget(scaler.scale(lf))
        opt.backward_retain(scaler.scale(lr))
        opt.synthesize()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    for a, b in zip(_params(ref_model), _params(model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_grad_scaler_skips_a_step_with_a_forget_overflow(rule):
    """A forget overflow where retain would win must still make the scaler skip the step."""
    params = zero_params([(4,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), rule)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    f = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    r = torch.tensor([-1.0, 1.0, 1.0, 1.0])  # conflicts with f at the overflow
    opt.backward_forget(scaler.scale(linear_loss(params, [f])))
    opt.backward_retain(scaler.scale(linear_loss(params, [r])))
    opt.synthesize()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(params[0].detach(), torch.zeros(4))  # step skipped
    assert scaler.get_scale() < 4.0  # and the scale backed off


def test_grad_scaler_without_synthesize_fails_loudly():
    """The documented pitfall: unscale_ before synthesize sees no gradient, and the scaler says so."""
    params = zero_params([(4,)])
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago")
    scaler = torch.amp.GradScaler("cpu")
    opt.backward_forget(scaler.scale(linear_loss(params, [torch.ones(4)])))
    opt.backward_retain(scaler.scale(linear_loss(params, [torch.ones(4)])))
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(opt)
    assert torch.equal(params[0].detach(), torch.zeros(4))  # nothing stepped


@pytest.mark.parametrize("rule", RULES)
def test_resume_from_state_dict_is_bit_exact(rule):
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), rule, alpha=0.5, gamma=2.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(opt, model, 3)
    sched.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)

    train_steps(opt, model, 3, start=3)
    uninterrupted = _params(model)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model = small_model()
    resumed_model.load_state_dict(ckpt["model"])
    resumed = SynthesizingOptimizer(
        torch.optim.AdamW(resumed_model.parameters(), lr=1e-2)
    )  # default settings
    rsched = torch.optim.lr_scheduler.StepLR(resumed, step_size=2, gamma=0.5)
    resumed.load_state_dict(ckpt["opt"])
    rsched.load_state_dict(ckpt["sched"])
    assert (resumed.rule.name, resumed.alpha, resumed.gamma) == (rule, 0.5, 2.0)
    train_steps(resumed, resumed_model, 3, start=3)
    for a, b in zip(uninterrupted, _params(resumed_model), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_refused_while_task_gradients_are_pending():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.backward_forget(task_losses(model, 0)[0])
    with pytest.raises(RuntimeError, match="pending"):
        opt.state_dict()
    opt.zero_grad()
    assert opt.state_dict()["gradsynth"]["rule"] == "sago"


def test_plain_base_checkpoint_loads_into_the_wrapper_and_back():
    model = small_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = SynthesizingOptimizer(base, "pcgrad")
    train_steps(opt, model, 2)
    plain_state = base.state_dict()
    other = SynthesizingOptimizer(torch.optim.Adam(small_model().parameters(), lr=1e-2), "pcgrad")
    other.load_state_dict(copy.deepcopy(plain_state))
    assert other.rule.name == "pcgrad"
    fresh_base = torch.optim.Adam(small_model().parameters(), lr=1e-2)
    fresh_base.load_state_dict(opt.optimizer.state_dict())


def test_custom_rule_checkpoint_needs_the_rule_registered():
    register_rule("half_sum", lambda f, r, *, alpha, gamma: 0.5 * (f + r))
    try:
        model = small_model()
        opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "half_sum")
        state = opt.state_dict()
    finally:
        unregister_rule("half_sum")
    other = SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="unknown rule 'half_sum'"):
        other.load_state_dict(state)
    assert other.rule.name == "sago"  # nothing half-loaded


def test_bad_checkpoint_version_is_refused_before_anything_loads():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    state = opt.state_dict()
    state["gradsynth"]["version"] = 99
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="version"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.1


def test_schedulefree_base_train_eval_reach_the_base():
    schedulefree = pytest.importorskip("schedulefree")
    model = small_model()
    opt = SynthesizingOptimizer(schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2), "sago")
    opt.train()
    assert opt.optimizer.param_groups[0]["train_mode"]
    train_steps(opt, model, 2)
    opt.eval()
    assert not opt.optimizer.param_groups[0]["train_mode"]


def test_pytorch_optimizer_base():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model = small_model()
    base = pytorch_optimizer.Lion(model.parameters(), lr=1e-3)
    opt = SynthesizingOptimizer(base, "pcgrad")
    before = _params(model)
    train_steps(opt, model, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))
    state = opt.state_dict()
    assert state["gradsynth"]["rule"] == "pcgrad"


def test_state_dict_hooks_registered_on_the_wrapper_run():
    opt = SynthesizingOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1 and "gradsynth" in state
    state.pop("extra")
    opt.load_state_dict(state)
    assert seen == ["save-pre", "load-pre", "load-post"]
