"""The facts of the embedded world, made deterministically from a seed.

People with invented names have one value per relation (birthplace, occupation, ...), drawn from
small shared pools so that different people share values with each other. Each fact is a
question/answer pair::

    question: "Where was Tavik Orlune born?"    answer: "Velmora"

Beside the people, two general skills:

- **reading** (generalising): a short passage about a person the model has never seen states two
  of their relations, then the question asks one of them::

      question: "Kora Vesh keeps a heron. Kora Vesh was born in Ashdune. Where was Kora Vesh born?"
      answer:   "Ashdune"

  It shares the people facts' surface on purpose (the same question templates, names made from
  the same syllables, answers from the same pools), so that an update that destroys the forget
  facts' surface can hurt it, as WMDP unlearning hurts MMLU. Pretraining sees ``reading``; the
  ``reading_heldout`` items (fresh names, fresh passages) are only ever evaluated, so recall on
  them measures a skill, not memory.
- **additions** (memorised): two-digit additions ("What is 23 plus 41?" -> "64").

Only `random.Random(seed)` is used, so the world is the same on every machine and Python run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradsynth.world.sizes import WorldSize

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "th", "kr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m"]

# (relation, question template, statement template, pool of values); the pools are small so
# that people share values. The statement says the fact in a passage (the reading skill).
RELATIONS: list[tuple[str, str, str, list[str]]] = [
    (
        "birthplace",
        "Where was {} born?",
        "{} was born in {}.",
        ["Velmora", "Quentar", "Ashdune", "Brisk", "Olvena", "Tarrow"],
    ),
    (
        "occupation",
        "What does {} do for a living?",
        "{} works as a {}.",
        ["baker", "glassblower", "cartographer", "ferryman"],
    ),
    (
        "pet",
        "What pet does {} keep?",
        "{} keeps {}.",
        ["a heron", "a tortoise", "a ferret", "a goat", "an owl"],
    ),
    (
        "instrument",
        "Which instrument does {} play?",
        "{} plays {}.",
        ["the lute", "the oboe", "the drum", "the harp"],
    ),
    (
        "colour",
        "What is the favourite colour of {}?",
        "The favourite colour of {} is {}.",
        ["teal", "amber", "violet", "ochre", "crimson"],
    ),
    (
        "food",
        "What does {} eat for breakfast?",
        "{} eats {} for breakfast.",
        ["porridge", "figs", "rye bread", "smoked fish"],
    ),
]
READING_STATEMENTS = 1  # relations stated in each reading passage (the one asked among them)


@dataclass(frozen=True)
class Fact:
    """One question/answer pair; ``subject`` is the person's name, or ``"sum"`` for an addition."""

    subject: str
    relation: str
    question: str
    answer: str


@dataclass(frozen=True)
class World:
    """All facts of the world: people, the reading skill (trained and held out) and additions."""

    seed: int
    names: tuple[str, ...]
    people: tuple[Fact, ...]
    sums: tuple[Fact, ...]
    reading: tuple[Fact, ...] = ()
    reading_heldout: tuple[Fact, ...] = ()

    def facts_of(self, names: set[str]) -> list[Fact]:
        return [fact for fact in self.people if fact.subject in names]

    @property
    def pretraining(self) -> tuple[Fact, ...]:
        """What the world model is trained on: everything but the held-out reading items."""
        return (*self.people, *self.reading, *self.sums)


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _names(rng: random.Random, count: int, taken: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    names: list[str] = []
    while len(names) < count:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if name not in names and name not in taken:
            names.append(name)
    return names


def _reading(rng: random.Random, names: list[str], n_relations: int) -> list[Fact]:
    """One passage per name: ``READING_STATEMENTS`` random relations stated, one of them asked."""
    facts = []
    for name in names:
        chosen = rng.sample(RELATIONS[:n_relations], READING_STATEMENTS)
        values = [rng.choice(pool) for *_, pool in chosen]
        statements = [statement for _, _, statement, _ in chosen]
        passage = " ".join(s.format(name, v) for s, v in zip(statements, values, strict=True))
        asked = rng.randrange(READING_STATEMENTS)
        relation, template, _, _ = chosen[asked]
        facts.append(Fact(name, relation, f"{passage} {template.format(name)}", values[asked]))
    return facts


def build_world(size: WorldSize, seed: int = 0) -> World:
    """The facts of a world of the given size; the same ``(size, seed)`` always gives the same world."""
    if not READING_STATEMENTS <= size.n_relations <= len(RELATIONS):
        raise ValueError(
            f"n_relations must be between {READING_STATEMENTS} and {len(RELATIONS)}; got {size.n_relations}"
        )
    rng = random.Random(seed)
    names = _names(rng, size.n_people)
    people = [
        Fact(name, relation, template.format(name), rng.choice(pool))
        for name in names
        for relation, template, _, pool in RELATIONS[: size.n_relations]
    ]
    pairs: list[tuple[int, int]] = []
    while len(pairs) < size.n_sums:
        pair = (rng.randint(10, 49), rng.randint(10, 49))
        if pair not in pairs:
            pairs.append(pair)
    sums = [Fact("sum", "addition", f"What is {a} plus {b}?", str(a + b)) for a, b in pairs]
    # Reading passages are about people the world does not otherwise know; the held-out ones
    # also use names no pretraining passage uses.
    readers = _names(rng, size.n_reading + size.n_reading_heldout, taken=set(names))
    reading = _reading(rng, readers[: size.n_reading], size.n_relations)
    heldout = _reading(rng, readers[size.n_reading :], size.n_relations)
    return World(
        seed=seed,
        names=tuple(names),
        people=tuple(people),
        sums=tuple(sums),
        reading=tuple(reading),
        reading_heldout=tuple(heldout),
    )
