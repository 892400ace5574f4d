"""The shipped real-knowledge benchmark: facts a pretrained model may know, split by seed.

``data_files/real_facts.jsonl`` holds 248 everyday facts written for this project (capitals,
landmarks, languages, currencies, continents, authors, chemical symbols, astronomy, people,
numbers, colours, animals, science: 13 relations), each a question, its gold answer, its relation
and its domain; ``data_files/real_prose.txt`` holds 12 short paragraphs of plain prose, also
written here, whose perplexity measures fluency beside the facts.

A run uses only the facts the model *knows*: its greedy answer to the question, in the run's
prompt format, contains the gold answer (`gradsynth.unlearning.answers.contains`). `split` then
deals the known facts out by seed:

- ``forget``: `FORGET_SIZE` facts of one relation, the seed choosing the relation among those
  with at least `FORGET_SIZE` + `MIN_NEIGHBOURS` known facts (``seed mod`` their number, most
  known first) and the facts within it;
- ``neighbour``: up to `NEIGHBOURS` other known facts of that relation: never trained on, the
  knowledge closest to what is forgotten;
- ``retain``: `RETAIN_SIZE` known facts of the other relations, trained on as the retain set;
- ``general``: up to `GENERAL_SIZE` further known facts of the other relations, held out (the
  "general score kept" of the paper's headline).

Training labels are the model's own words: its greedy answer up to the end of the first sentence
that contains the gold answer (`own_label`). An instruct model answers in a sentence ("The capital
of France is Paris."); labelling the bare gold answer ("Paris") instead makes the first steps of
*both* tasks teach a terse answer format — on SmolLM2-135M-Instruct the forget answers' NLL then
fell under gradient ascent while retain recall collapsed — so what was measured was a change of
format, not forgetting. Scoring stays the gold answer's containment in a fresh greedy answer.

The audit's non-members (`non_members`) are up to `NON_MEMBERS` shipped facts the model does
*not* know, those of the forget relation first: same forms as the forget facts, never recalled, so
after a deep forgetting the forget facts should look like them to a membership attack.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from gradsynth.unlearning.answers import contains

FORGET_SIZE = 10
MIN_NEIGHBOURS = 4
NEIGHBOURS = 12
RETAIN_SIZE = 24
GENERAL_SIZE = 32
NON_MEMBERS = 20
SPLITS = ("forget", "retain", "neighbour", "general")


@dataclass(frozen=True)
class RealFact:
    """One shipped fact: ``question`` (plain), its ``answer``, and the ``relation`` and ``domain``."""

    question: str
    answer: str
    relation: str
    domain: str


@dataclass(frozen=True)
class KnownFact:
    """A fact the model recalled, with what it said (``said``: its greedy answer, decoded)."""

    fact: RealFact
    said: str

    @property
    def label(self) -> str:
        return own_label(self.fact.answer, self.said)


class TooFewKnown(ValueError):
    """The model knows too few of the shipped facts for a split."""


def _data(name: str) -> str:
    return resources.files("gradsynth.unlearning").joinpath("data_files", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def facts() -> tuple[RealFact, ...]:
    """Every shipped fact, in file order."""
    rows = [json.loads(line) for line in _data("real_facts.jsonl").splitlines() if line.strip()]
    return tuple(RealFact(r["question"], r["answer"], r["relation"], r["domain"]) for r in rows)


@lru_cache(maxsize=1)
def prose() -> tuple[str, ...]:
    """The shipped paragraphs of plain prose (one per line)."""
    return tuple(line.strip() for line in _data("real_prose.txt").splitlines() if line.strip())


def relation_values() -> dict[str, list[str]]:
    """Each relation's gold answers over the whole file: the pool of multiple-choice distractors."""
    values: dict[str, list[str]] = {}
    for fact in facts():
        values.setdefault(fact.relation, []).append(fact.answer)
    return values


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def own_label(answer: str, said: str) -> str:
    """``said`` up to the end of its first sentence that contains ``answer`` (else all of it), stripped:
    a label must start where the model's answer starts, right after the prompt."""
    sentences = [s.strip() for s in _SENTENCE_END.split(said) if s.strip()]
    kept = []
    for sentence in sentences:
        kept.append(sentence)
        if contains(answer, " ".join(kept)):
            return " ".join(kept)
    return said.strip()


def known_facts(
    said_to: Callable[[list[str]], list[str]], candidates: tuple[RealFact, ...] | None = None
) -> list[KnownFact]:
    """The facts whose answer ``said_to(questions)`` (the model's greedy answers) contains."""
    chosen = facts() if candidates is None else candidates
    answers = said_to([f.question for f in chosen])
    return [KnownFact(f, s) for f, s in zip(chosen, answers, strict=True) if contains(f.answer, s)]


def eligible_relations(known: list[KnownFact]) -> list[str]:
    """Relations that can hold a forget set with neighbours, most known facts first (ties by name)."""
    counts: dict[str, int] = {}
    for k in known:
        counts[k.fact.relation] = counts.get(k.fact.relation, 0) + 1
    ok = [r for r, n in counts.items() if n >= FORGET_SIZE + MIN_NEIGHBOURS]
    return sorted(ok, key=lambda r: (-counts[r], r))


def split(known: list[KnownFact], seed: int) -> dict[str, list[KnownFact]]:
    """``forget``, ``retain``, ``neighbour`` and ``general`` for ``seed`` (see the module docstring).

    Raises `TooFewKnown` when no relation has enough known facts or the other relations cannot
    fill the retain set."""
    relations = eligible_relations(known)
    if not relations:
        raise TooFewKnown(
            f"the model recalls {len(known)} of the {len(facts())} shipped facts, but no relation has "
            f"{FORGET_SIZE + MIN_NEIGHBOURS} known ones (a forget set of {FORGET_SIZE} with "
            f"{MIN_NEIGHBOURS} neighbours)"
        )
    relation = relations[seed % len(relations)]
    rng = random.Random(f"real-facts-{seed}")
    same = [k for k in known if k.fact.relation == relation]
    others = [k for k in known if k.fact.relation != relation]
    rng.shuffle(same)
    rng.shuffle(others)
    if len(others) < RETAIN_SIZE + 1:
        raise TooFewKnown(
            f"the model recalls {len(others)} facts outside {relation!r}; the retain set needs "
            f"{RETAIN_SIZE} and the general split at least one more"
        )
    return {
        "forget": same[:FORGET_SIZE],
        "retain": others[:RETAIN_SIZE],
        "neighbour": same[FORGET_SIZE : FORGET_SIZE + NEIGHBOURS],
        "general": others[RETAIN_SIZE : RETAIN_SIZE + GENERAL_SIZE],
    }


def non_members(known: list[KnownFact], seed: int, relation: str) -> list[RealFact]:
    """Up to `NON_MEMBERS` shipped facts not in ``known``: ``relation``'s first, then the others,
    each group shuffled by ``seed``."""
    recalled = {k.fact for k in known}
    rng = random.Random(f"real-facts-non-members-{seed}")
    same = [f for f in facts() if f not in recalled and f.relation == relation]
    others = [f for f in facts() if f not in recalled and f.relation != relation]
    rng.shuffle(same)
    rng.shuffle(others)
    return (same + others)[:NON_MEMBERS]


def describe(parts: dict[str, list[KnownFact]], known: list[KnownFact]) -> dict[str, Any]:
    """What a report records of the split: the forget relation, the sizes and the known share."""
    return {
        "benchmark": "real-facts",
        "known": len(known),
        "facts": len(facts()),
        "forget_relation": parts["forget"][0].fact.relation if parts["forget"] else None,
        "sizes": {name: len(items) for name, items in parts.items()},
    }
