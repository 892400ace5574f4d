"""A shared prefix run once gives what the plain forward and ``model.generate`` give.

The CI world model in float64 (so that regrouped sums cannot flip an arg-max), its questions put
behind a common preamble of more than `MIN_SHARED` tokens, as a chat template's system turn is.
Values agree to float32 rounding, not float64's: transformers computes the rotary angles in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from gradsynth.unlearning import generation, shared_prefix
from gradsynth.unlearning.audit import answer_stats
from gradsynth.unlearning.encoding import Example, collate, encode_many, first_labelled, pad_id_of, prompt_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.multiple_choice import make_choices, option_logprobs
from gradsynth.unlearning.shared_prefix import MIN_SHARED, answer_logits, logits_from, shared_length
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

PREAMBLE = "Answer each question about the people of the world in one short answer. "


@pytest.fixture(scope="module")
def world(ci_world_master):
    from tests.helpers import cache_env

    with cache_env(ci_world_master):
        from gradsynth.world import load_world_model

        model, tokenizer, world, _ = load_world_model("ci", log=lambda _: None)
    return model.double().eval(), tokenizer, list(world.people)


def _questions(facts, preamble: str = PREAMBLE, n: int = 12) -> list[Example]:
    return [Example(prompt_of(preamble + f.question), f.answer) for f in facts[:n]]


def test_shared_length_leaves_own_tokens():
    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]]
    assert shared_length(rows) == 2  # the shortest row keeps one token of its own
    assert shared_length(rows, keep=0) == 3
    assert shared_length([[1, 2], [3, 4]]) == 0
    assert shared_length([]) == 0


def test_the_preamble_is_long_enough_to_be_shared(world):
    model, tokenizer, facts = world
    rows = [tokenizer(e.prompt)["input_ids"] for e in _questions(facts)]
    assert shared_length(rows) >= MIN_SHARED
    assert shared_prefix.shared_prefix(model, rows) is not None
    plain = [tokenizer(prompt_of(f.question))["input_ids"] for f in facts[:12]]
    assert shared_prefix.shared_prefix(model, plain) is None  # the world's own prompts: plain forward


@pytest.mark.parametrize("preamble", [PREAMBLE, ""])
def test_greedy_tokens_are_what_generate_chooses(world, preamble):
    model, tokenizer, facts = world
    prompts = [e.prompt for e in _questions(facts, preamble)]
    prompts += [prompts[0] + " Velmora Velmora", prompts[1][:-3]]  # other lengths, odd endings
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    prefix = shared_prefix.shared_prefix(model, rows)
    assert (prefix is not None) == bool(preamble)
    ours = generation.greedy_tokens(model, rows, pad, eos, prefix)
    theirs = generation._generated(model, rows, pad, eos)
    cut = [row[: row.index(eos)] if eos in row else row for row in theirs]
    assert ours == cut
    lengths = {len(t) for t in ours}
    assert len(lengths) > 1  # rows ended at different steps: dropping finished rows was exercised
    assert max(lengths) <= generation.MAX_NEW_TOKENS


def test_greedy_answers_in_small_batches_match(world):
    model, tokenizer, facts = world
    prompts = [e.prompt for e in _questions(facts)]
    whole = generation.greedy_answers(model, tokenizer, prompts)
    assert generation.greedy_answers(model, tokenizer, prompts, batch_size=5) == whole
    assert any(whole)


def test_a_generation_config_that_changes_choices_goes_through_generate(world, monkeypatch):
    model, tokenizer, facts = world
    prompts = [e.prompt for e in _questions(facts, n=3)]
    called = []
    monkeypatch.setattr(generation, "_generated", lambda *a: called.append(1) or [[] for _ in a[1]])
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    assert generation.greedy_answers(model, tokenizer, prompts) == ["", "", ""]
    assert called
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.0)
    called.clear()
    generation.greedy_answers(model, tokenizer, prompts)
    assert not called


def _batch(tokenizer, examples):
    return collate(encode_many(tokenizer, examples, 256, {}), pad_id_of(tokenizer))


def test_logits_from_a_shared_prefix_are_the_plain_logits(world):
    model, tokenizer, facts = world
    batch = _batch(tokenizer, _questions(facts))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = model(input_ids=ids, attention_mask=mask).logits
    for first in (MIN_SHARED - 1, 12, 40):
        logits, offset = logits_from(model, ids, mask, first)
        assert MIN_SHARED - 1 <= offset <= first
        real = mask[:, offset:].bool()
        torch.testing.assert_close(logits[real], plain[:, offset:][real], rtol=1e-6, atol=1e-6)
    logits, offset = logits_from(model, ids, mask, 2)  # too short a prefix before position 2
    assert offset == 0 and torch.equal(logits, plain)


def test_split_scores_with_and_without_the_shared_prefix_agree(world, monkeypatch):
    model, tokenizer, facts = world
    examples = _questions(facts)
    batches = [_batch(tokenizer, examples[:7]), _batch(tokenizer, examples[7:])]
    choices = make_choices(
        [(e.prompt, e.answer, "all") for e in examples], {"all": [e.answer for e in examples]}
    )
    shared = split_metrics(model, batches), option_logprobs(model, tokenizer, choices, batch_size=8)
    monkeypatch.setattr(shared_prefix, "MIN_SHARED", 10**9)
    plain = split_metrics(model, batches), option_logprobs(model, tokenizer, choices, batch_size=8)
    assert shared[0]["recall"] == plain[0]["recall"]
    assert shared[0]["nll"] == pytest.approx(plain[0]["nll"], rel=1e-6)
    assert all(s == pytest.approx(p, rel=1e-6, abs=1e-6) for s, p in zip(shared[1], plain[1], strict=True))


def test_audit_token_stats_with_and_without_the_shared_prefix_agree(world, monkeypatch):
    model, tokenizer, facts = world
    examples = _answered(facts, n=12)
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or original(*a, **k)
    try:
        shared = answer_stats(model, tokenizer, examples, max_length=256)
    finally:
        del model.forward
    assert calls and all(shape[0] == 1 for shape in calls)  # packed rows, not the padded batch
    monkeypatch.setattr(shared_prefix, "MIN_SHARED", 10**9)
    plain = answer_stats(model, tokenizer, examples, max_length=256)
    assert [len(s.logprobs) for s in shared] == [len(p.logprobs) for p in plain]
    assert all(len(p.logprobs) > 0 for p in plain)
    for s, p in zip(shared, plain, strict=True):
        assert s.logprobs == pytest.approx(p.logprobs, rel=1e-6, abs=1e-6)
        assert s.z_scores == pytest.approx(p.z_scores, rel=1e-5, abs=1e-5)


def _answered(facts, n: int = 8, start: int = 0) -> list[Example]:
    return [Example(prompt_of(PREAMBLE + f.question), f" {f.answer}") for f in facts[start : start + n]]


@pytest.mark.parametrize(
    ("forget", "retain"),
    [("ga", "nll"), ("npo", "kl"), ("simnpo", "nll")],
    ids=["ga+nll", "npo+kl", "simnpo"],
)
def test_losses_and_gradients_with_a_shared_prefix_are_the_plain_ones(world, forget, retain):
    """Training through the shared prefix: same loss, same gradient (the repeat's backward sums the
    rows into the one prefix run), to float32-rotary rounding."""
    model, tokenizer, facts = world
    reference = copy.deepcopy(model)
    with torch.no_grad():  # make the reference differ, so that NPO and KL have something to measure
        for p in reference.parameters():
            p.mul_(1.01)
    settings = LossSettings(forget, retain)
    batch = _batch(tokenizer, _answered(facts))
    ids, labels = batch["input_ids"], batch["labels"]
    assert shared_length(ids.tolist(), keep=0) >= MIN_SHARED  # the shared path is the one exercised
    assert first_labelled(labels) > shared_length(ids.tolist(), keep=0)

    def losses_and_grads(share: bool) -> tuple[list[float], list[Tensor]]:
        model.zero_grad()
        lf = forget_loss(model, batch, settings, reference, share_prefix=share)
        lr = retain_loss(model, batch, settings, reference, share_prefix=share)
        (lf + 0.5 * lr).backward()
        return [float(lf), float(lr)], [p.grad.clone() for p in model.parameters()]

    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or original(*a, **k)
    try:
        shared = losses_and_grads(True)
    finally:
        del model.forward
    plain = losses_and_grads(False)
    # Each loss ran one packed row: the prefix once, then every row's own tokens, no padding.
    real = int(batch["attention_mask"].sum())
    prefix = shared_length(ids.tolist(), keep=0)
    packed = (1, real - (ids.shape[0] - 1) * prefix)
    assert calls[0] == packed and all(shape == packed for shape in calls[:2])
    assert shared[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-7)
    for s, p in zip(shared[1], plain[1], strict=True):
        torch.testing.assert_close(s, p, rtol=1e-5, atol=1e-7)
    model.zero_grad()


def test_losses_fall_back_to_the_plain_forward_without_a_shared_prefix(world):
    model, tokenizer, facts = world
    batch = _batch(tokenizer, [Example(prompt_of(f.question), f" {f.answer}") for f in facts[:6]])
    settings = LossSettings("ga")
    with torch.no_grad():
        assert float(forget_loss(model, batch, settings, share_prefix=True)) == float(
            forget_loss(model, batch, settings)
        )


def test_answer_logits_start_at_the_first_position_needed(world):
    model, tokenizer, facts = world
    batch = _batch(tokenizer, _answered(facts))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    first = first_labelled(batch["labels"]) - 1
    with torch.no_grad():
        logits, offset = answer_logits(model, ids, mask, first)
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert offset == first and logits.shape[1] == ids.shape[1] - first  # no logits for the question
    real = mask[:, offset:].bool()
    torch.testing.assert_close(logits[real], plain[:, offset:][real], rtol=1e-6, atol=1e-6)


def test_rows_packed_a_few_at_a_time_give_the_same_logits(world, monkeypatch):
    model, tokenizer, facts = world
    batch = _batch(tokenizer, _answered(facts, n=7))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    first = first_labelled(batch["labels"]) - 1
    whole, offset = logits_from(model, ids, mask, first)
    calls = []
    original = model.forward
    monkeypatch.setattr(shared_prefix, "PACK_OWN_TOKENS", 1)  # one row per packed sequence
    model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or original(*a, **k)
    try:
        split, split_offset = logits_from(model, ids, mask, first)
    finally:
        del model.forward
    assert len(calls) == ids.shape[0] and split_offset == offset
    real = mask[:, offset:].bool()
    torch.testing.assert_close(split[real], whole[real], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    ["flash_attention_2", "short sliding window", "a hole in the mask"],
    ids=lambda c: c.replace(" ", "-"),
)
def test_what_cannot_be_packed_runs_the_plain_forward(world, monkeypatch, change):
    model, tokenizer, facts = world
    batch = _batch(tokenizer, _answered(facts))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if change == "flash_attention_2":
        monkeypatch.setattr(model.config, "_attn_implementation", change, raising=False)
    elif change == "short sliding window":
        monkeypatch.setattr(model.config, "sliding_window", 8, raising=False)
    else:  # not right-padded: a masked token inside the shared prefix
        mask = mask.clone()
        mask[0, 2] = 0
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        if change == "flash_attention_2":  # the plain forward would fail on CPU: only check the choice
            assert not shared_prefix.packs(model, int(mask.sum(1).max()))
            return
        _, offset = logits_from(model, ids, mask, first_labelled(batch["labels"]) - 1)
    finally:
        del model.forward
    assert offset == 0 and len(calls) == 1 and calls[0]["input_ids"] is ids
