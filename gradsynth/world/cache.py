"""Training the world model once and keeping it on disk.

The cache lives in ``$GRADSYNTH_CACHE`` (else ``~/.cache/gradsynth``), one folder per world:
``world-<size>-<key>/`` with the model (``save_pretrained``, safetensors), the tokenizer and
``pretrain.json``. ``key`` is a SHA-256 of the size settings, the world seed, the facts
themselves and a format version, so a changed world or model config never loads stale
weights. A folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.world.facts import World, build_world
from gradsynth.world.model import build_model
from gradsynth.world.pretrain import pretrain
from gradsynth.world.sizes import SIZES
from gradsynth.world.tokenizer import train_tokenizer

FORMAT_VERSION = 1
WORLD_SEED = 0


def cache_dir() -> Path:
    """``$GRADSYNTH_CACHE`` if set, else ``~/.cache/gradsynth``."""
    return Path(os.environ.get("GRADSYNTH_CACHE") or Path.home() / ".cache" / "gradsynth")


def world_examples(world: World) -> list[Example]:
    """Every fact of the world as a question/answer example."""
    return [Example(prompt_of(f.question), f.answer) for f in (*world.people, *world.sums)]


def cache_key(size_name: str, world: World) -> str:
    payload = {
        "version": FORMAT_VERSION,
        "size": SIZES[size_name].as_dict(),
        "seed": world.seed,
        "facts": [(f.question, f.answer) for f in (*world.people, *world.sums)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_world_model(
    size_name: str = "default", log: Callable[[str], None] = print
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, World, dict[str, Any]]:
    """The world of ``size_name`` and its memorising model: from the cache, else trained and cached."""
    if size_name not in SIZES:
        raise ValueError(f"unknown world size {size_name!r}; choose one of {', '.join(SIZES)}")
    size = SIZES[size_name]
    world = build_world(size, WORLD_SEED)
    folder = cache_dir() / f"world-{size_name}-{cache_key(size_name, world)}"
    if (folder / "pretrain.json").is_file():
        info = json.loads((folder / "pretrain.json").read_text())
        model = LlamaForCausalLM.from_pretrained(folder)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model.eval()
        return model, tokenizer, world, {**info, "cached": True, "path": str(folder)}

    examples = world_examples(world)
    log(
        f"Training the '{size_name}' world model once ({len(examples)} facts); "
        f"it is cached in {folder.parent}"
    )
    start = time.perf_counter()
    texts = [f"{e.prompt} {e.answer}" for e in examples]
    tokenizer = train_tokenizer(texts, size.vocab_size)
    model = build_model(size, tokenizer, WORLD_SEED)
    result = pretrain(
        model, tokenizer, examples, size, WORLD_SEED, progress=lambda s, r: log(f"  step {s}: recall {r:.1%}")
    )
    info = {
        **result,
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": size.as_dict(),
    }
    log(f"  memorised {info['recall']:.1%} of the facts in {info['steps']} steps, {info['seconds']}s")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
    try:
        tmp.rename(folder)
    except OSError:  # another process cached the same world first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer, world, {**info, "cached": False, "path": str(folder)}
