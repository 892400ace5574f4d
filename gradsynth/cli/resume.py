"""``--save-every N`` and ``--resume FOLDER``: the checkpoint folder of a `gradsynth unlearn` run.

With ``--save-every N`` the run writes its checkpoint to ``<--out>-checkpoint`` (or to the
``--resume`` folder it continues) after every N-th step and when a signal stops it (SIGINT, SIGTERM,
SIGHUP), and removes it once the output folder is complete. A checkpoint folder holds

- ``weights.safetensors``: the trained parameters (every weight; a LoRA run's adapters only);
- ``optimizer.pt``: the optimizer's state dict (AdamW's moments and step counts, the rule and its
  weights) and torch's random state (read back with ``torch.load(weights_only=True)``);
- ``state.json``: the step reached, the batch cycles' positions, the records so far, the rung of
  the learning-rate ladder (with the records of the rungs finished before it), and the run's
  settings (`run_settings`).

It is written into a fresh hidden folder next to it and renamed into place, with signals held
back, so a checkpoint is the previous one or the new one, never half of each. ``--resume FOLDER``
with the same settings continues the run to what the run would have given without the stop
(the same weights, bit for bit, on the same machine and thread count); settings that differ are
refused, naming the first one. What may differ: ``--out``, ``--overwrite``, ``--no-progress``,
``--save-every`` and ``--threads`` (which changes the rounding, not the run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsynth.cli.errors import CliError
from gradsynth.cli.signals import Interrupted, deferred
from gradsynth.unlearning.checkpoint import Checkpointing, LoopState

VERSION = 1
STATE, WEIGHTS, OPTIMIZER = "state.json", "weights.safetensors", "optimizer.pt"
NOT_SETTINGS = frozenset(
    {"command", "argv", "out", "overwrite", "no_progress", "resume", "save_every", "threads"}
)  # argv: the words themselves, which name --out and --resume


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define the run, in JSON form (paths as text), as a checkpoint records them."""
    chosen = {key: value for key, value in sorted(vars(args).items()) if key not in NOT_SETTINGS}
    return json.loads(json.dumps(chosen, default=str))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if value is True or value is False:
        return "given" if value else "(not given)"
    return str(value)


def _check_same_settings(folder: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise CliError(
                f"--resume {folder}: the checkpoint is of a run with {_flag(key)} {_shown(saved.get(key))}, "
                f"this one has {_shown(now.get(key))}; give the interrupted run's settings"
            )


@dataclass
class Resumed:
    """A checkpoint read back: the loop's state, its ladder rung and the rungs finished before it."""

    state: LoopState
    rung: int
    finished: list[dict[str, Any]]  # per finished rung: lr, records, curve, seconds
    curve: list[dict[str, Any]]  # the resumed rung's evaluation curve so far
    save_every: int | None


def _damaged(folder: Path, what: str, err: BaseException | None = None) -> CliError:
    reason = f" ({(str(err).strip().splitlines() or [type(err).__name__])[0][:160]})" if err else ""
    return CliError(
        f"--resume {folder}: {what}{reason}; it is not a checkpoint this run can continue, start "
        "the run without --resume"
    )


def read_checkpoint(folder: Path, args: argparse.Namespace) -> Resumed:
    """The checkpoint in ``folder``, refused with one line if missing, damaged or of other settings."""
    if not folder.is_dir():
        raise CliError(
            f"--resume {folder}: no such folder; give the checkpoint folder an interrupted run wrote "
            "(<--out>-checkpoint, with --save-every)"
        )
    missing = [name for name in (STATE, WEIGHTS, OPTIMIZER) if not (folder / name).is_file()]
    if missing:
        raise _damaged(folder, f"has no {missing[0]}")
    try:
        meta = json.loads((folder / STATE).read_text())
        version = meta["version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _damaged(folder, f"its {STATE} cannot be read", err) from err
    if version != VERSION:
        raise _damaged(
            folder, f"it is a version {version!r} checkpoint; this gradsynth reads version {VERSION}"
        )
    _check_same_settings(folder, meta.get("settings", {}), run_settings(args))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(folder / WEIGHTS)
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        raise _damaged(folder, f"its {WEIGHTS} cannot be read", err) from err
    try:
        saved = torch.load(folder / OPTIMIZER, weights_only=True)
        state = LoopState(
            step=int(meta["step"]),
            weights=weights,
            optimizer=saved["optimizer"],
            cycles=meta["cycles"],
            torch_rng=saved["torch_rng"],
            records=meta["records"],
        )
        return Resumed(state, int(meta["rung"]), meta["finished"], meta["curve"], meta.get("save_every"))
    except Exception as err:  # torch.load raises many kinds for a damaged file (pickle, zip, runtime)
        raise _damaged(folder, f"its {OPTIMIZER} or {STATE} cannot be read", err) from err


def _write(folder: Path, state: LoopState, meta: dict[str, Any]) -> None:
    """Write the checkpoint into a fresh folder beside ``folder`` and rename it into place."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name[:100]}.partial-", dir=folder.parent))
    old = None
    try:
        save_file({name: t.contiguous() for name, t in state.weights.items()}, staging / WEIGHTS)
        torch.save({"optimizer": state.optimizer, "torch_rng": state.torch_rng}, staging / OPTIMIZER)
        body = {**meta, "step": state.step, "cycles": state.cycles, "records": state.records}
        (staging / STATE).write_text(json.dumps(body))
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name[:100]}.old-", dir=folder.parent))
            folder.rename(old)  # onto a fresh empty folder
        staging.rename(folder)
    except BaseException:
        if old is not None and not folder.exists():
            old.rename(folder)
            old = None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def held_signals() -> Iterator[None]:
    """Signals wait until the block is done, then stop the command as they would have."""
    with deferred() as received:
        yield
    signum = received()
    if signum is not None:
        raise Interrupted(signum)


class RunCheckpoints:
    """The checkpoints of one `unlearn` run: where, how often, and the state it resumes (if any)."""

    def __init__(self, folder: Path, every: int | None, settings: dict[str, Any], resumed: Resumed | None):
        self.folder, self.every, self.settings, self.resumed = folder, every, settings, resumed

    def for_rung(
        self, index: int, finished: Callable[[], list[dict[str, Any]]], curve: list[dict[str, Any]]
    ) -> Checkpointing:
        """What the loop of ladder rung ``index`` saves (with the rungs ``finished()`` before it)."""
        start = self.resumed.state if self.resumed and self.resumed.rung == index else None
        if start is not None:
            curve[:] = self.resumed.curve

        def save(state: LoopState, interrupted: bool) -> None:
            meta = {
                "version": VERSION,
                "settings": self.settings,
                "save_every": self.every,
                "rung": index,
                "finished": finished(),
                "curve": curve,
            }
            with held_signals():
                _write(self.folder, state, meta)
            if interrupted:
                print(
                    f"gradsynth: checkpoint after step {state.step} written to {self.folder}; continue with "
                    f"the same command and --resume {self.folder}",
                    file=sys.stderr,
                )

        return Checkpointing(save=save, every=self.every, start=start, guard=held_signals)

    def finish(self) -> None:
        """The run is complete and written: its checkpoint is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def run_checkpoints(args: argparse.Namespace, out: Path) -> RunCheckpoints | None:
    """The run's checkpoints (None without ``--save-every`` and ``--resume``), checked before any work."""
    if not args.save_every and args.resume is None:
        return None
    settings = run_settings(args)
    if args.resume is not None:
        resumed = read_checkpoint(args.resume, args)
        every = args.save_every or resumed.save_every
        print(
            f"Resuming from {args.resume}: {resumed.state.step} steps done (ladder rung {resumed.rung + 1})"
        )
        return RunCheckpoints(args.resume, every, settings, resumed)
    folder = out.with_name(out.name + "-checkpoint")
    if folder.exists() and not args.overwrite:
        raise CliError(
            f"--save-every: {folder} exists (the checkpoint of an interrupted run?); continue that run "
            f"with --resume {folder}, or remove it, or pass --overwrite"
        )
    return RunCheckpoints(folder, args.save_every, settings, None)
