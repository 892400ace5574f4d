"""SynthesizingOptimizer under faults: checkpoints refused before anything changes, failed syntheses."""

from __future__ import annotations

import pytest
import torch
from helpers import collect, small_model, task_losses

from gradsynth import SynthesizingOptimizer


def _checkpoint(**group_settings):
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    collect(opt, model)
    opt.step()
    state = opt.state_dict()
    state["param_groups"][0].update(group_settings)
    return model, state


@pytest.mark.parametrize(
    ("settings", "exc", "message"),
    [
        ({"rule": "sagoo"}, ValueError, "unknown rule"),
        ({"alpha": -1.0}, ValueError, "non-negative"),
        ({"gamma": float("nan")}, ValueError, "finite"),
        ({"alpha": "1"}, TypeError, "real number"),
    ],
)
def test_bad_group_settings_in_a_checkpoint_are_refused_at_load(settings, exc, message):
    _, state = _checkpoint(**settings)
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(exc, match=message):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.5 and "rule" not in opt.param_groups[0]  # nothing changed
    collect(opt, model)
    opt.step()  # still usable


def test_load_state_dict_after_synthesize_is_refused():
    model, state = _checkpoint()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    collect(opt, model)
    opt.synthesize()
    with pytest.raises(RuntimeError, match="after synthesize"):
        opt.load_state_dict(state)
    opt.zero_grad()
    opt.load_state_dict(state)  # fine once the update is dropped


def _fails_on_vectors(f, r, *, alpha, gamma):
    if f.dim() == 1:
        raise ValueError("this rule does not take biases")
    return alpha * r + gamma * f


def _fails_on_matrices(f, r, *, alpha, gamma):
    if f.dim() == 2:
        raise ValueError("this rule does not take matrices")
    return alpha * r + gamma * f


def _pending_copy(opt, model):
    return [tuple(None if t is None else t.clone() for t in opt._tasks.peek(p)) for p in model.parameters()]


@pytest.mark.parametrize(("rule", "track_geometry"), [(_fails_on_vectors, True), (_fails_on_matrices, False)])
def test_a_rule_that_raises_leaves_the_task_gradients_pending(rule, track_geometry):
    model = small_model()
    opt = SynthesizingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), rule, track_geometry=track_geometry
    )
    collect(opt, model)
    before = _pending_copy(opt, model)
    with pytest.raises(ValueError, match="does not take"):
        opt.step()
    assert opt.pending
    after = _pending_copy(opt, model)
    for (f0, r0), (f1, r1) in zip(before, after, strict=True):
        assert torch.equal(f0, f1) and torch.equal(r0, r1)
    assert all(p.grad is None for p in model.parameters())
    # A retry with a working rule synthesizes from the same gradients, as a fresh step would.
    opt.rule = "sum"
    opt.step()
    reference = small_model()
    fresh = SynthesizingOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), "sum")
    collect(fresh, reference)
    fresh.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_a_rule_that_raises_after_in_place_updates_says_to_redo_the_step():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), _fails_on_vectors)
    collect(opt, model)
    with pytest.raises(RuntimeError, match="redo the step's backward passes"):
        opt.step()
    assert not opt.pending
    opt.rule = "sum"
    lf, lr = task_losses(model)
    opt.backward_forget(lf)
    opt.backward_retain(lr)
    opt.step()  # no "belongs to no task": the state is clean
