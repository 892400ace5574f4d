"""Where the audit of a real model starts: the model before any unlearning, on each seed's split.

No model that never learned the shipped facts exists for a real model, so the audit's 0.5 line
and the reference truth ratio are missing. This prints the audit (`gradsynth.cli.user_audit.
task_audit`, as ``unlearn --facts real --audit`` runs it: forget facts against the shipped facts
the model does not know) of the *original* model per seed, the row every unlearned run's audit
is read against: an attack that cannot tell the forget facts from non-members here measures no
knowledge, before or after unlearning. ``--relearn`` adds the relearning attack (its curves
start where the model already recalls every forget fact, so it is off by default).

    python benchmarks/real_audit_before.py --model smollm2 --seeds 0,2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gradsynth.cli.audit_command import MIA_NAMES
from gradsynth.cli.parser import build_parser
from gradsynth.cli.sources import facts_task
from gradsynth.cli.user_audit import task_audit
from gradsynth.unlearning.audit import RelearnSettings


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2")
    cli.add_argument("--seeds", default="0", help="comma-separated seeds of the --facts real split")
    cli.add_argument("--relearn", action="store_true", help="also run the relearning attack")
    cli.add_argument("--relearn-lr", type=float, default=3e-5)
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--out", type=Path, help="also write the audits as JSON here")
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    relearn = RelearnSettings(lr=args.relearn_lr) if args.relearn else None

    print(
        "| seed | "
        + " | ".join(f"MIA AUC {n}" for n in MIA_NAMES.values())
        + " | mean log truth ratio | true ranks last | forget recall | seconds |"
    )
    print("|---" * (len(MIA_NAMES) + 5) + "|")
    found = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        unlearn = ["unlearn", "--model", args.model, "--facts", "real", "--seed", str(seed)]
        task = facts_task(build_parser().parse_args(unlearn), seed)
        start = time.perf_counter()
        audit = task_audit(task.model, task, task.non_members or [], relearn=relearn)
        seconds = time.perf_counter() - start
        found[seed] = audit
        row = audit["model"]
        cells = [f"{row['mia'][m]['auc']:.2f}" for m in MIA_NAMES]
        cells += [f"{row['mean_log_truth_ratio']:+.2f}", f"{100 * row['ranks_last']:.0f}%"]
        cells += [f"{100 * row['forget_recall']:.0f}%", f"{seconds:.0f}"]
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
