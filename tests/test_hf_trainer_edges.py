"""The edges a Trainer user hits first (issue 10): unpaired and per-task evaluation, an optimizer
that misses the trainable parameters, resume against explicit settings, the padding collator,
Trainer features that act on a single loss, per-task token normalisation under accumulation,
and streaming through the trainer."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from hf_helpers import VOCAB, fresh_accelerate_state, paired_examples, params_of, tiny_llama, training_args

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradsynth import SynthesizingOptimizer  # noqa: E402
from gradsynth.integrations.hf_trainer import SynthesizingTrainer  # noqa: E402
from gradsynth.integrations.task_batches import TaskPairCollator, split_task_pair  # noqa: E402
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state


def _args(tmp_path, **overrides) -> transformers.TrainingArguments:
    settings = {"per_device_eval_batch_size": 2, "learning_rate": 1e-2, "max_steps": 1, **overrides}
    return training_args(tmp_path, **settings)


def _stacked(examples, side):
    return {k: torch.stack([torch.as_tensor(e[side][k]) for e in examples]) for k in ("input_ids", "labels")}


# ----- 1. evaluation --------------------------------------------------------------------------


def test_unpaired_eval_sets_and_per_task_losses_of_paired_ones(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokens = [[1, 2, 3, 4]] * 8
    unpaired = datasets.Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    paired = paired_examples(6, seed=5)
    model = tiny_llama()
    trainer = SynthesizingTrainer(
        model, _args(tmp_path), train_dataset=paired_examples(4), eval_dataset=unpaired
    )
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor(tokens[:1]), labels=torch.tensor(tokens[:1])).loss)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert "eval_forget_loss" not in metrics

    # A dict of eval sets, one of each kind; the paired one reports each task's loss.
    metrics = trainer.evaluate({"plain": unpaired, "pairs": paired})
    assert metrics["eval_plain_loss"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        forget = float(gradient_ascent_loss(model, _stacked(paired, "forget")))
        retain = float(nll_loss(model, _stacked(paired, "retain")))
    assert metrics["eval_pairs_forget_loss"] == pytest.approx(forget, rel=1e-5)
    assert metrics["eval_pairs_retain_loss"] == pytest.approx(retain, rel=1e-5)
    assert metrics["eval_pairs_loss"] == pytest.approx(forget + retain, rel=1e-5)

    # remove_unused_columns=False takes the same path.
    kept = SynthesizingTrainer(
        model, _args(tmp_path, remove_unused_columns=False), train_dataset=paired, eval_dataset=unpaired
    )
    assert kept.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


# ----- 2. an optimizer that misses the trainable parameters -------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_an_optimizer_built_before_get_peft_model_is_refused_naming_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    early = torch.optim.AdamW(base.parameters(), lr=1e-2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    trainer = SynthesizingTrainer(
        model, _args(tmp_path), train_dataset=paired_examples(2), optimizers=(early, None)
    )
    with pytest.raises(ValueError, match=r"manages none of the model's 8 trainable parameters.*lora_A"):
        trainer.train()


def test_an_optimizer_missing_some_trainable_parameters_is_refused(tmp_path):
    model = tiny_llama()
    partial = torch.optim.SGD([p for n, p in model.named_parameters() if "embed" not in n], lr=0.1)
    trainer = SynthesizingTrainer(
        model, _args(tmp_path), train_dataset=paired_examples(2), optimizers=(partial, None)
    )
    with pytest.raises(ValueError, match=r"1 of the model's \d+ trainable parameters.*embed_tokens"):
        trainer.train()
    # Frozen parameters may stay out of it.
    model.model.embed_tokens.weight.requires_grad_(False)
    fresh = SynthesizingTrainer(
        model,
        _args(tmp_path),
        train_dataset=paired_examples(2),
        optimizers=(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), None),
    )
    fresh.train()


# ----- 3. resume against explicit settings ------------------------------------------------------


def _checkpoint(tmp_path, **settings):
    trainer = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path / "first", max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=paired_examples(8),
        **settings,
    )
    trainer.train()
    return tmp_path / "first" / "checkpoint-1"


def test_resume_explicit_trainer_settings_win_loudly_and_unset_ones_are_restored(tmp_path):
    checkpoint = _checkpoint(tmp_path, rule="sago", gamma=0.5)
    examples = paired_examples(8)
    explicit = SynthesizingTrainer(
        tiny_llama(), _args(tmp_path / "b", max_steps=2), train_dataset=examples, rule="pcgrad", alpha=0.5
    )
    with pytest.warns(UserWarning, match=r"rule='sago' -> 'pcgrad', alpha=1\.0 -> 0\.5") as caught:
        explicit.train(resume_from_checkpoint=str(checkpoint))
    assert (
        len([w for w in caught if "resuming" in str(w.message) or "load_state_dict" in str(w.message)]) == 1
    )
    opt = explicit.synthesizing_optimizer
    assert (opt.rule.name, opt.alpha, opt.gamma) == ("pcgrad", 0.5, 0.5)  # gamma was not given: restored

    unset = SynthesizingTrainer(tiny_llama(), _args(tmp_path / "c", max_steps=2), train_dataset=examples)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(resuming|load_state_dict).*")
        unset.train(resume_from_checkpoint=str(checkpoint))
    opt = unset.synthesizing_optimizer
    assert (opt.rule.name, opt.alpha, opt.gamma) == ("sago", 1.0, 0.5)

    # A SynthesizingOptimizer passed in follows its own load_state_dict: the checkpoint's, loudly.
    model = tiny_llama()
    own = SynthesizingTrainer(model, _args(tmp_path / "d", max_steps=2), train_dataset=examples)
    decay = set(own.get_decay_parameter_names(model))  # the checkpoint's two groups
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay]},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    own.optimizer = passed = SynthesizingOptimizer(torch.optim.AdamW(groups, lr=1e-2), "pcgrad")
    with pytest.warns(UserWarning, match=r"load_state_dict: .*rule='pcgrad' -> 'sago'"):
        own.train(resume_from_checkpoint=str(checkpoint))
    assert (passed.rule.name, passed.gamma) == ("sago", 0.5)


def test_load_state_dict_replaces_the_optimizers_settings_with_a_warning_naming_both():
    model = torch.nn.Linear(3, 2)
    saved = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sago", alpha=2.0).state_dict()
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", alpha=0.5)
    with pytest.warns(UserWarning, match=r"rule='pcgrad' -> 'sago', alpha=0\.5 -> 2\.0"):
        opt.load_state_dict(saved)
    assert (opt.rule.name, opt.alpha) == ("sago", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved)  # nothing changes: silent
        restored = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        restored.load_state_dict(saved)  # built with the defaults to restore: silent
    assert (restored.rule.name, restored.alpha) == ("sago", 2.0)


# ----- 4. the collator ---------------------------------------------------------------------------


def _ragged_pair(n_forget, n_retain, offset=0, hide=0):
    forget = torch.arange(offset, offset + n_forget) % VOCAB
    retain = torch.arange(offset + 7, offset + 7 + n_retain) % VOCAB
    labels = retain.clone()
    labels[:hide] = -100
    return {
        "forget": {"input_ids": forget, "labels": forget.clone()},
        "retain": {"input_ids": retain, "labels": labels},
    }


def test_the_default_collator_pads_ragged_pairs_with_ignored_labels(tmp_path):
    batch = TaskPairCollator()([_ragged_pair(3, 5), _ragged_pair(6, 2, offset=1)])
    forget, retain = split_task_pair(batch)
    assert forget["input_ids"].shape == (2, 6) and retain["labels"].shape == (2, 5)
    assert forget["labels"][0].tolist() == [0, 1, 2, -100, -100, -100]
    assert forget["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert retain["input_ids"][1].tolist() == [8, 9, 0, 0, 0]
    # Padding changes no loss: each padded row's loss is the loss of the row alone.
    model = tiny_llama()
    with torch.no_grad():
        alone = model(input_ids=torch.arange(3)[None], labels=torch.arange(3)[None]).loss
        padded = model(**{k: v[:1] for k, v in forget.items()}).loss
    torch.testing.assert_close(padded, alone)
    # Through the trainer, ragged data trains.
    data = [_ragged_pair(3 + i % 4, 2 + i % 3, offset=i) for i in range(4)]
    SynthesizingTrainer(tiny_llama(), _args(tmp_path), train_dataset=data).train()


def test_the_documented_tokenizer_collators(tmp_path):
    """What docs/huggingface.md says of the tokenizer collators: Seq2Seq pads labels, the others fail."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(1, VOCAB)} | {"[PAD]": 0}
    model = tokenizers.models.WordLevel(vocab, unk_token="t1")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), pad_token="[PAD]"
    )
    ragged = [_ragged_pair(3, 2), _ragged_pair(1, 3, offset=5, hide=1)]
    forget, retain = split_task_pair(TaskPairCollator(transformers.DataCollatorForSeq2Seq(tok))(ragged))
    assert forget["labels"].tolist() == [[0, 1, 2], [5, -100, -100]]
    assert retain["labels"].tolist() == [[7, 8, -100], [-100, 13, 14]]
    for collator in (
        transformers.DataCollatorWithPadding(tok),
        transformers.DataCollatorForLanguageModeling(tok, mlm=False),
    ):
        with pytest.raises(ValueError, match="Unable to create tensor"):
            TaskPairCollator(collator)(ragged)


def test_the_unpaired_batch_error_names_an_importable_collator():
    with pytest.raises(ValueError, match="'forget' and 'retain'") as error:
        split_task_pair({"input_ids": torch.arange(3)})
    path = str(error.value).rsplit("with ", 1)[1]
    module = path.partition(".TaskPairCollator")[0]
    assert importlib.import_module(module).TaskPairCollator is TaskPairCollator
    with pytest.raises(ValueError, match="'forget' and 'retain'"):
        TaskPairCollator()([_ragged_pair(2, 2), {"input_ids": torch.arange(2)}])


# ----- 5. Trainer features -----------------------------------------------------------------------


def test_single_loss_features_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        SynthesizingTrainer(tiny_llama(), _args(tmp_path, label_smoothing_factor=0.5))
    with pytest.raises(ValueError, match="compute_loss_func"):
        SynthesizingTrainer(tiny_llama(), _args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="compute_metrics"):
        SynthesizingTrainer(
            tiny_llama(), _args(tmp_path), eval_dataset=paired_examples(2), compute_metrics=lambda p: {}
        )


def test_compute_metrics_on_unpaired_eval_and_tokens_seen_count_both_tasks(tmp_path):
    calls = []

    def metrics(prediction):
        calls.append(prediction)
        return {"seen": float(prediction.label_ids.size)}

    tokens = torch.arange(8)
    unpaired = [{"input_ids": tokens, "labels": tokens}] * 4
    trainer = SynthesizingTrainer(
        tiny_llama(),
        _args(tmp_path, max_steps=2, include_num_input_tokens_seen="all"),
        train_dataset=paired_examples(4, length=8),
        eval_dataset=unpaired,
        compute_metrics=metrics,
    )
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 2 * 2 * (8 + 8)  # 2 steps x 2 pairs x both sides
    assert trainer.evaluate()["eval_seen"] == 4 * 8 and len(calls) == 1
    with pytest.raises(ValueError, match="compute_metrics"):
        trainer.evaluate(paired_examples(2))


# ----- 6. per-task token normalisation under accumulation ---------------------------------------


def _uneven_pairs():
    """Four pairs; the first two carry few label tokens, the last two many (uneven micro-batches)."""
    return [
        _ragged_pair(4, 5, offset=0, hide=3),
        _ragged_pair(3, 6, offset=3, hide=4),
        _ragged_pair(9, 9, offset=5),
        _ragged_pair(8, 7, offset=9),
    ]


@pytest.mark.parametrize("rule", ["sago", "sum"])
def test_accumulation_over_uneven_micro_batches_equals_the_whole_batch(tmp_path, rule):
    def one_step(batch_size, accumulation):
        trainer = SynthesizingTrainer(
            tiny_llama(),
            _args(
                tmp_path,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                optim="sgd",
                learning_rate=0.1,
                max_grad_norm=0.0,
                lr_scheduler_type="constant",
                train_sampling_strategy="sequential",
            ),
            train_dataset=_uneven_pairs(),
            rule=rule,
        )
        trainer.train()
        return params_of(trainer.model), trainer.state.log_history[0]

    whole, whole_log = one_step(4, 1)
    accumulated, accumulated_log = one_step(2, 2)
    for name, p in whole.items():
        torch.testing.assert_close(accumulated[name], p, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("forget_loss", "retain_loss"):
        assert accumulated_log[key] == pytest.approx(whole_log[key], rel=1e-5)


# ----- 7. streaming through the trainer ----------------------------------------------------------


def test_streaming_through_the_trainer_follows_the_same_trajectory(tmp_path):
    def run(**settings):
        trainer = SynthesizingTrainer(
            tiny_llama(), _args(tmp_path, max_steps=3), train_dataset=paired_examples(8), **settings
        )
        trainer.train()
        return trainer, params_of(trainer.model)

    streamed, streamed_params = run(streaming=True)
    assert streamed.synthesizing_optimizer.streaming
    _, held_params = run()
    for name, p in held_params.items():
        torch.testing.assert_close(streamed_params[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert all(entry["geometry/cos_gr"] >= 0 for entry in streamed.state.log_history if "loss" in entry)

    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        SynthesizingTrainer(tiny_llama(), _args(tmp_path, gradient_accumulation_steps=2), streaming=True)
    model = tiny_llama()
    passed = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), streaming=True)
    trainer = SynthesizingTrainer(
        model,
        _args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=paired_examples(4),
        optimizers=(passed, None),
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer.train()
