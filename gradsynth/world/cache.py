"""Training the world model once and keeping it on disk.

The cache lives in ``$GRADSYNTH_CACHE`` (else ``~/.cache/gradsynth``), one folder per world:
``world-<size>-<key>/`` with the model (``save_pretrained``, safetensors), the tokenizer,
``pretrain.json`` and ``manifest.json``. ``key`` is a SHA-256 of the size settings, the world
seed, the facts themselves and a format version, so a changed world or model config never loads
stale weights.

An entry is trusted only when it matches its manifest (`gradsynth.world.cache_files`): every
file listed, with its size and SHA-256 written at save time. A damaged entry (a file missing,
truncated or changed) is rebuilt, with one line saying so.

On a shared machine nothing another user could have written is loaded (`gradsynth.owned_files`):
a cache folder owned by someone else or writable by group or others is neither read nor written
(one line; the shipped model is used, else the model is trained in memory), and an entry whose
folder or files are not this user's own, or are writable by others, is replaced like a damaged
one. Writes are atomic and never follow a link planted by someone else: the entry is written in a
fresh ``0700`` folder made by ``mkdtemp`` (``world-*.tmp-<pid>-<random>``) and renamed when
complete; a temporary folder of a process that died is removed by the next run. Training holds
an exclusive ``flock`` on ``.world-*.lock`` in the cache, so that of two runs that find the cache
cold, one trains and publishes and the other waits and then loads that entry. A cache that cannot
be written (a read-only folder, ``GRADSYNTH_CACHE`` naming a file, a full disk) costs one warning:
the freshly trained model is used from memory.

Before training, the package's own trained entry for exactly this world is used when there is one
(`gradsynth.world.shipped`): read in place, verified against its manifest like a cache entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gradsynth.owned_files import folder_problem, locked
from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.world.cache_files import (
    CacheDamaged,
    CacheUntrusted,
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


def _load_entry(
    folder: Path, own: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """The cached model, tokenizer and pretraining info; `CacheDamaged` if anything is off.

    ``own``: the entry and its files must be this user's and not writable by others (a cache
    entry; the shipped one belongs to whoever installed the package).
    """
    if own:
        problem = folder_problem(folder, follow=False)
        if problem:
            raise CacheUntrusted(f"its folder {problem}")
    verify_manifest(folder, REQUIRED_FILES, own=own)
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
    try:
        # Renamed onto a fresh empty folder of our own: no name there was predictable.
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp-{os.getpid()}-"))
    except OSError:
        return  # a read-only cache: the save will say so
    with contextlib.suppress(OSError):  # another process moved it first
        folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _save_entry(folder: Path, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
    """Write the entry in a fresh private folder, with its manifest, and rename it into place."""
    folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp-{os.getpid()}-"))
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


def _cached(
    folder: Path, log: Callable[[str], None]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]] | None:
    """The trusted, intact cache entry in ``folder``; None (a damaged one discarded, with one line)."""
    if not folder.exists() and not folder.is_symlink():
        return None
    try:
        model, tokenizer, info = _load_entry(folder)
        return model, tokenizer, {**info, "cached": True, "path": str(folder)}
    except CacheUntrusted as err:
        log(f"The cached world model in {folder} is not trusted ({err}); not loading it, rebuilding it")
    except CacheDamaged as err:
        log(f"The cached world model in {folder} is damaged ({err}); rebuilding it")
    _discard(folder)
    return None


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
    # A cache that is not a folder (or not there yet) holds nothing to trust; saving says the rest.
    problem = folder_problem(folder.parent) if folder.parent.is_dir() else None
    if problem:
        log(
            f"The world cache {folder.parent} {problem}, so another user could plant a model there; "
            "not using it (chmod go-w it, or set GRADSYNTH_CACHE to a folder of your own)"
        )
    else:
        remove_stale_temporaries(folder.parent)
        found = _cached(folder, log)
        if found is not None:
            return (*found[:2], world, found[2])
    packaged = shipped_entry(folder.name) if (shipped_enabled() if shipped is None else shipped) else None
    if packaged is not None:
        try:
            model, tokenizer, info = _load_entry(packaged, own=False)
            return model, tokenizer, world, {**info, "cached": True, "shipped": True, "path": str(packaged)}
        except CacheDamaged as err:  # a damaged installation: train, as without it
            log(f"The world model shipped in {packaged} is damaged ({err}); training it instead")
    if problem:
        model, tokenizer, info = _train(size_name, world, folder, log, save=False)
        return model, tokenizer, world, info
    with contextlib.suppress(OSError):  # then the lock cannot be had either; saving will say why
        folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    # One run trains a cold world; another that finds it cold meanwhile waits here, then loads it.
    waiting = f"Another run is training the '{size_name}' world model; waiting for it to finish"
    with locked(folder.with_name(f".{folder.name}.lock"), on_wait=lambda: log(waiting)):
        found = _cached(folder, log)
        if found is not None:
            return (*found[:2], world, found[2])
        model, tokenizer, info = _train(size_name, world, folder, log, save=True)
    return model, tokenizer, world, info


def _train(
    size_name: str, world: World, folder: Path, log: Callable[[str], None], save: bool
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train the world's model; with ``save``, write it to ``folder`` (a failure costs one warning)."""
    size = SIZES[size_name]
    examples = world_examples(world)
    kept = f"it is cached in {folder.parent}" if save else "it is kept in memory only"
    log(f"Training the '{size_name}' world model once ({len(examples)} facts); {kept}")
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
    if not save:
        return model, tokenizer, {**info, "cached": False, "path": str(folder)}
    try:
        _save_entry(folder, model, tokenizer, info)
    except Exception as err:  # OSError, or safetensors' own error on a full disk: the model is fine
        log(
            f"Warning: could not write the world model cache in {folder.parent} ({_reason(err)}); "
            "continuing with the model in memory (set GRADSYNTH_CACHE to a writable folder to keep it)"
        )
    return model, tokenizer, {**info, "cached": False, "path": str(folder)}
