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

from gradsynth.unlearning.encoding import IGNORE_INDEX, Example, encode
from gradsynth.world import SIZES, build_world, split_world
from gradsynth.world.cache import cache_key, world_examples
from gradsynth.world.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SIZE = SIZES["ci"]


def test_world_is_identical_across_processes_with_different_hash_seeds():
    code = (
        "from gradsynth.world import SIZES, build_world, split_world\n"
        "w = build_world(SIZES['ci'], 0); s = split_world(w, SIZES['ci'], 3)\n"
        "print(repr([(f.question, f.answer) for f in w.people + w.sums]), s.targets, s.neighbours)"
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
    facts = [(f.question, f.answer) for f in world.people + world.sums]
    assert output.strip() == f"{facts!r} {splits.targets} {splits.neighbours}"


def test_world_has_the_configured_size_and_distinct_people():
    world = build_world(SIZE, 0)
    assert len(set(world.names)) == SIZE.n_people
    assert len(world.people) == SIZE.n_people * SIZE.n_relations
    assert len({f.question for f in world.sums}) == SIZE.n_sums
    assert all(
        int(f.answer) == sum(int(t) for t in f.question.rstrip("?").split() if t.isdigit())
        for f in world.sums
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_partition_the_people_and_neighbours_share_values_with_targets(seed):
    world = build_world(SIZE, 0)
    splits = split_world(world, SIZE, seed)
    groups = [{f.subject for f in facts} for facts in (splits.forget, splits.retain, splits.neighbour)]
    assert sum(len(g) for g in groups) == SIZE.n_people
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert groups[0] == set(splits.targets) and len(splits.targets) == SIZE.n_forget_people
    target_values = {(f.relation, f.answer) for f in splits.forget}

    def shared(facts):
        return sum((f.relation, f.answer) in target_values for f in facts) / len(facts)

    assert shared(splits.neighbour) >= shared(splits.retain)
    assert splits.general == list(world.sums)


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
    text_ids, text_labels = encode(tokenizer, Example("plain text here"), 48)
    assert text_ids == text_labels
    short_ids, short_labels = encode(tokenizer, replace(example, prompt=example.prompt * 10), 12)
    assert len(short_ids) == 12 and short_labels[-len(answer) :] == answer
