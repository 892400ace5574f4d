"""``gradsynth compare``: rules x forget objectives over a learning-rate grid (or to a forget target,
with a learning-rate ladder) and seeds, on the same model and data.

Writes ``results.md`` (the table with spread over seeds, the comparison at comparable
forgetting and the gradient-geometry table), ``results.json`` (every run and the aggregate),
``pareto.png`` (forget recall against each kept split) and ``tradeoff.png`` (forget score against
the share of the utility split's score kept, one curve per rule). ``--rank-by`` adds a ranking by
any evaluated metric, ``--eval-tasks`` scores every run on lm-eval tasks too. ``--quick`` uses
the CI-sized world (unless ``--model`` is given), two learning rates and 30 steps.

``--forget-loss ga,npo,simnpo,rmu`` runs the objective matrix (each objective with its paper
weights unless ``--alpha`` etc. are given). With ``--forget-target`` every run follows the
comparable-forgetting protocol of `gradsynth.unlearning.protocol`: each ``--lrs`` value is the
first rung of a ladder (default one ladder from 1e-3), and the table reports the steps and
learning rate each (objective, rule) needed.

A cell that diverges (a non-finite loss or weight) does not end the comparison: it is listed
under "Diverged runs" in results.md and ``diverged`` in results.json, left out of the tables,
and the other cells go on. Only when every cell diverges is the result an error (exit 2).

A signal (Ctrl-C, SIGTERM, SIGHUP) after at least one finished run still writes the output folder,
from the finished runs only, headed "Interrupted ... after N of M runs" (``interrupted`` in
results.json); the exit code stays the signal's (128 + its number). A comparison of a real model
costs hours, and those runs would otherwise be lost.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from gradsynth.cli.audit_command import audit_markdown, relearn_settings, world_audit
from gradsynth.cli.benchmark_plan import plan_from_args
from gradsynth.cli.compare_jobs import claimer, run_jobs
from gradsynth.cli.compare_paired import paired, paired_markdown
from gradsynth.cli.compare_ranking import rank, ranking_markdown, tradeoff_plot, utility_kept
from gradsynth.cli.compare_results import aggregate, markdown_report, pareto_plot, pct_splits
from gradsynth.cli.errors import CliError, RunDiverged
from gradsynth.cli.output_folder import check_output_folder, run_inputs, staged_output
from gradsynth.cli.parser import (
    COMPARE_LRS,
    DEFAULT_LR,
    LADDER_FACTOR,
    LADDER_RUNGS,
    check_objectives,
    check_positive_finite,
    check_protocol,
    check_rules,
    check_seeds,
    parse_list,
)
from gradsynth.cli.progress import phase
from gradsynth.cli.reference_target import REFERENCE, forget_target_for
from gradsynth.cli.run_one import evaluate, evaluation_batches, run_unlearning, split_sizes
from gradsynth.cli.signals import Interrupted
from gradsynth.cli.sources import load_task
from gradsynth.cli.unlearn_command import (
    check_rmu,
    default_out,
    ladder_for,
    protocol_summary,
    resolve_device,
    settings_for,
    weights_for,
)
from gradsynth.cli.user_audit import (
    audit_non_members,
    load_reference,
    read_non_members,
    task_audit,
)
from gradsynth.unlearning.report import dump_json, mean_geometry
from gradsynth.world.never_learned import load_never_learned_model

QUICK_LRS = "3e-4,1e-3"
QUICK_STEPS = 30


def _run_record(
    seed: int, objective: str, rule: str, start_lr: float, settings: Any, task: Any, outcome: Any
) -> dict[str, Any]:
    """One run of the comparison as results.json lists it."""
    protocol = protocol_summary(settings, outcome)
    record = {
        "seed": seed,
        "objective": objective,
        "rule": rule,
        "lr": start_lr,
        "lr_used": outcome.lr,
        "weights": {"alpha": settings.alpha, "gamma": settings.gamma, **settings.losses.__dict__},
        "targets": task.description.get("targets"),
        "forget_target": settings.forget_target,
        "step_cap": settings.steps,
        "steps": len(outcome.records),
        "reached": protocol.get("reached"),
        "rungs": protocol.get("rungs", []),
        "seconds": round(outcome.seconds, 2),
        "before": outcome.before,
        "after": outcome.after,
        "geometry": mean_geometry(outcome.records),
        "benchmarks": outcome.benchmarks,
    }
    record["utility_kept"] = utility_kept(record)
    return record


def interrupted_markdown(err: Interrupted, finished: int, planned: int) -> str:
    """results.md's first lines when a signal stopped the comparison: what the tables hold."""
    return (
        f"**Interrupted ({signal.Signals(err.signum).name}) after {finished} of {planned} runs**: the "
        "tables below hold the finished runs only (seeds the signal cut short have fewer rules); "
        "run the comparison again for the whole matrix.\n\n"
    )


def diverged_markdown(diverged: list[dict[str, Any]]) -> str:
    """results.md's list of the cells that diverged (not in any table)."""
    lines = ["## Diverged runs (left out of the tables)", ""]
    lines += [f"- forget loss {d['objective']}, {d['error']}" for d in diverged]
    return "\n".join(lines) + "\n"


def _prepare_seed(
    args: argparse.Namespace,
    seed: int,
    objectives: list[str],
    rules: list[str],
    lrs: list[float],
    device: str,
    non_members: Any,
    relearn: Any,
    user_reference: Any,
    targets: dict[int, float | None],
    bar: Any,
    log: Any,
) -> tuple[Any, ...]:
    """One seed's task, evaluation batches, scores before, lm-eval plan, audit reference and non-members
    (and its forget target, into ``targets``): what every cell of the seed shares."""
    task = load_task(args, seed, log=log)
    if args.max_length:
        task.max_length = args.max_length
    for objective in objectives:
        check_rmu(task, settings_for(args, rules[0], lrs[0], seed, len(task.forget), objective))
    batches = evaluation_batches(task, progress=bar is not None)
    if args.model is not None and user_reference is None:
        user_reference = load_reference(args, task.model, task.tokenizer, device)
    targets[seed] = forget_target_for(args, seed, batches["forget"][0], log=log, reference=user_reference)
    # The audit's reference: the user's, else the seed's never-learned model (loaded once).
    reference = user_reference
    if args.audit and args.model is None:
        reference, *_ = load_never_learned_model(args.world, seed, log=log)
        reference.to(device)
    seed_non_members = audit_non_members(args, non_members, task, relearn)
    task.model.to(device)
    with phase(f"evaluating {split_sizes(task)} before unlearning"):
        before = evaluate(task.model, batches, task, progress=bar is not None)
    plan = plan_from_args(args, task)
    bench_before = plan.run(task.model, task.tokenizer)
    if args.rank_by:  # refuse an unknown metric now, not after every run
        rank([{"rule": "", "lr": 0.0, "after": before, "benchmarks": {"after": bench_before}}], args.rank_by)
    return task, batches, before, plan, bench_before, reference, seed_non_members


def run(args: argparse.Namespace) -> int:
    rules = parse_list(args.rules, str, "--rules")
    check_rules(rules, "--rules")
    objectives = parse_list(args.forget_loss, str, "--forget-loss")
    check_objectives(objectives, "--forget-loss")
    check_protocol(args, objectives)
    if args.quick:
        args.world = "ci" if args.world == "default" else args.world
        args.lrs = args.lrs or (None if args.forget_target is not None else QUICK_LRS)
        args.steps = args.steps or (None if args.epochs else QUICK_STEPS)
    default_lrs = f"{DEFAULT_LR:g}" if args.forget_target is not None else COMPARE_LRS
    lrs_text = args.lrs or default_lrs
    lrs = parse_list(lrs_text, float, "--lrs")
    check_positive_finite(lrs, "--lrs", lrs_text)
    seeds = parse_list(args.seeds, int, "--seeds")
    check_seeds(seeds, "--seeds")
    out = args.out or default_out("compare")
    if args.queue is None:  # a --jobs worker writes into its parent's private folder
        check_output_folder(out, args.overwrite, run_inputs(args))
    total = len(seeds) * len(objectives) * len(rules) * len(lrs)
    relearn = relearn_settings(args) if args.audit else None  # its flags refused before any worker
    if args.jobs > 1 and args.queue is None:
        return run_jobs(args, out, total)
    device = resolve_device(args.device)
    non_members = read_non_members(args)  # a user's audit: read before the model, as the other files
    user_reference = None  # --reference-model: loaded with the first seed's task, checked against it
    start = time.perf_counter()
    runs = []
    targets: dict[int, float | None] = {}  # the forget target of each seed (per seed with "reference")
    diverged: list[dict[str, Any]] = []
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="compare", unit="run")
    interrupted: Interrupted | None = None
    claim = claimer(args.queue)
    log = print if bar is None else bar.write
    last: dict[str, Any] = {}  # the last seed prepared: its task and scores before (for the tables)
    cell = -1
    try:
        for seed in seeds:
            prepared: tuple[Any, ...] | None = None
            for objective in objectives:
                for rule in rules:
                    for lr in lrs:
                        cell += 1
                        if not claim(cell):  # another --jobs worker runs it
                            continue
                        if prepared is None:
                            prepared = _prepare_seed(
                                args,
                                seed,
                                objectives,
                                rules,
                                lrs,
                                device,
                                non_members,
                                relearn,
                                user_reference,
                                targets,
                                bar,
                                log,
                            )
                            task, batches, before, plan, bench_before, reference, seed_non_members = prepared
                            user_reference = reference if args.model is not None else user_reference
                            last = {"task": task, "before": before}
                        settings = settings_for(
                            args, rule, lr, seed, len(task.forget), objective, target=targets[seed]
                        )
                        if bar is not None:
                            bar.set_postfix(seed=seed, objective=objective, rule=rule, lr=f"{lr:g}")
                        try:
                            model, outcome = run_unlearning(
                                task,
                                settings,
                                device,
                                eval_batches=batches,
                                before=before,
                                plan=plan,
                                benchmarks_before=bench_before,
                                ladder=ladder_for(args, lr),
                                min_steps=args.min_steps or 1,
                                ladder_factor=args.ladder_factor or LADDER_FACTOR,
                            )
                        except RunDiverged as err:  # keep every finished cell; note this one
                            found = {
                                "seed": seed,
                                "objective": objective,
                                "rule": rule,
                                "lr": lr,
                                "cell": cell,
                            }
                            diverged.append({**found, "error": str(err)})
                            log(f"Diverged: forget loss {objective}, {err}")
                        else:
                            runs.append(_run_record(seed, objective, rule, lr, settings, task, outcome))
                            runs[-1]["cell"] = cell
                            if args.audit and seed_non_members is not None:
                                runs[-1]["audit"] = task_audit(
                                    model, task, seed_non_members, reference, relearn
                                )
                            elif args.audit:
                                runs[-1]["audit"] = world_audit(
                                    model,
                                    task.tokenizer,
                                    args.world,
                                    seed,
                                    reference=reference,
                                    relearn=relearn,
                                    recall=task.recall,
                                )
                            del model  # one unlearned copy at a time
                        if bar is not None:
                            bar.update(1)
    except KeyboardInterrupt as err:  # hours of finished runs are kept, the report says it is partial
        if not runs and args.queue is None:
            raise
        interrupted = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
    finally:
        if bar is not None:
            bar.close()
    if args.queue is not None:  # a --jobs worker: the parent renders every worker's cells at once
        return _worker_result(
            args, out, rules, objectives, lrs, seeds, targets, last, runs, diverged, interrupted
        )
    if not runs:
        cell = diverged[0]
        raise CliError(f"every run diverged (forget loss {cell['objective']}, {cell['error']}); lower --lrs")
    task, before = last["task"], last["before"]
    settings = _settings(args, rules, objectives, lrs, seeds, targets, task, device)
    return write_comparison(
        args, out, settings, list(task.splits), before, runs, diverged, interrupted, total, start
    )


def _settings(
    args: argparse.Namespace,
    rules: list[str],
    objectives: list[str],
    lrs: list[float],
    seeds: list[int],
    targets: dict[int, float | None],
    task: Any,
    device: str,
) -> dict[str, Any]:
    """results.json's ``settings``: the first cell's, the grid, the protocol and the task."""
    first = settings_for(
        args, rules[0], lrs[0], seeds[0], len(task.forget), objectives[0], targets.get(seeds[0])
    )
    protocol = None
    if args.forget_target is not None:
        protocol = {
            "forget_target": args.forget_target,
            "step_cap": first.steps,
            "ladder_factor": args.ladder_factor or LADDER_FACTOR,
            "ladder_rungs": args.ladder_rungs or LADDER_RUNGS,
        }
        if args.forget_target == REFERENCE:
            protocol["targets"] = {str(seed): target for seed, target in targets.items()}
            if args.model is not None:
                protocol["reference"] = f"--reference-model {args.reference_model}"
    settings = {**first.as_dict(), "device": device}
    task_info = {k: v for k, v in task.description.items() if k not in ("targets", "neighbours")}
    settings.update(
        rule=None,
        lr=None,
        seed=None,
        rules=rules,
        objectives=objectives,
        weights={o: weights_for(args, o).__dict__ for o in objectives},
        lrs=lrs,
        seeds=seeds,
        protocol=protocol,
        task=task_info,
    )
    return settings


def _worker_result(
    args: argparse.Namespace,
    out: Any,
    rules: list[str],
    objectives: list[str],
    lrs: list[float],
    seeds: list[int],
    targets: dict[int, float | None],
    last: dict[str, Any],
    runs: list[dict[str, Any]],
    diverged: list[dict[str, Any]],
    interrupted: Interrupted | None,
) -> int:
    """A ``--jobs`` worker's cells as ``worker.json`` in ``out`` (nothing when it claimed none)."""
    if last:
        task = last["task"]
        settings = _settings(args, rules, objectives, lrs, seeds, targets, task, resolve_device(args.device))
        payload = {
            "settings": settings,
            "splits": list(task.splits),
            "before": last["before"],
            "runs": runs,
            "diverged": diverged,
        }
        out.mkdir(parents=True, exist_ok=True)
        dump_json(out / "worker.json", payload)
    if interrupted is not None:
        raise Interrupted(interrupted.signum, written=out)
    return 0


def write_comparison(
    args: argparse.Namespace,
    out: Any,
    settings: dict[str, Any],
    splits: list[str],
    before: dict[str, Any],
    runs: list[dict[str, Any]],
    diverged: list[dict[str, Any]],
    interrupted: Interrupted | None,
    total: int,
    start: float,
) -> int:
    """Write results.md, results.json, pareto.png and tradeoff.png for ``runs`` and print the report."""
    as_pct = pct_splits(before, splits)
    table = aggregate(runs, splits)
    protocol = settings["protocol"]
    report = markdown_report(table, splits, as_pct, len(settings["seeds"]), settings["steps"], protocol)
    if interrupted is not None:
        report = interrupted_markdown(interrupted, len(runs) + len(diverged), total) + report
    if args.audit:
        report += "\n" + audit_markdown(runs)
    pairs = paired(runs, splits, as_pct)
    if pairs:
        report += "\n" + paired_markdown(pairs)
    if args.rank_by:
        report += "\n" + ranking_markdown(runs, args.rank_by)
    if diverged:
        report += "\n" + diverged_markdown(diverged)
    with staged_output(out, args.overwrite) as staging:
        (staging / "results.md").write_text(report)
        payload = {
            "settings": settings,
            "splits": splits,
            "before": before,
            "aggregate": table,
            "paired": pairs,
            "runs": runs,
            "diverged": diverged,
        }
        if interrupted is not None:
            payload["interrupted"] = {
                "signal": signal.Signals(interrupted.signum).name,
                "runs_finished": len(runs) + len(diverged),
                "runs_planned": total,
            }
        dump_json(staging / "results.json", payload)
        pareto_plot(staging / "pareto.png", table, splits, as_pct)
        tradeoff_plot(staging / "tradeoff.png", runs)
    print(report)
    if interrupted is not None:
        raise Interrupted(interrupted.signum, written=out)
    if diverged:
        print(
            f"{len(diverged)} of {len(runs) + len(diverged)} runs diverged (listed above, not in the tables)"
        )
    print(
        f"{len(runs)} runs in {time.perf_counter() - start:.0f}s. "
        f"Wrote {out}/ (results.md, results.json, pareto.png, tradeoff.png)"
    )
    return 0
