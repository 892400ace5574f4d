"""``gradsynth compare --jobs N``: the comparison's cells run in N worker processes at once.

A comparison of a real model is hours of independent cells (seed x objective x rule x rate),
each on one thread; a machine with N cores runs N of them at a time. The parent starts N copies
of the same command (``--queue FOLDER``, each writing ``worker.json`` into its own folder), and
each worker takes the next cell nobody has claimed, in the single-process order: a claim is a
file created with ``O_CREAT | O_EXCL`` in the queue folder, so exactly one worker gets each
cell and a worker whose cells take long simply claims fewer (cells differ a lot: a rung of the
learning-rate ladder that misses the target costs the whole step cap). A worker prepares a seed
(the task, the scores before) the first time it claims one of its cells. The parent then
renders every worker's cells, in cell order, as one comparison — the same tables, the same
results.json as one process writes, with the same runs up to float rounding (a worker's model is
the same, its thread count too).

A signal stops the workers (each keeps its finished cells) and the parent writes what they
finished, headed as interrupted, as one process does; a worker that fails ends the comparison
with its last line and the folder holding every worker's log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradsynth.cli.errors import CliError
from gradsynth.cli.signals import Interrupted

# Flags of the parent's command line a worker does not take (with the number of values each has).
_PARENT_ONLY = {"--jobs": 1, "--out": 1, "--overwrite": 0, "--no-progress": 0, "--queue": 1}
POLL_SECONDS = 5.0


def claimer(queue: Path | None) -> Callable[[int], bool]:
    """``claim(cell)``: True for the one worker that creates ``queue/cell-<n>`` first (every cell is
    this process's when there is no queue)."""
    if queue is None:
        return lambda cell: True

    def claim(cell: int) -> bool:
        try:
            os.close(os.open(queue / f"cell-{cell}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
        return True

    return claim


def worker_argv(argv: list[str]) -> list[str]:
    """The parent's arguments less those that only the parent takes (`_PARENT_ONLY`)."""
    kept, skip = [], 0
    for word in argv:
        if skip:
            skip -= 1
            continue
        name = word.split("=", 1)[0]
        if name in _PARENT_ONLY:
            skip = 0 if "=" in word else _PARENT_ONLY[name]
            continue
        kept.append(word)
    return kept


def run_jobs(args: argparse.Namespace, out: Path, total: int) -> int:
    """Run the comparison in ``args.jobs`` workers and write one result into ``out``."""
    from gradsynth.cli.compare_command import write_comparison

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gradsynth-compare-jobs-"))
    queue = work / "queue"
    queue.mkdir()
    base = [sys.executable, "-m", "gradsynth.cli", *worker_argv(args.argv), "--no-progress"]
    workers = []
    for n in range(args.jobs):
        log = (work / f"worker-{n}.log").open("w")
        argv = [*base, "--queue", str(queue), "--out", str(work / f"worker-{n}")]
        # Unbuffered: a worker's log shows its phase lines as they happen (hours on a real model).
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        workers.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    print(f"compare: {total} runs in {args.jobs} worker processes (logs in {work})", flush=True)
    interrupted: Interrupted | None = None
    try:
        _wait(workers, queue, total, start)
    except KeyboardInterrupt as err:
        interrupted = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
        for process, _ in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in workers:
            process.wait()
    finally:
        for _, log in workers:
            log.close()
    results = [json.loads(p.read_text()) for p in sorted(work.glob("worker-*/worker.json"))]
    if interrupted is None:
        for n, (process, _) in enumerate(workers):
            if process.returncode != 0:
                raise CliError(
                    f"compare --jobs: worker {n} failed: {_last_line(work / f'worker-{n}.log')} "
                    f"(every worker's log is in {work})"
                )
    runs = sorted((r for result in results for r in result["runs"]), key=lambda r: r["cell"])
    diverged = sorted((d for result in results for d in result["diverged"]), key=lambda d: d["cell"])
    if not runs:
        if interrupted is not None:
            shutil.rmtree(work, ignore_errors=True)
            raise interrupted
        cell = diverged[0]
        raise CliError(f"every run diverged (forget loss {cell['objective']}, {cell['error']}); lower --lrs")
    settings = results[0]["settings"]
    targets = {
        k: v
        for result in results
        for k, v in (result["settings"]["protocol"] or {}).get("targets", {}).items()
    }
    if targets:
        settings["protocol"]["targets"] = dict(sorted(targets.items(), key=lambda kv: int(kv[0])))
    settings["jobs"] = args.jobs
    try:
        return write_comparison(
            args,
            out,
            settings,
            results[0]["splits"],
            results[0]["before"],
            runs,
            diverged,
            interrupted,
            total,
            start,
        )
    finally:  # written (or interrupted after writing): the workers' folder has served
        shutil.rmtree(work, ignore_errors=True)


def _wait(workers: list[tuple[subprocess.Popen, Any]], queue: Path, total: int, start: float) -> None:
    """Wait for every worker, printing each newly claimed cell; a failed worker stops the others."""
    claimed = 0
    while any(process.poll() is None for process, _ in workers):
        now = len(list(queue.iterdir()))
        if now != claimed:
            claimed = now
            print(
                f"compare: run {min(claimed, total)} of {total} started ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
        if any(process.returncode not in (None, 0) for process, _ in workers):
            for process, _ in workers:
                if process.poll() is None:
                    process.terminate()
        time.sleep(POLL_SECONDS)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"
