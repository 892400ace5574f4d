"""The embedded synthetic world: fictitious facts, their splits, and a tiny Llama that memorised them.

Nothing here is downloaded. `build_world` makes the facts from a seed (identical on every machine:
only `random.Random` with an integer seed, never `hash()`), `gradsynth.world.cache.load_world_model`
trains a small `LlamaForCausalLM` to memorise them on first use and caches it on disk (imported
lazily here, so that the facts need neither transformers nor tokenizers).
"""

from typing import Any

from gradsynth.world.facts import Fact, World, build_world
from gradsynth.world.sizes import SIZES, WorldSize
from gradsynth.world.splits import Splits, split_world

__all__ = [
    "SIZES",
    "Fact",
    "Splits",
    "World",
    "WorldSize",
    "build_world",
    "cache_dir",
    "load_world_model",
    "split_world",
]


def __getattr__(name: str) -> Any:
    if name in ("cache_dir", "load_world_model"):
        from gradsynth.world import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'gradsynth.world' has no attribute {name!r}")
