"""The world models shipped in the package: current, intact, what training gives, used before training.

The suite runs with ``GRADSYNTH_SHIPPED_WORLD=0`` (tests/conftest.py) so that it trains its own CI
world; the tests here switch the shipped models back on where they need them.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import tomllib
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_world_reproducible import CI_FINGERPRINT

import gradsynth.world.cache as cache_module
import gradsynth.world.shipped as shipped_module
from gradsynth.world import SIZES, build_world, split_world
from gradsynth.world.cache import WORLD_SEED, _load_entry, cache_key, load_world_model
from gradsynth.world.cache_files import verify_manifest
from gradsynth.world.pretrain import recall_counts

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -m gradsynth.world.shipped"

# Facts recalled per split (split seed 0) by the shipped default world model; documented in
# docs/reproducing.md ("The embedded world").
DEFAULT_FINGERPRINT = {
    "forget": (15, 15),
    "retain": (136, 136),
    "sibling": (5, 5),
    "neighbour": (36, 36),
    "general": (58, 60),
    "additions": (6, 24),
}


def _entry_name(size: str) -> str:
    return f"world-{size}-{cache_key(size, build_world(SIZES[size], WORLD_SEED))}"


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_ships_the_model_of_the_world_the_code_builds(size):
    name = _entry_name(size)
    entry = shipped_module.shipped_entry(name)
    shipped = sorted(p.name for p in shipped_module.SHIPPED_DIR.glob(f"world-{size}-*"))
    fix = f"run `{REGENERATE} --sizes {size}`"
    assert entry is not None, f"no shipped {name} (the package has {shipped}): {fix}"
    assert shipped == [name], f"stale shipped entries {shipped}: {fix}"
    verify_manifest(entry, cache_module.REQUIRED_FILES)


def test_the_package_data_globs_include_every_shipped_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["gradsynth.world"]
    files = [p for p in shipped_module.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert files
    for path in files:
        relative = path.relative_to(shipped_module.SHIPPED_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_shipped_ci_model_is_what_training_gives(ci_world_master):
    """The suite's freshly trained CI model (ci_world_master, trained with the shipped ones off) recalls
    the same facts as the shipped one; on the processor kind and torch it was trained with, it has
    the same weights bit for bit."""
    shipped_model, tokenizer, info = _load_entry(shipped_module.shipped_entry(_entry_name("ci")))
    trained_model, _, _ = _load_entry(Path(ci_world_master))
    splits = split_world(build_world(SIZES["ci"], WORLD_SEED), SIZES["ci"], 0)
    assert recall_counts(shipped_model, tokenizer, splits) == CI_FINGERPRINT
    trained_on = info["trained_on"]
    if (trained_on["cpu_capability"], trained_on["torch"]) == (
        torch.backends.cpu.get_cpu_capability(),
        torch.__version__,
    ):
        trained = trained_model.state_dict()
        for name, weights in shipped_model.state_dict().items():
            assert torch.equal(weights, trained[name]), f"{name} is not what training gives: {REGENERATE}"
        assert shipped_model.state_dict().keys() == trained.keys()


def test_a_fresh_install_loads_the_shipped_default_model_untrained(tmp_path, monkeypatch, retrained):
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(shipped_module.ENV, "1")
    lines: list[str] = []
    model, tokenizer, world, info = load_world_model("default", log=lines.append)
    assert retrained == [] and lines == []
    assert info["shipped"] and Path(info["path"]).parent == shipped_module.SHIPPED_DIR
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    splits = split_world(world, SIZES["default"], 0)
    counts = recall_counts(model, tokenizer, splits)
    assert counts == DEFAULT_FINGERPRINT, json.dumps(counts)


def test_a_cached_model_comes_before_the_shipped_one(cache, monkeypatch, retrained):
    monkeypatch.setenv(shipped_module.ENV, "1")
    *_, info = load_world_model("ci", log=lambda _: None)
    assert info["cached"] and "shipped" not in info and Path(info["path"]).parent == cache


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_the_shipped_model_can_be_switched_off(tmp_path, monkeypatch, retrained, switch):
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(shipped_module.ENV, "0" if switch == "env" else "1")
    argument = {"shipped": False} if switch == "argument" else {}
    *_, info = load_world_model("ci", log=lambda _: None, **argument)
    assert retrained == ["ci"] and not info["cached"]


def test_a_damaged_shipped_model_is_trained_instead_with_one_line(tmp_path, monkeypatch, retrained):
    package = tmp_path / "shipped"
    name = _entry_name("ci")
    shutil.copytree(shipped_module.SHIPPED_DIR / name, package / name)
    (package / name / "model.safetensors").write_bytes(b"truncated")
    monkeypatch.setattr(shipped_module, "SHIPPED_DIR", package)
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(shipped_module.ENV, "1")
    lines: list[str] = []
    *_, info = load_world_model("ci", log=lines.append)
    assert retrained == ["ci"] and not info["cached"]
    assert "shipped in" in lines[0] and "is damaged (model.safetensors has 9 bytes" in lines[0]
