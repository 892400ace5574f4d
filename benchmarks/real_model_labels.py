"""What a real instruct model is trained on: its own answers or the bare gold answers.

On the shipped real-facts benchmark (``gradsynth unlearn --facts real``), the same seed's split
is unlearned twice from the same model with the same settings: once with the command line's
labels (the model's own answer, up to the first sentence that contains the gold answer) and once
with the gold answers as labels ("Paris" right after the chat prompt). Both are scored the same
way (the gold answer contained in a fresh greedy answer). Prints one table (the forget loss is
the objective's, on that run's labels: for GA, minus their NLL); ``--out`` also writes it as JSON.

    python benchmarks/real_model_labels.py --model smollm2 --steps 10 --lr 1e-5 --rule sago
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from gradsynth.cli.parser import build_parser
from gradsynth.cli.run_one import evaluate, evaluation_batches, run_unlearning
from gradsynth.cli.sources import load_task
from gradsynth.cli.unlearn_command import settings_for

SPLITS = ("forget", "retain", "neighbour", "general")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2")
    cli.add_argument("--rule", default="sago")
    cli.add_argument("--forget-loss", default="ga")
    cli.add_argument("--lr", type=float, default=1e-5)
    cli.add_argument("--steps", type=int, default=10)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--out", type=Path)
    own = cli.parse_args()
    torch.set_num_threads(own.threads)
    argv = ["unlearn", "--model", own.model, "--facts", "real", "--rule", own.rule]
    argv += ["--forget-loss", own.forget_loss, "--lr", f"{own.lr:g}", "--steps", str(own.steps)]
    args = build_parser().parse_args([*argv, "--batch-size", "4"])
    task = load_task(args, own.seed)
    # The evaluation splits hold the gold answers: training on them is the "gold labels" run.
    gold = replace(task, forget=task.splits["forget"], retain=task.splits["retain"])
    batches = evaluation_batches(task)
    before = evaluate(task.model, batches, task)
    settings = settings_for(args, own.rule, own.lr, own.seed, len(task.forget))
    rows = {}
    for name, variant in (("own answers", task), ("gold answers", gold)):
        start = time.process_time()
        _, outcome = run_unlearning(variant, settings, "cpu", eval_batches=batches, before=before)
        rows[name] = {
            "forget loss": (outcome.records[0].forget_loss, outcome.records[-1].forget_loss),
            **{s: outcome.after[s]["recall"] for s in SPLITS},
            "general MC": outcome.after["general"].get("mc_acc"),
            "prose NLL": outcome.after["prose"]["nll"],
            "cpu_s": time.process_time() - start,
        }
    print(
        f"{own.model}, --facts real seed {own.seed} (forget relation "
        f"{task.description['forget_relation']}), {own.rule} + {own.forget_loss}, lr {own.lr:g}, "
        f"{own.steps} steps, AdamW, one thread. Recall: gold answer contained in the greedy answer."
    )
    head = ["labels", "forget loss (step 1 → last)", *SPLITS, "general MC", "prose NLL", "CPU s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print(
        "| before | - | "
        + " | ".join(f"{100 * before[s]['recall']:.0f}%" for s in SPLITS)
        + f" | {100 * before['general']['mc_acc']:.0f}% | {before['prose']['nll']:.3f} | - |"
    )
    for name, r in rows.items():
        first, last = r["forget loss"]
        cells = [f"{first:.3f} → {last:.3f}", *(f"{100 * r[s]:.0f}%" for s in SPLITS)]
        cells += [f"{100 * r['general MC']:.0f}%", f"{r['prose NLL']:.3f}", f"{r['cpu_s']:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if own.out:
        own.out.write_text(json.dumps({"before": before, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
