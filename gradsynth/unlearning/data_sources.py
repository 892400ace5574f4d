"""Where a forget, retain or evaluation set comes from, written as one string.

The command line's ``--forget``/``--retain``/``--eval NAME=SOURCE`` and the library's
`gradsynth.unlearning.data.load_examples` take the same strings:

``FILE``
    a ``.jsonl``/``.json``, ``.csv``, ``.parquet`` or ``.txt`` file (`gradsynth.unlearning.data`).
``FOLDER`` or ``FOLDER:SPLIT``
    a ``datasets`` folder: what ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote, or a
    folder of data files (``train.jsonl``, ``test.parquet``, ...; no loading script). A
    ``DatasetDict`` with more than one split needs ``:SPLIT``.
``hub:ORG/NAME``, ``hub:ORG/NAME/CONFIG``, either followed by ``:SPLIT``
    a Hub dataset read from this machine's caches only, never the network: first the ``datasets``
    cache that an earlier ``load_dataset("ORG/NAME", "CONFIG")`` filled (``HF_DATASETS_CACHE``),
    then the Hub cache that ``hf download --repo-type dataset ORG/NAME`` filled (``HF_HUB_CACHE``).
    ``:SPLIT`` is needed when the configuration has several splits (MUSE's ``forget``/``retain1``).

A string that names an existing file or folder is always that path, colons included; otherwise
the part after the last ``:`` is the split. The explicit ``hub:`` prefix keeps a mistyped file
name from being looked up as a dataset id. Every problem is a `DataError` naming the source and
the fix; ``datasets``' loggers are silenced while it reads, so that the error is the one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsynth.unlearning.quiet import quiet_loggers

HUB_PREFIX = "hub:"
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)


class DataError(ValueError):
    """A data source that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class Source:
    """A parsed source: ``kind`` is ``"file"``, ``"folder"`` or ``"hub"``."""

    kind: str
    location: str  # the path, or the Hub id ORG/NAME
    text: str  # as given, for messages
    config: str | None = None
    split: str | None = None


def parse_source(text: str | Path, what: str = "data") -> Source:
    """The `Source` that ``text`` names (see the module docstring); ``what`` names it in errors."""
    text = str(text)
    if text.startswith(HUB_PREFIX):
        return _parse_hub(text, what)
    path = Path(text)
    if path.exists():
        return Source("folder" if path.is_dir() else "file", text, text)
    head, colon, split = text.rpartition(":")
    if colon and head and Path(head).is_dir():
        if not split:
            raise DataError(f"{what} {text}: empty split after ':'; write FOLDER:SPLIT, e.g. {head}:train")
        return Source("folder", head, text, split=split)
    if colon and head and Path(head).is_file():
        raise DataError(
            f"{what} {text}: a split (:{split}) goes with a datasets folder or a hub: id, not a file; "
            f"give {head} alone"
        )
    return Source("file", text, text)  # absent: the file reader names the problem (type or absence)


def local_path(text: str | Path) -> str | None:
    """The file or folder on this machine that ``text`` reads (its ``:SPLIT`` dropped), or None for a
    Hub id or a path that does not exist; never raises (for the ``--out`` safety check)."""
    text = str(text)
    if os.path.exists(text):
        return text
    head, colon, _ = text.rpartition(":")
    return head if colon and head and not text.startswith(HUB_PREFIX) and os.path.isdir(head) else None


def _parse_hub(text: str, what: str) -> Source:
    body = text[len(HUB_PREFIX) :]
    body, colon, split = body.partition(":")
    parts = body.split("/")
    if len(parts) not in (2, 3) or not all(parts) or (colon and not split) or ":" in split:
        raise DataError(
            f"{what} {text}: not a Hub dataset; write hub:ORG/NAME, hub:ORG/NAME/CONFIG, "
            "either optionally followed by :SPLIT (e.g. hub:locuslab/TOFU/forget10)"
        )
    config = parts[2] if len(parts) == 3 else None
    return Source("hub", "/".join(parts[:2]), text, config=config, split=split or None)


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err  # datasets wraps the parser's error in a generic one
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(cause).__name__


def _one_dataset_only(source: Source, what: str) -> None:
    if source.split is not None:
        raise DataError(
            f"{what} {source.text}: holds one Dataset, not a DatasetDict with splits; drop ':{source.split}'"
        )


def _choose_split(names: list[str], source: Source, what: str) -> str:
    """The split of ``names`` that ``source`` asks for (its ``:SPLIT``, or the only one)."""
    names = sorted(names)
    if source.split is None:
        if len(names) == 1:
            return names[0]
        raise DataError(
            f"{what} {source.text}: has the splits {names}; add one, e.g. {source.text}:{names[0]}"
        )
    if source.split not in names:
        raise DataError(f"{what} {source.text}: no split '{source.split}'; give one of {names}")
    return source.split


def _pick_split(loaded: Any, source: Source, what: str) -> Any:
    """The one ``Dataset`` of ``loaded`` (a Dataset or a DatasetDict) that ``source`` asks for."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        _one_dataset_only(source, what)
        return loaded
    return loaded[_choose_split(list(loaded), source, what)]


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub access refused inside: ``datasets`` and ``huggingface_hub`` read these flags per call."""
    import datasets
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _load_folder(folder: str, config: str | None) -> Any:
    """A folder of data files (or a Hub snapshot) through ``load_dataset``, in a private cache."""
    import datasets

    # A private cache removed at once, the table kept in memory: nothing of the forget or retain
    # data is left in the shared datasets cache (which is readable by others).
    with tempfile.TemporaryDirectory(prefix="gradsynth-data-") as private:
        return datasets.load_dataset(folder, config, cache_dir=private, keep_in_memory=True)


def _read_saved(folder: Path, source: Source, what: str) -> Any:
    """A ``save_to_disk`` folder: only the split asked for is opened (an empty one has no shard
    file, which ``load_from_disk`` fails on with an IndexError)."""
    import datasets

    splits = folder / "dataset_dict.json"
    if splits.is_file():
        folder = folder / _choose_split(list(json.loads(splits.read_text())["splits"]), source, what)
    else:
        _one_dataset_only(source, what)
    if not json.loads((folder / "state.json").read_text()).get("_data_files"):
        raise DataError(f"{what} {source.text}: the set has no rows; give at least one example")
    return datasets.load_from_disk(str(folder), keep_in_memory=True)


def _read_folder(source: Source, what: str) -> Any:
    folder = Path(source.location)
    try:
        if any((folder / marker).is_file() for marker in SAVED_MARKERS):
            return _read_saved(folder, source, what)
        return _pick_split(_load_folder(str(folder), None), source, what)
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"{what} {source.text}: not a datasets folder that can be read ({_first_line(err)}); give a "
            "folder written by save_to_disk, or one of .jsonl/.csv/.parquet files"
        ) from err


def _hub_snapshot(repo_id: str) -> str | None:
    """The Hub cache's snapshot folder of the dataset ``repo_id``, or None if it was never downloaded."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or a damaged cache entry: not usable either way
        return None


def _read_hub(source: Source, what: str) -> Any:
    import datasets
    import huggingface_hub.constants as hub

    with _offline():
        try:  # the datasets cache of an earlier load_dataset (prepared Arrow files)
            return datasets.load_dataset(source.location, source.config, keep_in_memory=True)
        except Exception as err:
            cached_error = err
        snapshot = _hub_snapshot(source.location)
        if snapshot is not None:
            try:
                return _load_folder(snapshot, source.config)
            except Exception as err:
                raise DataError(
                    f"{what} {source.text}: the Hub cache's copy cannot be read ({_first_line(err)}); "
                    "check the configuration name"
                ) from err
    if isinstance(cached_error, ConnectionError):  # offline and nothing cached under that id
        raise DataError(
            f"{what} {source.text}: not in this machine's caches (HF_DATASETS_CACHE="
            f"{datasets.config.HF_DATASETS_CACHE}, HF_HUB_CACHE={hub.HF_HUB_CACHE}); gradsynth never "
            f"downloads: run `hf download --repo-type dataset {source.location}` where there is a "
            "network, or give a file or a save_to_disk folder"
        ) from cached_error
    raise DataError(
        f"{what} {source.text}: {_first_line(cached_error)}; check the configuration name"
    ) from cached_error


def read_dataset(source: Source, what: str = "data") -> Any:
    """The ``datasets.Dataset`` of a ``"folder"`` or ``"hub"`` source (one split)."""
    import datasets

    datasets.disable_progress_bars()
    with quiet_loggers():
        if source.kind == "hub":
            return _pick_split(_read_hub(source, what), source, what)
        return _read_folder(source, what)
