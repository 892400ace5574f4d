"""A shared prefix run once gives what the plain forward and ``model.generate`` give.

The CI world model in float64 (so that regrouped sums cannot flip an arg-max), its questions put
behind a common preamble of more than `MIN_SHARED` tokens, as a chat template's system turn is.
Values agree to float32 rounding, not float64's: transformers computes the rotary angles in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import pytest
import torch

from gradsynth.unlearning import generation, shared_prefix
from gradsynth.unlearning.encoding import Example, collate, encode_many, pad_id_of, prompt_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.multiple_choice import make_choices, option_logprobs
from gradsynth.unlearning.shared_prefix import MIN_SHARED, logits_from, shared_length

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
