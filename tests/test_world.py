"""The embedded world: deterministic facts, sound splits, labels that teach the model to stop."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gradsynth.unlearning.encoding import IGNORE_INDEX, Example, encode, with_loss_scope
from gradsynth.world import SIZES, build_world, split_world
from gradsynth.world.cache import cache_key, world_examples
from gradsynth.world.facts import RELATIONS
from gradsynth.world.splits import SPLIT_NAMES
from gradsynth.world.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SIZE = SIZES["ci"]


def test_world_is_identical_across_processes_with_different_hash_seeds():
    code = (
        "from gradsynth.world import SIZES, build_world, split_world\n"
        "w = build_world(SIZES['ci'], 0); s = split_world(w, SIZES['ci'], 3)\n"
        "print(repr([(f.question, f.answer) for f in w.pretraining + w.reading_heldout]),"
        " [f.question for f in s.forget + s.sibling], s.targets, s.neighbours)"
    )
    # This process runs with a random hash seed; the child with a fixed, different one.
    output = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    world = build_world(SIZE, 0)
    splits = split_world(world, SIZE, 3)
    facts = [(f.question, f.answer) for f in world.pretraining + world.reading_heldout]
    chosen = [f.question for f in splits.forget + splits.sibling]
    assert output.strip() == f"{facts!r} {chosen} {splits.targets} {splits.neighbours}"


def test_world_has_the_configured_size_and_distinct_people():
    world = build_world(SIZE, 0)
    assert len(set(world.names)) == SIZE.n_people
    assert len(world.people) == SIZE.n_people * SIZE.n_relations
    assert len({f.question for f in world.sums}) == SIZE.n_sums
    assert all(
        int(f.answer) == sum(int(t) for t in f.question.rstrip("?").split() if t.isdigit())
        for f in world.sums
    )
    assert len(world.reading) == SIZE.n_reading and len(world.reading_heldout) == SIZE.n_reading_heldout


def test_reading_passages_state_their_answer_and_the_held_out_ones_are_never_pretrained():
    world = build_world(SIZE, 0)
    templates = {relation: template for relation, template, _, _ in RELATIONS}
    for fact in (*world.reading, *world.reading_heldout):
        passage, question = fact.question.rsplit(". ", 1)
        # The question is a people fact's own template, and the passage states the answer.
        assert question == templates[fact.relation].format(fact.subject)
        assert fact.answer in passage and fact.subject in passage
    pretrained_names = {f.subject for f in world.pretraining}
    heldout_names = {f.subject for f in world.reading_heldout}
    assert not heldout_names & pretrained_names
    assert not {f.question for f in world.reading_heldout} & {f.question for f in world.pretraining}
    # Same surface: the held-out answers come from the pools the people's answers come from.
    pools = {relation: set(pool) for relation, _, _, pool in RELATIONS}
    assert all(f.answer in pools[f.relation] for f in world.reading_heldout)


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_are_tofu_like_and_neighbours_share_values_with_targets(name, seed):
    size = SIZES[name]
    world = build_world(size, 0)
    splits = split_world(world, size, seed)
    assert list(splits.by_name()) == list(SPLIT_NAMES)
    targets = set(splits.targets)
    assert len(targets) == size.n_forget_people
    # Per target: n_forget_relations forgotten, one sibling held out, the rest retained.
    for name_ in targets:
        forget = [f for f in splits.forget if f.subject == name_]
        sibling = [f for f in splits.sibling if f.subject == name_]
        kept = [f for f in splits.retain if f.subject == name_]
        assert len(forget) == size.n_forget_relations and len(sibling) == 1
        assert len(forget) + len(sibling) + len(kept) == size.n_relations
        assert {f.relation for f in forget + sibling + kept} == {f.relation for f in world.facts_of({name_})}
    # Every people fact is in exactly one of forget, retain, sibling, neighbour.
    people = [splits.forget, splits.retain, splits.sibling, splits.neighbour]
    questions = [f.question for facts in people for f in facts]
    assert sorted(questions) == sorted(f.question for f in world.people)
    neighbours = {f.subject for f in splits.neighbour}
    assert neighbours == set(splits.neighbours) and not neighbours & targets
    assert not neighbours & {f.subject for f in splits.retain}
    target_values = {(f.relation, f.answer) for f in splits.forget}

    def shared(facts):
        return sum((f.relation, f.answer) in target_values for f in facts) / len(facts)

    others = [f for f in splits.retain if f.subject not in targets]
    assert shared(splits.neighbour) >= shared(others)
    assert splits.general == list(world.reading_heldout)
    assert splits.additions == list(world.sums)


def test_different_split_seeds_pick_different_targets():
    world = build_world(SIZE, 0)
    assert len({tuple(sorted(split_world(world, SIZE, s).targets)) for s in range(4)}) > 1


def test_cache_key_follows_the_config_and_the_facts():
    world = build_world(SIZE, 0)
    key = cache_key("ci", world)
    assert cache_key("ci", build_world(SIZE, 0)) == key
    assert cache_key("ci", build_world(SIZE, 1)) != key
    assert cache_key("default", world) != key


def test_answers_and_eos_are_labelled_prompt_is_not():
    world = build_world(SIZE, 0)
    tokenizer = train_tokenizer([f"{e.prompt} {e.answer}" for e in world_examples(world)], SIZE.vocab_size)
    example = world_examples(world)[0]
    _, labels = encode(tokenizer, example, 48)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]).strip() == example.answer
    assert labels[: len(labels) - len(answer)] == [IGNORE_INDEX] * (len(labels) - len(answer))
    full_ids, full_labels = encode(tokenizer, with_loss_scope([example], "full")[0], 48)
    assert full_ids == full_labels == encode(tokenizer, example, 48)[0]  # same tokens, all labelled
    text_ids, text_labels = encode(tokenizer, Example("plain text here"), 48)
    assert text_ids == text_labels
    short_ids, short_labels = encode(tokenizer, replace(example, prompt=example.prompt * 10), 12)
    assert len(short_ids) == 12 and short_labels[-len(answer) :] == answer
