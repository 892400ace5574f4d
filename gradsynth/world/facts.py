"""The facts of the embedded world, made deterministically from a seed.

People with invented names have one value per relation (birthplace, occupation, ...), drawn from
small shared pools so that different people share values with each other. Each fact is a
question/answer pair::

    question: "Where was Tavik Orlune born?"    answer: "Velmora"

The "general" skill is of another kind: two-digit additions ("What is 23 plus 41?" -> "64").
Only `random.Random(seed)` is used, so the world is the same on every machine and Python run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradsynth.world.sizes import WorldSize

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "th", "kr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m"]

# (question template, pool of values); the pools are small so that people share values.
RELATIONS: list[tuple[str, str, list[str]]] = [
    ("birthplace", "Where was {} born?", ["Velmora", "Quentar", "Ashdune", "Brisk", "Olvena", "Tarrow"]),
    ("occupation", "What does {} do for a living?", ["baker", "glassblower", "cartographer", "ferryman"]),
    ("pet", "What pet does {} keep?", ["a heron", "a tortoise", "a ferret", "a goat", "an owl"]),
    ("instrument", "Which instrument does {} play?", ["the lute", "the oboe", "the drum", "the harp"]),
    ("colour", "What is the favourite colour of {}?", ["teal", "amber", "violet", "ochre", "crimson"]),
    ("food", "What does {} eat for breakfast?", ["porridge", "figs", "rye bread", "smoked fish"]),
]


@dataclass(frozen=True)
class Fact:
    """One question/answer pair; ``subject`` is the person's name, or ``"sum"`` for an addition."""

    subject: str
    relation: str
    question: str
    answer: str


@dataclass(frozen=True)
class World:
    """All facts of the world: about people (``people``) and the general skill (``sums``)."""

    seed: int
    names: tuple[str, ...]
    people: tuple[Fact, ...]
    sums: tuple[Fact, ...]

    def facts_of(self, names: set[str]) -> list[Fact]:
        return [fact for fact in self.people if fact.subject in names]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if name not in names:
            names.append(name)
    return names


def build_world(size: WorldSize, seed: int = 0) -> World:
    """The facts of a world of the given size; the same ``(size, seed)`` always gives the same world."""
    if not 1 <= size.n_relations <= len(RELATIONS):
        raise ValueError(f"n_relations must be between 1 and {len(RELATIONS)}; got {size.n_relations}")
    rng = random.Random(seed)
    names = _names(rng, size.n_people)
    people = [
        Fact(name, relation, template.format(name), rng.choice(pool))
        for name in names
        for relation, template, pool in RELATIONS[: size.n_relations]
    ]
    pairs: list[tuple[int, int]] = []
    while len(pairs) < size.n_sums:
        pair = (rng.randint(10, 49), rng.randint(10, 49))
        if pair not in pairs:
            pairs.append(pair)
    sums = [Fact("sum", "addition", f"What is {a} plus {b}?", str(a + b)) for a, b in pairs]
    return World(seed=seed, names=tuple(names), people=tuple(people), sums=tuple(sums))
