"""The evaluation splits of the embedded world (TOFU / RWKU kind), chosen by a seed after pretraining.

The model learns every pretraining fact; unlearning then trains only on ``forget`` and ``retain``:

- **forget**: ``n_forget_relations`` relations of each target person (want recall to fall);
- **retain**: the targets' other relations but one, and every relation of the remaining people
  (the retain set the run trains on; keep);
- **sibling**: one more relation of each target person, held out of the retain set: knowledge
  about the very people being forgotten that should survive (keep);
- **neighbour**: every fact of the non-target people who share the most values with the targets,
  held out of the retain set (RWKU's neighbour knowledge; keep);
- **general**: the held-out reading passages, never seen in pretraining: a generalising skill on
  the forget facts' own templates and vocabulary (the role MMLU plays for WMDP; keep);
- **additions**: the memorised two-digit additions, a skill of another surface (keep).

Different split seeds choose different targets and relations for the same pretrained model,
which is what ``gradsynth compare --seeds`` varies. `Splits.by_name` lists every split in a
fixed order; code that evaluates splits iterates over it, so a new split needs no change there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradsynth.world.facts import Fact, World
from gradsynth.world.sizes import WorldSize

SPLIT_NAMES = ("forget", "retain", "sibling", "neighbour", "general", "additions")


@dataclass(frozen=True)
class Splits:
    """Facts per split, and the names of the target and neighbour people."""

    forget: list[Fact]
    retain: list[Fact]
    sibling: list[Fact]
    neighbour: list[Fact]
    general: list[Fact]
    additions: list[Fact]
    targets: list[str]
    neighbours: list[str]

    def by_name(self) -> dict[str, list[Fact]]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}


def split_world(world: World, size: WorldSize, seed: int = 0) -> Splits:
    """Pick targets at random, per target the relations to forget and the sibling, and the targets'
    closest neighbours (most shared values); everything else about people is retain."""
    rng = random.Random(f"split-{seed}")
    names = list(world.names)
    targets = rng.sample(names, size.n_forget_people)
    forget: list[Fact] = []
    sibling: list[Fact] = []
    target_retain: list[Fact] = []
    for name in targets:
        facts = world.facts_of({name})
        order = rng.sample(range(len(facts)), len(facts))
        k = size.n_forget_relations
        forget += [facts[i] for i in sorted(order[:k])]
        sibling.append(facts[order[k]])
        target_retain += [facts[i] for i in sorted(order[k + 1 :])]
    forgotten_values = {(f.relation, f.answer) for f in forget}

    def shared(name: str) -> int:
        return sum((f.relation, f.answer) in forgotten_values for f in world.facts_of({name}))

    others = [n for n in names if n not in targets]
    # Sorted by shared values, ties broken by the seeded order, not by hash or insertion luck.
    tie = {name: i for i, name in enumerate(rng.sample(others, len(others)))}
    neighbours = sorted(others, key=lambda n: (-shared(n), tie[n]))[: size.n_neighbour_people]
    retain_people = set(others) - set(neighbours)
    return Splits(
        forget=forget,
        retain=target_retain + world.facts_of(retain_people),
        sibling=sibling,
        neighbour=world.facts_of(set(neighbours)),
        general=list(world.reading_heldout),
        additions=list(world.sums),
        targets=targets,
        neighbours=neighbours,
    )
