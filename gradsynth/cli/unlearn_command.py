"""``gradsynth unlearn``: one unlearning run; prints a before/after table and writes the output folder.

Output folder: the unlearned model and tokenizer (``save_pretrained``, safetensors),
``report.json`` (settings, metrics before/after, per-step losses and geometry) and
``curves.png`` (losses and cosines per step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gradsynth.cli.benchmark_plan import plan_from_args
from gradsynth.cli.errors import CliError
from gradsynth.cli.output_folder import check_output_folder, staged_output
from gradsynth.cli.parser import DEFAULT_STEPS, check_rules
from gradsynth.cli.run_one import RunOutcome, run_unlearning
from gradsynth.cli.sources import load_task
from gradsynth.cli.tables import before_after_table, benchmark_table, num
from gradsynth.unlearning.loop import UnlearnSettings, steps_for_epochs
from gradsynth.unlearning.report import general_kept, mean_geometry, plot_curves, write_report
from gradsynth.unlearning.task_losses import LossSettings


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if torch.device(device).type == "meta":  # tensors without data: nothing could be trained
            raise RuntimeError("the meta device holds no data")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise CliError(
            f"--device {device}: not available here ({str(err).splitlines()[0]}); try --device cpu"
        ) from err
    return device


def default_out(command: str) -> Path:
    return Path("gradsynth-runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def loss_settings(args: argparse.Namespace) -> LossSettings:
    return LossSettings(forget=args.forget_loss, retain=args.retain_loss, beta=args.beta, delta=args.delta)


def settings_for(args: argparse.Namespace, rule: str, lr: float, seed: int, n_forget: int) -> UnlearnSettings:
    steps = args.steps or DEFAULT_STEPS
    if args.epochs is not None:
        steps = steps_for_epochs(args.epochs, n_forget, args.batch_size, args.grad_accum)
    return UnlearnSettings(
        rule=rule,
        alpha=args.alpha,
        gamma=args.gamma,
        lr=lr,
        steps=steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=seed,
        losses=loss_settings(args),
    )


def print_kept(outcome: RunOutcome) -> None:
    """The share of the general score kept (the paper's headline) and the lm-eval table, if any."""
    kept = general_kept(outcome.before, outcome.after)
    if kept is not None:
        measure = (
            "multiple-choice accuracy" if outcome.before["general"].get("mc_acc") is not None else "recall"
        )
        print(f"\nGeneral score kept: {100 * kept:.1f}% of the original ({measure} on the general split)")
    if outcome.benchmarks:
        print("\nlm-eval scores:")
        print(benchmark_table(outcome.benchmarks))


def run(args: argparse.Namespace) -> int:
    check_rules([args.rule], "--rule")
    out = args.out or default_out("unlearn")
    check_output_folder(out, args.overwrite)
    device = resolve_device(args.device)
    task = load_task(args, args.seed)
    if args.max_length:
        task.max_length = args.max_length
    settings = settings_for(args, args.rule, args.lr, args.seed, len(task.forget))
    plan = plan_from_args(args, task)
    print(
        f"Unlearning {len(task.forget)} forget examples, retaining {len(task.retain)} "
        f"({task.description['source']}); rule {settings.rule}, forget loss {settings.losses.forget}, "
        f"retain loss {settings.losses.retain}, lr {settings.lr:g}, {settings.steps} steps, device {device}"
    )
    with staged_output(out, args.overwrite) as staging:
        model, outcome = run_unlearning(
            task, settings, device, in_place=True, progress=not args.no_progress, plan=plan
        )
        sizes = {name: len(examples) for name, examples in task.splits.items()}
        print()
        print(before_after_table(outcome.before, outcome.after, sizes))
        print_kept(outcome)
        geometry = mean_geometry(outcome.records)
        print(
            f"\nMean gradient geometry over {len(outcome.records)} steps: "
            f"cos(f,r) {num(geometry['cos_fr'])}, "
            f"cos(g,r) {num(geometry['cos_gr'])}, cos(g,f) {num(geometry['cos_gf'])}, "
            f"conflicting coordinates {num(geometry['conflict_fraction'])}; loop {outcome.seconds:.1f}s"
        )
        model.save_pretrained(staging, safe_serialization=True)
        task.tokenizer.save_pretrained(staging)
        report_settings = {
            "command": "unlearn",
            **settings.as_dict(),
            "device": device,
            "task": task.description,
        }
        write_report(
            staging / "report.json",
            report_settings,
            outcome.before,
            outcome.after,
            outcome.records,
            outcome.benchmarks,
            outcome.curve,
        )
        plot_curves(
            staging / "curves.png", outcome.records, f"{settings.rule}, lr {settings.lr:g}", outcome.curve
        )
    print(f"Wrote {out}/ (model, report.json, curves.png)")
    return 0
