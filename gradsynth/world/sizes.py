"""Named sizes of the embedded world and of the model that memorises it.

``default`` is what ``gradsynth unlearn`` uses (a 0.9M-parameter Llama, hidden 160, 2 layers);
``ci`` is the test size (0.5M parameters, hidden 128, 2 layers, a smaller world).
Pretraining runs a fixed number of steps (``pretrain_steps``), never "until recall is 100%":
a data-dependent stop made the world differ between machines (one stopped at 225 steps,
another at 325), so every machine now runs the same schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorldSize:
    """How many facts the world has, how it is split, how big the model is and how it is pretrained."""

    name: str
    n_people: int
    n_relations: int
    n_sums: int  # memorised general skill: two-digit additions
    n_reading: int  # generalising skill: reading passages seen in pretraining
    n_reading_heldout: int  # ... and held out, evaluated only (the "general" split)
    n_forget_people: int
    n_forget_relations: int  # of each target person; one more is the "sibling" split
    n_neighbour_people: int
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    pretrain_lr: float
    pretrain_steps: int
    warmup_steps: int
    batch_size: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_forget_relations <= self.n_relations - 2:
            raise ValueError(
                f"n_forget_relations must leave a sibling and a retained relation per target: between 1 "
                f"and {self.n_relations - 2}; got {self.n_forget_relations}"
            )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SIZES: dict[str, WorldSize] = {
    "default": WorldSize(
        name="default",
        n_people=32,
        n_relations=6,
        n_sums=24,
        n_reading=400,
        n_reading_heldout=60,
        n_forget_people=5,
        n_forget_relations=3,
        n_neighbour_people=6,
        vocab_size=512,
        hidden_size=160,
        n_layers=2,
        n_heads=4,
        intermediate_size=480,
        pretrain_lr=3e-3,
        pretrain_steps=400,
        warmup_steps=40,
        batch_size=64,
    ),
    "ci": WorldSize(
        name="ci",
        n_people=16,
        n_relations=4,
        n_sums=12,
        n_reading=200,
        n_reading_heldout=32,
        n_forget_people=3,
        n_forget_relations=2,
        n_neighbour_people=4,
        vocab_size=384,
        hidden_size=128,
        n_layers=2,
        n_heads=4,
        intermediate_size=384,
        pretrain_lr=3e-3,
        pretrain_steps=300,
        warmup_steps=30,
        batch_size=48,
    ),
}
