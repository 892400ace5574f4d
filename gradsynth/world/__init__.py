"""The embedded synthetic world: fictitious facts, their splits, and a tiny Llama that memorised them.

Nothing here is downloaded. `build_world` makes the facts from a seed (identical on every machine:
only `random.Random` with an integer seed, never `hash()`), `load_world_model` trains a small
`LlamaForCausalLM` to memorise them on first use and caches it on disk.
"""

from gradsynth.world.cache import cache_dir, load_world_model
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
