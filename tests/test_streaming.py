"""streaming=True: the same update as the default path, the first task's gradients released during
the second backward, and clear refusals where streaming would be wrong."""

from __future__ import annotations

import pytest
import torch
from helpers import small_model, task_losses

from gradsynth import SynthesizingOptimizer

PER_TENSOR_RULES = ["sago", "sago_prefer_retain", "pcgrad", "sum"]


def _run(rule, streaming, order, *, first_micro=2, track_geometry=False, steps=2):
    model = small_model()
    opt = SynthesizingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        rule,
        alpha=0.7,
        gamma=1.3,
        streaming=streaming,
        track_geometry=track_geometry,
    )
    for step in range(steps):
        opt.zero_grad()
        first, second = order
        for micro in range(first_micro):
            losses = dict(zip(("forget", "retain"), task_losses(model, seed=10 * step + micro), strict=True))
            getattr(opt, f"backward_{first}")(losses[first])
        losses = dict(zip(("forget", "retain"), task_losses(model, seed=10 * step + 5), strict=True))
        getattr(opt, f"backward_{second}")(losses[second])
        opt.synthesize()
        synthesized = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return model, synthesized, opt.geometry


@pytest.mark.parametrize("order", [("forget", "retain"), ("retain", "forget")])
@pytest.mark.parametrize("rule", PER_TENSOR_RULES)
def test_streaming_gives_the_same_update(rule, order):
    model_a, grads_a, _ = _run(rule, False, order)
    model_b, grads_b, _ = _run(rule, True, order)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_streaming_geometry_matches():
    _, _, plain = _run("sago", False, ("forget", "retain"), track_geometry=True)
    _, _, streamed = _run("sago", True, ("forget", "retain"), track_geometry=True)
    assert plain is not None and streamed is not None
    for key, value in plain.as_dict().items():
        assert streamed.as_dict()[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_parameters_one_task_misses_are_still_synthesized():
    torch.manual_seed(0)
    shared, only_forget, only_retain = (torch.nn.Linear(4, 4) for _ in range(3))
    params = [*shared.parameters(), *only_forget.parameters(), *only_retain.parameters()]
    x = torch.randn(3, 4)
    results = []
    for streaming in (False, True):
        for p, value in zip(params, [q.detach().clone() for q in params], strict=True):
            p.data.copy_(value)
        opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), "sago", streaming=streaming)
        opt.zero_grad()
        opt.backward_forget(-only_forget(shared(x)).pow(2).sum())
        opt.backward_retain(only_retain(shared(x)).pow(2).sum())
        opt.synthesize()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


class _Probe(torch.autograd.Function):
    """Identity whose backward runs a callback: between the layers above it and those below."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


def test_first_task_gradients_are_released_during_the_second_backward():
    torch.manual_seed(0)
    lower, upper = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = SynthesizingOptimizer(
        torch.optim.SGD([*lower.parameters(), *upper.parameters()], lr=0.1), streaming=True
    )
    x = torch.randn(4, 8)
    seen = {}

    def midway():
        # Autograd has finished the upper layer's gradients but not yet the lower layer's.
        seen["upper"] = [opt._tasks.peek(p)[0] for p in upper.parameters()]
        seen["lower"] = [opt._tasks.peek(p)[0] for p in lower.parameters()]

    opt.zero_grad()
    opt.backward_forget(-upper(lower(x)).pow(2).mean())
    opt.backward_retain(upper(_Probe.apply(lower(x), midway)).pow(2).mean())
    assert all(f is None for f in seen["upper"]), "upper layer's forget gradients still held"
    assert all(f is not None for f in seen["lower"])
    assert not opt.pending


def test_a_failed_streaming_backward_leaves_no_half_synthesized_state():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), streaming=True)
    forget, retain = task_losses(model)
    opt.zero_grad()
    opt.backward_forget(forget)

    def fail():
        raise RuntimeError("boom")

    broken = _Probe.apply(retain, fail)
    with pytest.raises(RuntimeError, match="boom"):
        opt.backward_retain(broken)
    assert not opt.pending
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad()
    forget, retain = task_losses(model)
    opt.backward_forget(forget)
    opt.backward_retain(retain)
    opt.step()


def test_streaming_refuses_rules_that_need_the_whole_scope():
    model = small_model()
    with pytest.raises(ValueError, match=r"'pcgrad_global' needs every gradient.*streaming=False"):
        SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad_global", streaming=True)
    params = list(model.parameters())
    opt = SynthesizingOptimizer(torch.optim.SGD(params[:2], lr=0.1), "sago", streaming=True)
    opt.add_param_group({"params": params[2:], "rule": "pcgrad_global"})
    forget, retain = task_losses(model)
    opt.backward_forget(forget)
    with pytest.raises(ValueError, match="cannot stream"):
        opt.backward_retain(retain)


def test_streaming_refuses_a_second_task_without_its_loss():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), streaming=True)
    forget, retain = task_losses(model)
    opt.backward_forget(forget)  # the first task may come from anywhere
    retain.backward()
    with pytest.raises(ValueError, match=r"backward_retain\(loss\)"):
        opt.backward_retain(None)


def test_streaming_refuses_accumulation_on_the_second_task():
    model = small_model()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), streaming=True)
    forget, retain = task_losses(model)
    opt.backward_forget(forget)
    opt.backward_retain(retain)
    _, retain = task_losses(model, seed=1)
    with pytest.raises(RuntimeError, match="exactly one for the other"):
        opt.backward_retain(retain)


def test_streaming_refuses_distributed_training(monkeypatch):
    model = small_model()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"2 ranks.*before it is all-reduced.*streaming=False"):
        SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), streaming=True)


@pytest.mark.parametrize("rule", ["sago", "pcgrad"])
def test_streaming_with_the_fused_kernels(rule):
    # The hooks run the compiled kernels inside autograd's backward.
    from gradsynth.rules import fused

    with fused.use_backend("compiled", min_numel=0):
        model_a, grads_a, _ = _run(rule, False, ("forget", "retain"))
        model_b, grads_b, _ = _run(rule, True, ("forget", "retain"))
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
