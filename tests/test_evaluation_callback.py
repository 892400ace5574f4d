"""Scores during training: `SplitScores` (every split's recall, NLL, multiple choice) and
`EvaluationCallback` logging them every N optimizer steps through `SynthesizingTrainer`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_helpers import fresh_accelerate_state, training_args

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradsynth.integrations.evaluation_callback import EvaluationCallback  # noqa: E402
from gradsynth.integrations.hf_trainer import SynthesizingTrainer  # noqa: E402
from gradsynth.unlearning.encoding import Example, encode, make_batches, prompt_of  # noqa: E402
from gradsynth.unlearning.evaluate import split_metrics  # noqa: E402
from gradsynth.unlearning.multiple_choice import make_choices, mc_accuracy  # noqa: E402
from gradsynth.unlearning.split_scores import SplitScores  # noqa: E402
from gradsynth.world import SIZES, build_world, split_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state


@pytest.fixture
def world(ci_world_master):
    from gradsynth.world.cache import _load_entry

    model, tokenizer, _ = _load_entry(Path(ci_world_master))
    splits = split_world(build_world(SIZES["ci"], 0), SIZES["ci"], 0)
    examples = {
        name: [Example(prompt_of(f.question), f.answer) for f in facts]
        for name, facts in splits.by_name().items()
        if name in ("forget", "retain")
    }
    return model, tokenizer, examples


def test_split_scores_are_the_metrics_of_each_split(world):
    model, tokenizer, examples = world
    scores = SplitScores(tokenizer, examples, max_length=64)(model)
    assert set(scores) == {f"{s}/{m}" for s in examples for m in ("nll", "recall", "mc_acc")}
    for name, split in examples.items():
        direct = split_metrics(model, make_batches(tokenizer, split, 64, 64))
        assert scores[f"{name}/nll"] == pytest.approx(direct["nll"])
        assert scores[f"{name}/recall"] == direct["recall"]
        # The options: the split's other answers; the context: each example's own prompt.
        choices = make_choices([(e.prompt, e.answer, name) for e in split], {name: {e.answer for e in split}})
        choices = [replace(c, context=e.prompt) for c, e in zip(choices, split, strict=True)]
        assert all(c.context.endswith("? Answer:") for c in choices)
        assert scores[f"{name}/mc_acc"] == mc_accuracy(model, tokenizer, choices)
    assert scores["retain/recall"] == 1.0  # the CI model memorised its retain facts


def test_split_scores_refuse_empty_input(world):
    _, tokenizer, _ = world
    with pytest.raises(ValueError, match="no splits"):
        SplitScores(tokenizer, {})
    with pytest.raises(ValueError, match="'forget' has no examples"):
        SplitScores(tokenizer, {"forget": []})


def test_the_callback_logs_the_scores_every_n_steps_and_at_the_last(world, tmp_path):
    model, tokenizer, examples = world
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    pairs = []
    for forget, retain in zip(examples["forget"], examples["retain"], strict=False):
        f_ids, f_labels = encode(tokenizer, forget, 64)
        r_ids, r_labels = encode(tokenizer, retain, 64)
        pairs.append(
            {
                "forget": {"input_ids": f_ids, "labels": f_labels},
                "retain": {"input_ids": r_ids, "labels": r_labels},
            }
        )
    seen = []
    splits = SplitScores(tokenizer, {"forget": examples["forget"]}, max_length=64)

    def scores(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return splits(m)

    from gradsynth.integrations.task_batches import TaskPairCollator

    trainer = SynthesizingTrainer(
        model,
        training_args(tmp_path, learning_rate=1e-3, max_steps=5),
        train_dataset=pairs,
        data_collator=TaskPairCollator(pad_token_id=pad),
        callbacks=[EvaluationCallback(scores, every=2)],
    )
    trainer.train()
    assert seen == [(False, False)] * 3  # steps 2, 4 and the last (5), in eval mode, no gradients
    assert model.training  # restored
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(logs) == [1, 2, 3, 4, 5]
    for step, entry in logs.items():
        assert ("eval_splits/forget/recall" in entry) == (step in (2, 4, 5)), (step, entry)
    assert {"eval_splits/forget/nll", "eval_splits/forget/mc_acc"} <= set(logs[5])
    assert logs[5]["eval_splits/forget/nll"] > logs[2]["eval_splits/forget/nll"]  # gradient ascent


def test_the_callback_refuses_bad_settings():
    with pytest.raises(ValueError, match="every must be"):
        EvaluationCallback(lambda m: {}, every=0)
    with pytest.raises(TypeError, match="callable"):
        EvaluationCallback({"a": 1}, every=1)
