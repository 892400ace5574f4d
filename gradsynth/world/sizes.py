"""Named sizes of the embedded world and of the model that memorises it.

``default`` is what ``gradsynth unlearn`` uses: a 3.5M-parameter Llama (hidden 256, 4 layers)
that learns a few hundred facts in a couple of CPU-minutes. ``ci`` is the test size: a
0.6M-parameter Llama (hidden 128, 2 layers) that learns about a hundred facts in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorldSize:
    """How many facts the world has, how big the model is and how it is pretrained."""

    name: str
    n_people: int
    n_relations: int
    n_sums: int  # the "general" skill: two-digit additions
    n_forget_people: int
    n_neighbour_people: int
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    pretrain_lr: float
    pretrain_max_steps: int
    warmup_steps: int
    batch_size: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SIZES: dict[str, WorldSize] = {
    "default": WorldSize(
        name="default",
        n_people=48,
        n_relations=5,
        n_sums=48,
        n_forget_people=6,
        n_neighbour_people=8,
        vocab_size=512,
        hidden_size=256,
        n_layers=4,
        n_heads=4,
        intermediate_size=768,
        pretrain_lr=3e-3,
        pretrain_max_steps=600,
        warmup_steps=50,
        batch_size=64,
    ),
    "ci": WorldSize(
        name="ci",
        n_people=20,
        n_relations=4,
        n_sums=20,
        n_forget_people=3,
        n_neighbour_people=4,
        vocab_size=384,
        hidden_size=128,
        n_layers=2,
        n_heads=4,
        intermediate_size=384,
        pretrain_lr=3e-3,
        pretrain_max_steps=400,
        warmup_steps=30,
        batch_size=50,
    ),
}
