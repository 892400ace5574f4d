"""SynthesizingTrainer on a tiny Llama: equal to a hand-written loop, one synthesis per step,
clipping on the synthesized gradient, exact resume, bf16 on CPU, the optimizer hand-over rules."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import (
    fresh_accelerate_state,
    paired_examples,
    params_of,
    reference_run,
    tiny_llama,
    training_args,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradsynth import SynthesizingOptimizer  # noqa: E402
from gradsynth.integrations.hf_trainer import SynthesizingTrainer  # noqa: E402
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state

LR, MAX_NORM = 3e-3, 0.5


def _args(tmp_path, **overrides) -> transformers.TrainingArguments:
    return training_args(tmp_path, **{"learning_rate": LR, "max_steps": 3, **overrides})


class Recorder:
    """Loss callables that remember every micro-batch they saw (to replay them by hand)."""

    def __init__(self):
        self.forget, self.retain = [], []

    def forget_loss(self, model, batch):
        self.forget.append({k: v.clone() for k, v in batch.items()})
        return gradient_ascent_loss(model, batch)

    def retain_loss(self, model, batch):
        self.retain.append({k: v.clone() for k, v in batch.items()})
        return nll_loss(model, batch)


def _training_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# The per-micro-batch variant steps the base directly, which the LR scheduler cannot see.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_trainer_equals_the_hand_written_loop_with_one_synthesis_per_step(tmp_path, monkeypatch):
    """Accumulation 2, clipping, a linear schedule and a passed-in AdamW: the same trajectory by hand."""
    steps, accumulation = 3, 2
    syntheses = []
    real_synthesize = SynthesizingOptimizer.synthesize

    def counting_synthesize(self):
        syntheses.append(self.pending)
        real_synthesize(self)

    monkeypatch.setattr(SynthesizingOptimizer, "synthesize", counting_synthesize)
    recorder = Recorder()
    model = tiny_llama()
    # A plain optimizer and a scheduler built on it: the trainer wraps the optimizer, the scheduler follows.
    adamw = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(adamw, 0, steps)
    trainer = SynthesizingTrainer(
        model,
        _args(tmp_path, gradient_accumulation_steps=accumulation, max_steps=steps, max_grad_norm=MAX_NORM),
        train_dataset=paired_examples(16),
        forget_loss=recorder.forget_loss,
        retain_loss=recorder.retain_loss,
        optimizers=(adamw, schedule),
    )
    trainer.train()
    # Exactly one synthesis that did work per optimizer step (step() may call it again, idle).
    assert syntheses.count(True) == steps
    assert len(recorder.forget) == len(recorder.retain) == steps * accumulation
    monkeypatch.undo()

    by_hand, norms = reference_run(
        recorder.forget, recorder.retain, steps, accumulation, lr=LR, max_norm=MAX_NORM
    )
    for name, p in params_of(model).items():
        torch.testing.assert_close(p, by_hand.get_parameter(name).detach(), rtol=1e-5, atol=1e-6, msg=name)

    logs = _training_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    # The Trainer's grad_norm is the pre-clip norm of the synthesized gradient, which was clipped.
    assert [entry["grad_norm"] for entry in logs] == pytest.approx(norms, rel=1e-5)
    assert [entry["geometry/norm_g"] for entry in logs] == pytest.approx(norms, rel=1e-5)
    assert all(n > MAX_NORM for n in norms)
    assert all(entry["geometry/norm_g"] != pytest.approx(entry["geometry/norm_f"]) for entry in logs)
    lrs = [entry["learning_rate"] for entry in logs]
    assert lrs == pytest.approx([LR * (1 - s / steps) for s in range(steps)])
    for entry in logs:
        assert entry["forget_loss"] < 0 < entry["retain_loss"]
        assert entry["loss"] == pytest.approx(entry["forget_loss"] + entry["retain_loss"], abs=1e-5)
        assert entry["geometry/cos_gr"] >= 0  # SAGO never opposes retention

    # Synthesizing each micro-batch instead is a different (wrong) trajectory: the test can tell.
    per_micro_batch, _ = reference_run(
        recorder.forget,
        recorder.retain,
        steps,
        accumulation,
        lr=LR,
        max_norm=MAX_NORM,
        synthesize_per_micro_batch=True,
    )
    assert any(
        not torch.allclose(p, per_micro_batch.get_parameter(n).detach(), rtol=1e-5, atol=1e-6)
        for n, p in params_of(model).items()
    )


def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path):
    examples = paired_examples(16)
    full = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=examples,
        rule="pcgrad",
        alpha=0.5,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["gradsynth"]["rule"] == "pcgrad" and saved["gradsynth"]["alpha"] == 0.5

    resumed = SynthesizingTrainer(
        tiny_llama(seed=123),  # other weights: the checkpoint must restore them
        _args(tmp_path / "full", max_steps=4, save_strategy="no"),
        train_dataset=examples,
        rule="pcgrad",
        alpha=0.5,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    expected = params_of(full.model)
    for name, p in params_of(resumed.model).items():
        assert torch.equal(p, expected[name]), name
    opt = resumed.synthesizing_optimizer
    assert (opt.rule.name, opt.alpha) == ("pcgrad", 0.5)


def test_bf16_autocast_on_cpu(tmp_path):
    """bf16=True, use_cpu=True: Accelerate autocasts the forward passes; the master weights stay fp32."""
    model = tiny_llama()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = params_of(model)
    trainer = SynthesizingTrainer(
        model, _args(tmp_path, bf16=True, max_steps=2), train_dataset=paired_examples(8)
    )
    trainer.train()
    assert seen == [torch.bfloat16] * 4  # 2 steps x (forget, retain)
    after = params_of(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(0 <= entry["geometry/cos_gr"] <= 1 for entry in _training_logs(trainer))


def test_wrapped_optimizer_is_taken_as_is_and_settings_twice_are_refused(tmp_path):
    model = tiny_llama()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad_global", gamma=0.3)
    trainer = SynthesizingTrainer(
        model, _args(tmp_path, max_steps=1), train_dataset=paired_examples(2), optimizers=(opt, None)
    )
    trainer.train()
    assert trainer.synthesizing_optimizer is opt
    assert trainer.optimizer.optimizer is opt  # AcceleratedOptimizer around ours, not ours around ours
    with pytest.raises(ValueError, match="set them in one place"):
        SynthesizingTrainer(model, _args(tmp_path), rule="sago", optimizers=(opt, None))
    with pytest.raises(ValueError, match="already"):
        SynthesizingOptimizer(opt)


def test_an_optimizer_over_another_model_is_refused(tmp_path):
    other = tiny_llama()
    trainer = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path),
        train_dataset=paired_examples(2),
        optimizers=(torch.optim.SGD(other.parameters(), lr=0.1), None),
    )
    with pytest.raises(ValueError, match="not the model's"):
        trainer.train()


def test_unpaired_batches_are_refused_with_the_fix(tmp_path):
    trainer = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path, max_steps=1),
        train_dataset=[{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 2,
        data_collator=transformers.default_data_collator,
    )
    with pytest.raises(ValueError, match="'forget' and 'retain'"):
        trainer.train()


def test_schedulefree_base_through_the_trainer(tmp_path):
    pytest.importorskip("schedulefree")
    modes = []

    def retain_loss(model, batch):
        modes.append(trainer.synthesizing_optimizer.optimizer.param_groups[0]["train_mode"])
        return nll_loss(model, batch)

    trainer = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path, max_steps=2, optim="schedule_free_adamw", lr_scheduler_type="constant"),
        train_dataset=paired_examples(4),
        eval_dataset=paired_examples(2, seed=5),
        retain_loss=retain_loss,
    )
    trainer.train()
    base = trainer.synthesizing_optimizer.optimizer
    assert type(base).__name__ == "AdamWScheduleFree"
    assert modes == [True, True]  # training_step put the base in train mode
    metrics = trainer.evaluate()
    assert not base.param_groups[0]["train_mode"]  # evaluate() reached the base's eval()
    assert metrics["eval_loss"] == pytest.approx(
        _paired_loss(trainer.model, paired_examples(2, seed=5)), rel=1e-4
    )


def _paired_loss(model, examples):
    """L_f + L_r over examples batched together, in eval mode, as evaluate() must compute it."""
    model.eval()
    with torch.no_grad():
        batch = {
            side: {k: torch.stack([e[side][k] for e in examples]) for k in ("input_ids", "labels")}
            for side in ("forget", "retain")
        }
        return float(gradient_ascent_loss(model, batch["forget"]) + nll_loss(model, batch["retain"]))


def test_a_step_the_scaler_skipped_leaves_nothing_behind(tmp_path):
    """A GradScaler overflow skips optimizer.step(), so the synthesis stays in p.grad; the next
    step must start clean and synthesize from its own micro-batch only."""
    model = tiny_llama()
    trainer = SynthesizingTrainer(model, _args(tmp_path), train_dataset=paired_examples(4))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    batches = [trainer.data_collator(paired_examples(2, seed=s)) for s in (7, 8)]
    trainer.training_step(model, batches[0])  # synthesized; the step is then "skipped"
    model.zero_grad()  # what the Trainer does after its (skipped) optimizer step
    trainer.training_step(model, batches[1])
    after_skip = [p.grad.clone() for p in model.parameters()]

    fresh = SynthesizingTrainer(tiny_llama(), _args(tmp_path), train_dataset=paired_examples(4))
    fresh.create_optimizer()
    fresh.current_gradient_accumulation_steps = 1
    fresh.training_step(fresh.model, batches[1])
    for a, b in zip(after_skip, (p.grad for p in fresh.model.parameters()), strict=True):
        assert torch.equal(a, b)
