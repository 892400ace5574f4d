"""Training the world model once and keeping it on disk.

The cache lives in ``$GRADSYNTH_CACHE`` (else ``~/.cache/gradsynth``), one folder per world:
``world-<size>-<key>/`` with the model (``save_pretrained``, safetensors), the tokenizer,
``pretrain.json`` and ``manifest.json``. ``key`` is a SHA-256 of the size settings, the world
seed, the facts themselves and a format version, so a changed world or model config never loads
stale weights.

An entry is trusted only when it matches its manifest (`gradsynth.world.cache_files`): every
file listed, with its size and SHA-256 written at save time. A damaged entry (a file missing,
truncated or changed) is rebuilt, with one line saying so. Writes are atomic: the folder is
written under a temporary name (``world-*.tmp-<pid>``) and renamed when complete; a temporary
folder of a process that died is removed by the next run. A cache that cannot be written (a
read-only folder, ``GRADSYNTH_CACHE`` naming a file, a full disk) costs one warning: the freshly
trained model is used from memory.

Before training, the package's own trained entry for exactly this world is used when there is one
(`gradsynth.world.shipped`): read in place, verified against its manifest like a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.world.cache_files import (
    CacheDamaged,
    make_shareable,
    remove_stale_temporaries,
    verify_manifest,
    write_manifest,
)
from gradsynth.world.facts import World, build_world
from gradsynth.world.model import build_model
from gradsynth.world.pretrain import pretrain
from gradsynth.world.shipped import shipped_enabled, shipped_entry
from gradsynth.world.sizes import SIZES
from gradsynth.world.tokenizer import train_tokenizer

FORMAT_VERSION = 2  # 2: the TOFU/RWKU-style world, full-text loss, fixed pretraining steps
WORLD_SEED = 0
# What a complete entry holds besides the manifest; a manifest that omits one is refused.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "pretrain.json",
)


def cache_dir() -> Path:
    """``$GRADSYNTH_CACHE`` if set, else ``~/.cache/gradsynth``."""
    return Path(os.environ.get("GRADSYNTH_CACHE") or Path.home() / ".cache" / "gradsynth")


def world_examples(world: World) -> list[Example]:
    """Every pretraining fact of the world as a question/answer example (held-out reading excluded)."""
    return [Example(prompt_of(f.question), f.answer) for f in world.pretraining]


def cache_key(size_name: str, world: World) -> str:
    payload = {
        "version": FORMAT_VERSION,
        "size": SIZES[size_name].as_dict(),
        "seed": world.seed,
        "facts": [(f.question, f.answer) for f in (*world.pretraining, *world.reading_heldout)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _load_entry(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """The cached model, tokenizer and pretraining info; `CacheDamaged` if anything is off."""
    verify_manifest(folder, REQUIRED_FILES)
    try:
        info = json.loads((folder / "pretrain.json").read_text())
        # The config is loaded explicitly: without it from_pretrained would build the default
        # LlamaConfig, a 6.7B-parameter model.
        config = LlamaConfig.from_pretrained(folder, trust_remote_code=False)
        model = LlamaForCausalLM.from_pretrained(folder, config=config, trust_remote_code=False)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # the files match their checksums but this library cannot read them
        raise CacheDamaged(f"cannot be loaded ({_reason(err)})") from err
    model.eval()
    return model, tokenizer, info


def _discard(folder: Path) -> None:
    """Move a damaged entry out of the way (atomically), then delete it; best effort."""
    aside = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:
        return  # another process moved it first, or the cache is read-only: the save will say so
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _save_entry(folder: Path, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
    """Write the entry under a temporary name, with its manifest, and rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
        write_manifest(tmp)
        make_shareable(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process cached the same world first; theirs is as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_world_model(
    size_name: str = "default", log: Callable[[str], None] = print, *, shipped: bool | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, World, dict[str, Any]]:
    """The world of ``size_name`` and its memorising model: from the cache, else the entry shipped in
    the package for exactly this world (`gradsynth.world.shipped`; ``shipped=None`` follows
    ``GRADSYNTH_SHIPPED_WORLD``), else trained and cached."""
    if size_name not in SIZES:
        raise ValueError(f"unknown world size {size_name!r}; choose one of {', '.join(SIZES)}")
    size = SIZES[size_name]
    world = build_world(size, WORLD_SEED)
    folder = cache_dir() / f"world-{size_name}-{cache_key(size_name, world)}"
    remove_stale_temporaries(folder.parent)
    if folder.exists():
        try:
            model, tokenizer, info = _load_entry(folder)
            return model, tokenizer, world, {**info, "cached": True, "path": str(folder)}
        except CacheDamaged as err:
            log(f"The cached world model in {folder} is damaged ({err}); rebuilding it")
            _discard(folder)
    packaged = shipped_entry(folder.name) if (shipped_enabled() if shipped is None else shipped) else None
    if packaged is not None:
        try:
            model, tokenizer, info = _load_entry(packaged)
            return model, tokenizer, world, {**info, "cached": True, "shipped": True, "path": str(packaged)}
        except CacheDamaged as err:  # a damaged installation: train, as without it
            log(f"The world model shipped in {packaged} is damaged ({err}); training it instead")

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
        # Where it was trained: AVX2 and AVX-512 kernels round differently (gradsynth.world.shipped).
        "trained_on": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    log(f"  memorised {info['recall']:.1%} of the facts in {info['steps']} steps, {info['seconds']}s")
    try:
        _save_entry(folder, model, tokenizer, info)
    except Exception as err:  # OSError, or safetensors' own error on a full disk: the model is fine
        log(
            f"Warning: could not write the world model cache in {folder.parent} ({_reason(err)}); "
            "continuing with the model in memory (set GRADSYNTH_CACHE to a writable folder to keep it)"
        )
    return model, tokenizer, world, {**info, "cached": False, "path": str(folder)}
