"""The four evaluation splits of the embedded world, chosen by a seed after pretraining.

The model memorises every fact; unlearning then sees only ``forget`` and ``retain``:

- **forget**: every fact about the target people (want recall to fall);
- **retain**: facts about the remaining people (the retain set the run trains on; keep);
- **neighbour**: facts about the non-target people who share the most values with the targets,
  held out of the retain set (RWKU's neighbour knowledge; keep);
- **general**: the additions, a different skill never in the retain set (the role MMLU plays
  for WMDP; keep).

Different split seeds choose different targets for the same pretrained model, which is what
``gradsynth compare --seeds`` varies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gradsynth.world.facts import Fact, World
from gradsynth.world.sizes import WorldSize

SPLIT_NAMES = ("forget", "retain", "neighbour", "general")


@dataclass(frozen=True)
class Splits:
    """Facts per split, and the names of the target and neighbour people."""

    forget: list[Fact]
    retain: list[Fact]
    neighbour: list[Fact]
    general: list[Fact]
    targets: list[str]
    neighbours: list[str]

    def by_name(self) -> dict[str, list[Fact]]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}


def split_world(world: World, size: WorldSize, seed: int = 0) -> Splits:
    """Pick targets at random and their closest neighbours (most shared values); the rest is retain."""
    rng = random.Random(f"split-{seed}")
    names = list(world.names)
    targets = rng.sample(names, size.n_forget_people)
    target_values = {(f.relation, f.answer) for f in world.facts_of(set(targets))}

    def shared(name: str) -> int:
        return sum((f.relation, f.answer) in target_values for f in world.facts_of({name}))

    others = [n for n in names if n not in targets]
    # Sorted by shared values, ties broken by the seeded order, not by hash or insertion luck.
    order = {name: i for i, name in enumerate(rng.sample(others, len(others)))}
    neighbours = sorted(others, key=lambda n: (-shared(n), order[n]))[: size.n_neighbour_people]
    retain_people = set(others) - set(neighbours)
    return Splits(
        forget=world.facts_of(set(targets)),
        retain=world.facts_of(retain_people),
        neighbour=world.facts_of(set(neighbours)),
        general=list(world.sums),
        targets=targets,
        neighbours=neighbours,
    )
