"""bitsandbytes 8-bit AdamW as the base optimizer (bitsandbytes >= 0.45 runs its optimizers on CPU)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import RULES
from helpers import collect, train_steps

from gradsynth import SynthesizingOptimizer

bnb = pytest.importorskip("bitsandbytes")


def _model() -> torch.nn.Module:
    # 64*80 = 5120 weights: above bitsandbytes' 4096-element threshold, so its state is really 8-bit.
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 80), torch.nn.Linear(80, 3)
    )


@pytest.mark.parametrize("rule", RULES)
def test_adamw8bit_takes_the_synthesized_gradient(rule):
    ref_model, model = _model(), _model()
    ref = bnb.optim.AdamW8bit(ref_model.parameters(), lr=1e-2)
    probe = SynthesizingOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.0), rule)
    opt = SynthesizingOptimizer(bnb.optim.AdamW8bit(model.parameters(), lr=1e-2), rule)
    for step in range(3):
        probe.zero_grad()
        collect(probe, ref_model, step)
        probe.synthesize()
        ref.step()
        train_steps(opt, model, 1, start=step)
    big = model[2].weight
    assert opt.state[big]["state1"].dtype == torch.uint8  # the 8-bit path ran
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw8bit_checkpoint_resume_is_exact():
    model = _model()
    opt = SynthesizingOptimizer(bnb.optim.AdamW8bit(model.parameters(), lr=1e-2), "pcgrad", alpha=0.5)
    train_steps(opt, model, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(opt, model, 2, start=2)

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed_model = _model()
    resumed_model.load_state_dict(ckpt["model"])
    resumed = SynthesizingOptimizer(bnb.optim.AdamW8bit(resumed_model.parameters(), lr=1e-2))
    resumed.load_state_dict(ckpt["opt"])
    assert (resumed.rule.name, resumed.alpha) == ("pcgrad", 0.5)
    train_steps(resumed, resumed_model, 2, start=2)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
