"""``gradsynth compare``: several rules over a learning-rate grid and seeds, on the same model and data.

Writes ``results.md`` (the table with spread over seeds, the comparison at comparable
forgetting and the gradient-geometry table), ``results.json`` (every run and the aggregate),
``pareto.png`` (forget recall against each kept split) and ``tradeoff.png`` (forget score against
the share of the utility split's score kept, one curve per rule). ``--rank-by`` adds a ranking by
any evaluated metric, ``--eval-tasks`` scores every run on lm-eval tasks too. ``--quick`` uses
the CI-sized world (unless ``--model`` is given), two learning rates and 30 steps.
"""

from __future__ import annotations

import argparse
import time

from gradsynth.cli.benchmark_plan import plan_from_args
from gradsynth.cli.compare_ranking import rank, ranking_markdown, tradeoff_plot, utility_kept
from gradsynth.cli.compare_results import aggregate, markdown_report, pareto_plot
from gradsynth.cli.output_folder import check_output_folder, staged_output
from gradsynth.cli.parser import COMPARE_LRS, check_positive_finite, check_rules, parse_list
from gradsynth.cli.run_one import evaluate, evaluation_batches, run_unlearning
from gradsynth.cli.sources import load_task
from gradsynth.cli.unlearn_command import default_out, resolve_device, settings_for
from gradsynth.unlearning.report import dump_json, mean_geometry

QUICK_LRS = "3e-4,1e-3"
QUICK_STEPS = 30


def run(args: argparse.Namespace) -> int:
    rules = parse_list(args.rules, str, "--rules")
    check_rules(rules, "--rules")
    if args.quick:
        args.world = "ci" if args.world == "default" else args.world
        args.lrs = QUICK_LRS if args.lrs == COMPARE_LRS else args.lrs
        args.steps = args.steps or (None if args.epochs else QUICK_STEPS)
    lrs = parse_list(args.lrs, float, "--lrs")
    check_positive_finite(lrs, "--lrs", args.lrs)
    seeds = parse_list(args.seeds, int, "--seeds")
    out = args.out or default_out("compare")
    check_output_folder(out, args.overwrite)
    device = resolve_device(args.device)
    start = time.perf_counter()
    runs = []
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds) * len(rules) * len(lrs), desc="compare", unit="run")
    try:
        for seed in seeds:
            task = load_task(args, seed, log=print if bar is None else bar.write)
            if args.max_length:
                task.max_length = args.max_length
            batches = evaluation_batches(task)
            task.model.to(device)
            before = evaluate(task.model, batches, task)
            plan = plan_from_args(args, task)
            bench_before = plan.run(task.model, task.tokenizer)
            if args.rank_by:  # refuse an unknown metric now, not after every run
                rank(
                    [{"rule": "", "lr": 0.0, "after": before, "benchmarks": {"after": bench_before}}],
                    args.rank_by,
                )
            for rule in rules:
                for lr in lrs:
                    settings = settings_for(args, rule, lr, seed, len(task.forget))
                    if bar is not None:
                        bar.set_postfix(seed=seed, rule=rule, lr=f"{lr:g}")
                    _, outcome = run_unlearning(
                        task,
                        settings,
                        device,
                        eval_batches=batches,
                        before=before,
                        plan=plan,
                        benchmarks_before=bench_before,
                    )
                    runs.append(
                        {
                            "seed": seed,
                            "rule": rule,
                            "lr": lr,
                            "targets": task.description.get("targets"),
                            "steps": settings.steps,
                            "seconds": round(outcome.seconds, 2),
                            "before": before,
                            "after": outcome.after,
                            "geometry": mean_geometry(outcome.records),
                            "benchmarks": outcome.benchmarks,
                        }
                    )
                    runs[-1]["utility_kept"] = utility_kept(runs[-1])
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    splits = list(task.splits)
    as_pct = all(before[s]["recall"] is not None for s in splits)
    table = aggregate(runs, splits)
    report = markdown_report(table, splits, as_pct, len(seeds), runs[0]["steps"])
    if args.rank_by:
        report += "\n" + ranking_markdown(runs, args.rank_by)
    settings = {
        **settings_for(args, rules[0], lrs[0], seeds[0], len(task.forget)).as_dict(),
        "device": device,
    }
    task_info = {k: v for k, v in task.description.items() if k not in ("targets", "neighbours")}
    settings.update(rule=None, lr=None, seed=None, rules=rules, lrs=lrs, seeds=seeds, task=task_info)
    with staged_output(out, args.overwrite) as staging:
        (staging / "results.md").write_text(report)
        payload = {"settings": settings, "before": before, "aggregate": table, "runs": runs}
        dump_json(staging / "results.json", payload)
        pareto_plot(staging / "pareto.png", table, splits, as_pct)
        tradeoff_plot(staging / "tradeoff.png", runs)
    print(report)
    print(
        f"{len(runs)} runs in {time.perf_counter() - start:.0f}s. "
        f"Wrote {out}/ (results.md, results.json, pareto.png, tradeoff.png)"
    )
    return 0
