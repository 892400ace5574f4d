import os
import sys

import pytest
import torch
from hypothesis import settings

# Property tests: 200 examples each; CI replays a fixed sequence so that a run is reproducible,
# and HYPOTHESIS_PROFILE=thorough searches far wider before a release.
settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

sys.path.insert(0, os.path.dirname(__file__))

# The suite trains its own CI world model (tests/test_world_shipped.py compares it with the one the
# package ships), and the cache tests need training to happen: the shipped models are switched off
# here, for child processes too, and switched back on only where a test says so.
os.environ["GRADSYNTH_SHIPPED_WORLD"] = "0"

RULES = ["sago", "sago_prefer_retain", "pcgrad", "pcgrad_global", "sum", "blur"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def ci_world_master(tmp_path_factory):
    """The trained CI world cache entry, trained once per session; copy it, never modify it."""
    pytest.importorskip("transformers")
    from gradsynth.world.cache import load_world_model

    root = tmp_path_factory.mktemp("ci-world-master")
    old = os.environ.get("GRADSYNTH_CACHE")
    os.environ["GRADSYNTH_CACHE"] = str(root)
    torch.set_num_threads(1)  # session fixtures run before the per-test setting
    try:
        *_, info = load_world_model("ci", log=lambda _: None)
    finally:
        if old is None:
            del os.environ["GRADSYNTH_CACHE"]
        else:
            os.environ["GRADSYNTH_CACHE"] = old
    return info["path"]


def copy_world_cache(tmp_path_factory, master: str):
    """A private cache folder holding a copy of the trained CI world entry (no retraining)."""
    import shutil
    from pathlib import Path

    cache = tmp_path_factory.mktemp("gradsynth-cache")
    shutil.copytree(master, cache / Path(master).name)
    return cache


@pytest.fixture
def cache(ci_world_master, tmp_path, monkeypatch):
    """A private copy of the trained CI world cache, used through GRADSYNTH_CACHE."""
    import shutil
    from pathlib import Path

    root = tmp_path / "cache"
    shutil.copytree(ci_world_master, root / Path(ci_world_master).name)
    monkeypatch.setenv("GRADSYNTH_CACHE", str(root))
    return root


@pytest.fixture
def retrained(monkeypatch):
    """Stub the world training (fast); the list records each training, by size name."""
    import gradsynth.world.cache as cache_module

    calls: list[str] = []

    def quick_pretrain(model, tokenizer, examples, size, seed, progress=None):
        calls.append(size.name)
        return {"recall": 0.0, "steps": 0}

    monkeypatch.setattr(cache_module, "pretrain", quick_pretrain)
    return calls


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty build cache for the C kernels, and the loaded library forgotten before and after."""
    from gradsynth.rules import native

    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path
    native.reset()
