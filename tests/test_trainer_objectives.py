"""The unlearning objectives by name in `SynthesizingTrainer`: the same steps as a hand-written loop
over the formulas, references prepared from the model before the first step, the refusal data."""

from __future__ import annotations

import math

import pytest
import torch
from hf_helpers import VOCAB, fresh_accelerate_state, params_of, tiny_llama, training_args

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradsynth import SynthesizingOptimizer  # noqa: E402
from gradsynth.integrations.hf_trainer import SynthesizingTrainer  # noqa: E402
from gradsynth.integrations.task_losses import register_task_loss, task_loss  # noqa: E402
from gradsynth.unlearning.objectives import (  # noqa: E402
    idkdpo_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    sequence_logprob,
    simnpo_loss,
    undial_loss,
)
from gradsynth.unlearning.trainer_losses import (  # noqa: E402
    IDK_ANSWERS,
    KL,
    NPO,
    UNDIAL,
    IdkDPO,
    SimNPO,
    with_idk_answers,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state

LR, PROMPT, LENGTH = 1e-2, 3, 8


class CharTokenizer:
    """Characters to ids below the tiny model's vocabulary; ``eos_token_id`` 1."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % (VOCAB - 2) for c in text]}


def _examples(n: int, seed: int = 1) -> list[dict]:
    """Paired examples with a 3-token prompt (labels -100) and an answer ending in eos."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        sides = []
        for _ in range(2):
            ids = [*torch.randint(2, VOCAB, (LENGTH - 1,), generator=g).tolist(), 1]
            sides.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
        rows.append({"forget": sides[0], "retain": sides[1]})
    return rows


def _with_refusals(rows: list[dict]) -> list[dict]:
    forget = with_idk_answers([row["forget"] for row in rows], CharTokenizer())
    return [{"forget": f, "retain": row["retain"]} for f, row in zip(forget, rows, strict=True)]


class Recording:
    """A named loss that also keeps every batch it saw (to replay them by hand)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        if hasattr(inner, "prepare"):
            self.prepare = inner.prepare

    def __call__(self, model, batch):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return self.inner(model, batch)


def _logits(model, batch, prefix=""):
    ids = batch[f"{prefix}input_ids"]
    mask = batch.get(f"{prefix}attention_mask", torch.ones_like(ids))
    return model(input_ids=ids, attention_mask=mask).logits


def _by_hand(name: str, model, ref, batch):
    """The forget or retain loss ``name`` of ``model`` straight from the formulas, ``ref`` frozen."""
    labels = batch["labels"]
    with torch.no_grad():
        ref_logits = _logits(ref, batch)
    logits = _logits(model, batch)
    if name == "nll":
        return nll_loss(logits, labels)
    if name == "kl":
        return kl_loss(logits, ref_logits, labels)
    if name == "undial":
        return undial_loss(logits, ref_logits, labels, 10.0)
    logprob, length = sequence_logprob(logits, labels)
    if name == "simnpo":
        return simnpo_loss(logprob, length, 0.1, 0.0)
    ref_logprob = sequence_logprob(ref_logits, labels)[0]
    if name == "npo":
        return npo_loss(logprob, ref_logprob, 0.1)
    with torch.no_grad():
        ref_idk = sequence_logprob(_logits(ref, batch, "idk_"), batch["idk_labels"])[0]
    idk = sequence_logprob(_logits(model, batch, "idk_"), batch["idk_labels"])[0]
    return idkdpo_loss(idk, ref_idk, logprob, ref_logprob, 0.1)


@pytest.mark.parametrize(
    ("forget", "retain"),
    [("npo", "nll"), ("simnpo", "kl"), ("idkdpo", "nll"), ("undial", "kl"), ("npo", "kl")],
)
def test_named_losses_take_the_steps_of_the_formulas_by_hand(tmp_path, forget, retain):
    steps = 2
    rows = _examples(8)
    if forget == "idkdpo":
        rows = _with_refusals(rows)
    model = tiny_llama()
    trainer = SynthesizingTrainer(
        model,
        training_args(
            tmp_path, learning_rate=LR, max_steps=steps, max_grad_norm=0.0, lr_scheduler_type="constant"
        ),
        train_dataset=rows,
        forget_loss=forget,
        retain_loss=retain,
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )
    trainer.forget_loss = Recording(trainer.forget_loss)
    trainer.retain_loss = Recording(trainer.retain_loss)
    trainer.train()

    by_hand, ref = tiny_llama(), tiny_llama()
    ref.requires_grad_(False)
    opt = SynthesizingOptimizer(torch.optim.SGD(by_hand.parameters(), lr=LR), "sago")
    for f_batch, r_batch in zip(trainer.forget_loss.batches, trainer.retain_loss.batches, strict=True):
        opt.zero_grad()
        opt.backward_forget(_by_hand(forget, by_hand, ref, f_batch))
        opt.backward_retain(_by_hand(retain, by_hand, ref, r_batch))
        opt.step()
    assert len(trainer.forget_loss.batches) == steps
    moved = False
    for name, p in params_of(model).items():
        torch.testing.assert_close(p, by_hand.get_parameter(name).detach(), rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(p, ref.get_parameter(name))
    assert moved


def test_npo_is_prepared_from_the_model_before_the_first_step(tmp_path):
    model = tiny_llama()
    trainer = SynthesizingTrainer(
        model,
        training_args(tmp_path, learning_rate=LR, max_steps=2),
        train_dataset=_examples(4),
        forget_loss="npo",
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )
    trainer.train()
    first = next(e for e in trainer.state.log_history if "forget_loss" in e)
    # At the first step the model is its own reference: NPO = (2 / beta) log 2.
    assert first["forget_loss"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-5)
    # The table holds the original model's values, not the trained model's.
    original = tiny_llama()
    batch = trainer.data_collator(_examples(4)[:2])["forget"]
    with torch.no_grad():
        expected = sequence_logprob(_logits(original, batch), batch["labels"])[0]
    torch.testing.assert_close(trainer.forget_loss._ref_logprob(batch, torch.device("cpu")), expected)


def test_kl_on_a_peft_model_uses_the_adapters_disabled_model_and_no_copy():
    peft = pytest.importorskip("peft")
    from gradsynth.unlearning.reference import AdaptersDisabled

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    class Trainer:
        pass

    trainer = Trainer()
    trainer.model = model
    kl = KL()
    kl.prepare(trainer)
    assert isinstance(kl.reference, AdaptersDisabled) and kl.reference.model is model
    plain = UNDIAL()
    trainer.model = tiny_llama()
    plain.prepare(trainer)
    assert plain.reference is not trainer.model
    assert not any(p.requires_grad for p in plain.reference.parameters())


def test_names_resolve_to_fresh_objects_and_unknown_names_list_the_known():
    assert isinstance(task_loss("forget", "npo"), NPO) and task_loss("forget", "npo") is not task_loss(
        "forget", "npo"
    )
    assert isinstance(task_loss("forget", "simnpo"), SimNPO)
    assert isinstance(task_loss("forget", "idkdpo"), IdkDPO)
    assert isinstance(task_loss("retain", "kl"), KL)
    with pytest.raises(ValueError, match=r"unknown retain loss 'npo'; choose one of kl, nll"):
        task_loss("retain", "npo")
    with pytest.raises(ValueError, match=r"'ga' is registered already"):
        register_task_loss("forget", "ga", lambda: None)


def test_an_unprepared_loss_says_how_to_prepare_it():
    batch = _examples(1)[0]["forget"]
    batch = {k: torch.tensor([v]) for k, v in batch.items()}
    with pytest.raises(RuntimeError, match=r"was not prepared.*reference="):
        NPO()(tiny_llama(), batch)
    with pytest.raises(RuntimeError, match=r"has no reference model"):
        KL()(tiny_llama(), batch)
    with pytest.raises(ValueError, match=r"needs a refusal answer.*with_idk_answers"):
        IdkDPO(reference=tiny_llama())(tiny_llama(), batch)
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        NPO(beta=0)


def test_with_idk_answers_keeps_the_prompt_and_labels_only_the_refusal():
    rows = _examples(3)
    out = with_idk_answers([r["forget"] for r in rows], CharTokenizer(), seed=0)
    tokenizer = CharTokenizer()
    refusals = {tuple([*tokenizer(a)["input_ids"], 1]) for a in IDK_ANSWERS}
    for row, example in zip(rows, out, strict=True):
        assert example["input_ids"] == row["forget"]["input_ids"]  # the original is kept
        ids, labels = example["idk_input_ids"], example["idk_labels"]
        assert ids[:PROMPT] == row["forget"]["input_ids"][:PROMPT]
        assert labels[:PROMPT] == [-100] * PROMPT and tuple(labels[PROMPT:]) in refusals
        assert tuple(ids[PROMPT:]) == tuple(labels[PROMPT:]) and len(example["idk_attention_mask"]) == len(
            ids
        )
    with pytest.raises(ValueError, match=r"no labelled answer token"):
        with_idk_answers([{"input_ids": [3, 4], "labels": [-100, -100]}], CharTokenizer())


def test_the_collator_pads_the_refusal_sequence_to_its_own_longest():
    from gradsynth.integrations.task_batches import pad_and_collate

    a = {
        "input_ids": [5, 6],
        "labels": [-100, 6],
        "idk_input_ids": [5, 7, 8, 1],
        "idk_labels": [-100, 7, 8, 1],
    }
    b = {"input_ids": [5, 6, 9], "labels": [-100, 6, 9], "idk_input_ids": [5, 1], "idk_labels": [-100, 1]}
    batch = pad_and_collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [5, 6, 9]]
    assert batch["idk_input_ids"].tolist() == [[5, 7, 8, 1], [5, 1, 0, 0]]
    assert batch["idk_labels"].tolist() == [[-100, 7, 8, 1], [-100, 1, -100, -100]]
    assert batch["idk_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
