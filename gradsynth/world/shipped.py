"""The trained world models that ship inside the package.

Training the default world model takes over two minutes on two CPU cores, and a model trained on
another processor kind (AVX2 against AVX-512) rounds differently; so the package carries the
trained entries, and every installation starts from the same weights, bit for bit, in seconds.

They live in ``gradsynth/world/shipped/world-<size>-<key>/``: the layout and checksum manifest of a
cache entry (`gradsynth.world.cache`). ``<key>`` is the cache key of the world the current code
builds (its size settings, seed, facts and format version), so a shipped entry is used only when
it is exactly the world asked for; a changed world is trained as before. ``pretrain.json`` records
the machine it was trained on.

Set ``GRADSYNTH_SHIPPED_WORLD=0`` to ignore the shipped entries (train and cache, as without them).
After changing the world or its pretraining, regenerate them (one thread, as the cache does)::

    python -m gradsynth.world.shipped            # every size
    python -m gradsynth.world.shipped --sizes ci
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

SHIPPED_DIR = Path(__file__).with_name("shipped")
ENV = "GRADSYNTH_SHIPPED_WORLD"


def shipped_enabled() -> bool:
    """False when ``GRADSYNTH_SHIPPED_WORLD`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def shipped_entry(folder_name: str) -> Path | None:
    """The shipped entry named ``folder_name`` (``world-<size>-<key>``), if the package has it."""
    folder = SHIPPED_DIR / folder_name
    return folder if folder.is_dir() else None


def regenerate(sizes: Sequence[str]) -> list[Path]:
    """Train each size from scratch (no cache, no shipped entry) and replace its shipped entry."""
    import torch

    from gradsynth.world.cache import load_world_model
    from gradsynth.world.sizes import SIZES

    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown world size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    torch.set_num_threads(1)
    written = []
    saved = {k: os.environ.get(k) for k in ("GRADSYNTH_CACHE", ENV)}
    with tempfile.TemporaryDirectory(prefix="gradsynth-ship-") as tmp:
        os.environ["GRADSYNTH_CACHE"], os.environ[ENV] = tmp, "0"
        try:
            for size in sizes:
                *_, info = load_world_model(size)
                entry = Path(info["path"])
                if not entry.is_dir():
                    raise RuntimeError(f"the {size!r} world model could not be cached in {tmp}")
                SHIPPED_DIR.mkdir(exist_ok=True)
                for old in SHIPPED_DIR.glob(f"world-{size}-*"):
                    shutil.rmtree(old)
                shutil.copytree(entry, SHIPPED_DIR / entry.name)
                written.append(SHIPPED_DIR / entry.name)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from gradsynth.world.sizes import SIZES

    parser = argparse.ArgumentParser(description="Retrain the world models shipped in the package.")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated sizes (default: all)")
    args = parser.parse_args(argv)
    try:
        written = regenerate([s.strip() for s in args.sizes.split(",") if s.strip()])
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    for path in written:
        print(f"wrote {path} ({platform.processor() or platform.machine()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
