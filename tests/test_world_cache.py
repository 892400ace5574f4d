"""The world cache: validated on load, rebuilt when damaged, atomic, shareable, never fatal to write."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import gradsynth.world.cache as cache_module
from gradsynth.world.cache import load_world_model
from gradsynth.world.cache_files import MANIFEST

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain.json"]


@pytest.fixture
def master(ci_world_master):
    """The session's trained CI world cache entry (copied per test, never modified)."""
    return Path(ci_world_master)


@pytest.fixture
def cache(master, tmp_path, monkeypatch, retrained):
    """A private copy of the trained cache; returns the entry folder."""
    root = tmp_path / "cache"
    entry = root / master.name
    shutil.copytree(master, entry)
    monkeypatch.setenv("GRADSYNTH_CACHE", str(root))
    return entry


def _entries(root: Path) -> list[str]:
    """The cache folder's contents but the training lock (``.world-*.lock``, which stays)."""
    return sorted(p.name for p in root.iterdir() if not (p.name.startswith(".") and p.name.endswith(".lock")))


def _load(lines):
    *_, info = load_world_model("ci", log=lines.append)
    return info


def test_an_intact_cache_loads_without_retraining(cache, retrained):
    lines: list[str] = []
    info = _load(lines)
    assert info["cached"] and lines == [] and retrained == []


def test_files_are_readable_by_other_users_whatever_the_umask(retrained, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "c"))
    old = os.umask(0o077)
    try:
        info = _load([])
    finally:
        os.umask(old)
    entry = Path(info["path"])
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()} == {0o644}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_damaged_file_is_rebuilt_with_one_line(cache, retrained, name, damage):
    path = cache / name
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x00garbage" * 8)
    lines: list[str] = []
    info = _load(lines)
    assert not info["cached"] and retrained == ["ci"]
    assert "damaged" in lines[0] and name in lines[0] and "rebuilding" in lines[0]
    # Repaired: the next run loads it without training again.
    again: list[str] = []
    assert _load(again)["cached"] and again == [] and retrained == ["ci"]
    assert _entries(cache.parent) == [cache.name]


def test_a_cache_without_manifest_is_rebuilt_not_trusted(cache):
    (cache / MANIFEST).unlink()
    lines: list[str] = []
    assert not _load(lines)["cached"] and "manifest.json is missing" in lines[0]
    assert (cache / MANIFEST).is_file()


def test_a_same_size_change_is_caught_by_the_checksum(cache):
    config = cache / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"hidden_size": 128', '"hidden_size": 999'))
    assert len(config.read_text()) == len(text)
    lines: list[str] = []
    assert not _load(lines)["cached"] and "config.json does not match its checksum" in lines[0]


def test_an_unwritable_cache_warns_and_keeps_the_model_in_memory(cache, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GRADSYNTH_CACHE", str(blocker))
    lines: list[str] = []
    model, tokenizer, _, info = load_world_model("ci", log=lines.append)
    assert not info["cached"] and model is not None and tokenizer is not None
    assert any(line.startswith("Warning: could not write the world model cache") for line in lines)
    assert blocker.read_text() == "not a folder"


def test_a_failed_save_leaves_no_temporary_folder(cache, monkeypatch):
    shutil.rmtree(cache)

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "write_manifest", full_disk)
    lines: list[str] = []
    assert not _load(lines)["cached"]
    assert "No space left on device" in lines[-1]
    assert _entries(cache.parent) == []


def test_an_interrupted_save_leaves_no_temporary_folder(cache, monkeypatch):
    shutil.rmtree(cache)

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _load([])
    assert _entries(cache.parent) == []


def test_a_temporary_folder_of_a_dead_process_is_removed(cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stale = cache.with_name(f"{cache.name}.tmp-{pid}")
    shutil.copytree(cache, stale)
    live = cache.with_name(f"{cache.name}.tmp-{os.getppid()}")  # a running process: left alone
    live.mkdir()
    assert _load([])["cached"]
    assert not stale.exists() and live.exists()


def test_pretrain_json_is_required(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    del manifest["files"]["pretrain.json"]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    (cache / "pretrain.json").unlink()
    lines: list[str] = []
    assert not _load(lines)["cached"] and "pretrain.json is not in manifest.json" in lines[0]
    assert (cache / "pretrain.json").is_file()
