"""Regenerate the tables of docs/reproducing.md with one command.

Runs ``gradsynth compare`` on the embedded world with the comparable-forgetting protocol and the
paper's objective matrix, exactly as documented:

- rules ``sum, pcgrad, sago, sago_prefer_retain, blur`` x forget objectives ``ga, npo, simnpo,
  rmu`` (each with the paper's weights, see `gradsynth.unlearning.paper_weights`), retain NLL
  (RMU: its activation loss);
- every run stops after the first step with forget recall <= 10% (checked every step), cap 60
  steps; a run that does not get there restarts from the original model at 2x the learning
  rate, from 1e-3, at most 4 rates (1e-3, 2e-3, 4e-3, 8e-3);
- ten seeds (each picks other target people for the same pretrained world model); every cell
  is mean ± standard deviation (median) over them, and the rules the paper compares are also
  compared seed by seed (``results.md``'s paired table).

It writes the output of ``gradsynth compare`` (``results.md``, ``results.json``, ``pareto.png``,
``tradeoff.png``) to ``--out`` and adds ``reproduce.json``: the command, the wall time, the
machine and the library versions. The world model is the one shipped in the package (the same
weights on every machine; `gradsynth.world.shipped`).

Usage: ``python benchmarks/reproduce.py [--size ci|default] [--seeds 10] [--out DIR] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RULES = "sum,pcgrad,sago,sago_prefer_retain,blur"
OBJECTIVES = "ga,npo,simnpo,rmu"
PROTOCOL = [
    "--forget-target",
    "0.1",
    "--steps",
    "60",
    "--lrs",
    "1e-3",
    "--ladder-factor",
    "2",
    "--ladder-rungs",
    "4",
]


def compare_argv(size: str, seeds: int, out: Path, threads: int) -> list[str]:
    """The ``gradsynth compare`` arguments of the documented run."""
    return [
        "compare",
        "--world",
        size,
        "--rules",
        RULES,
        "--forget-loss",
        OBJECTIVES,
        *PROTOCOL,
        "--seeds",
        ",".join(str(s) for s in range(seeds)),
        "--threads",
        str(threads),
        "--out",
        str(out),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["ci", "default"], default="default", help="world size (default)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    argv = compare_argv(args.size, args.seeds, args.out, args.threads)
    argv += ["--overwrite"] * args.overwrite + ["--no-progress"] * args.no_progress
    print("gradsynth " + shlex.join(argv), flush=True)

    import torch
    from run import cpu_model  # benchmarks/run.py, beside this script

    from gradsynth.cli import main as gradsynth_main

    start, cpu_start = time.perf_counter(), time.process_time()
    code = gradsynth_main(argv)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if code != 0:
        return code
    info = {
        "command": "gradsynth " + shlex.join(argv),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # this process's CPU time: comparable on a loaded machine
        "size": args.size,
        "seeds": args.seeds,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (args.out / "reproduce.json").write_text(json.dumps(info, indent=2))
    print(f"reproduce: {seconds:.0f}s wall, {cpu_seconds:.0f} CPU-seconds; wrote {args.out}/reproduce.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
