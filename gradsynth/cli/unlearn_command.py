"""``gradsynth unlearn``: one unlearning run; prints a before/after table and writes the output folder.

Output folder: the unlearned model and tokenizer (``save_pretrained``, safetensors),
``report.json`` (settings, metrics before/after, per-step losses and geometry) and
``curves.png`` (losses and cosines per step). A LoRA run (``--lora-rank``) saves the merged model,
or with ``--save-adapter`` the adapter alone (`gradsynth.cli.scale`); ``--save-every`` keeps a
checkpoint beside ``--out`` until the run is written (`gradsynth.cli.resume`); under ``torchrun``
rank 0 alone writes (`gradsynth.cli.launch`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gradsynth.cli.audit_command import audit_table, relearn_settings, world_audit
from gradsynth.cli.benchmark_plan import plan_from_args
from gradsynth.cli.errors import CliError
from gradsynth.cli.launch import (
    Launch,
    check_launch_flags,
    is_writer,
    join,
    leave,
    sharding_of,
    zero_config_of,
)
from gradsynth.cli.output_folder import check_output_folder, run_inputs, staged_output
from gradsynth.cli.parser import (
    DEFAULT_STEPS,
    LADDER_FACTOR,
    LADDER_RUNGS,
    check_objectives,
    check_protocol,
    check_rules,
)
from gradsynth.cli.progress import phase
from gradsynth.cli.reference_target import REFERENCE, forget_target_for
from gradsynth.cli.resume import run_checkpoints
from gradsynth.cli.run_one import RunOutcome, run_unlearning, split_batches
from gradsynth.cli.scale import (
    check_scale_flags,
    enable_gradient_checkpointing,
    lora_settings,
    saved_model,
    with_lora,
)
from gradsynth.cli.sources import load_task
from gradsynth.cli.tables import before_after_table, benchmark_table, num
from gradsynth.cli.user_audit import (
    audit_non_members,
    load_reference,
    non_members_name,
    read_non_members,
    task_audit,
)
from gradsynth.unlearning.loop import UnlearnSettings, rmu_for, steps_for_epochs
from gradsynth.unlearning.paper_weights import PAPER_WEIGHTS, ObjectiveWeights
from gradsynth.unlearning.protocol import ladder, reached
from gradsynth.unlearning.report import general_kept, mean_geometry, plot_curves, write_report
from gradsynth.unlearning.sharding import full_state_dict, is_sharded
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


def weights_for(args: argparse.Namespace, objective: str) -> ObjectiveWeights:
    """The flags given, else the objective's weights in the paper's configs."""
    paper = PAPER_WEIGHTS[objective]
    return ObjectiveWeights(
        **{
            key: getattr(paper, key) if getattr(args, key) is None else getattr(args, key)
            for key in ("alpha", "gamma", "beta", "delta")
        }
    )


def loss_settings(args: argparse.Namespace, objective: str) -> LossSettings:
    weights = weights_for(args, objective)
    return LossSettings(
        forget=objective,
        retain=args.retain_loss,
        beta=weights.beta,
        delta=weights.delta,
        rmu_layer=args.rmu_layer,
        rmu_steering=args.rmu_steering,
    )


def settings_for(
    args: argparse.Namespace,
    rule: str,
    lr: float,
    seed: int,
    n_forget: int,
    objective: str | None = None,
    target: float | None = None,
) -> UnlearnSettings:
    """The settings of one run; ``target`` is the run's forget target when ``--forget-target`` is
    ``reference`` (`gradsynth.cli.reference_target`), else ``--forget-target`` itself."""
    objective = objective or args.forget_loss
    steps = args.steps or DEFAULT_STEPS
    if args.epochs is not None:
        steps = steps_for_epochs(args.epochs, n_forget, args.batch_size, args.grad_accum)
    weights = weights_for(args, objective)
    return UnlearnSettings(
        rule=rule,
        alpha=weights.alpha,
        gamma=weights.gamma,
        lr=lr,
        steps=steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=seed,
        losses=loss_settings(args, objective),
        forget_target=target if args.forget_target == REFERENCE else args.forget_target,
    )


def ladder_for(args: argparse.Namespace, start: float) -> list[float]:
    """The learning rates a run climbs to reach ``--forget-target`` (just ``start`` without one)."""
    if args.forget_target is None:
        return [start]
    return ladder(start, args.ladder_factor or LADDER_FACTOR, args.ladder_rungs or LADDER_RUNGS)


def protocol_summary(settings: UnlearnSettings, outcome: RunOutcome) -> dict[str, Any]:
    """What the comparable-forgetting protocol did in a run (``{}`` without a forget target)."""
    if settings.forget_target is None:
        return {}
    return {
        "forget_target": settings.forget_target,
        "step_cap": settings.steps,
        "reached": reached(outcome.records, settings.forget_target),
        "steps_taken": len(outcome.records),
        "lr_used": outcome.lr,
        "rungs": [r.as_dict() for r in outcome.rungs],
    }


def protocol_line(protocol: dict[str, Any], rates: list[float]) -> str:
    """``Forget target 10% reached at step 12 with lr 0.002`` (or not reached, and where it was tried)."""
    head = f"Forget target {100 * protocol['forget_target']:g}%"
    if protocol["reached"]:
        line = f"{head} reached at step {protocol['steps_taken']} with lr {protocol['lr_used']:g}"
        faster = [r for r in protocol["rungs"] if r["lr"] < rates[0]]
        if faster:  # the ladder descended: say from where
            first = protocol["rungs"][0]
            line += f" (descended from lr {first['lr']:g}, which reached it at step {first['steps']})"
        return line
    tried = ", ".join(f"{r:g}" for r in rates)
    return f"{head} not reached within {protocol['step_cap']} steps at any of lr {tried}"


def check_rmu(task: Any, settings: UnlearnSettings) -> None:
    """Refuse an RMU layer the model does not have, or a model RMU cannot tap, before any work."""
    if settings.losses.forget != "rmu":
        return
    try:
        rmu_for(task.model, settings)
    except ValueError as err:
        raise CliError(f"--forget-loss rmu: {err}") from err


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
    check_objectives([args.forget_loss], "--forget-loss")
    check_protocol(args, [args.forget_loss])
    check_scale_flags(args)
    check_launch_flags(args)
    out = args.out or default_out("unlearn")
    relearn = relearn_settings(args)
    writer = is_writer()  # under torchrun, rank 0 alone writes (and prints)
    if writer:
        check_output_folder(out, args.overwrite, run_inputs(args))
    checkpoints = run_checkpoints(args, Path(os.path.abspath(out)))
    device = resolve_device(args.device)
    launch = join(device)
    if launch is not None and sharding_of(args) == "deepspeed" and launch.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick a GPU it can see
    try:
        with contextlib.nullcontext() if writer else contextlib.redirect_stdout(io.StringIO()):
            return _unlearn(args, out, relearn, checkpoints, launch.device if launch else device, launch)
    finally:
        leave(launch)


@contextlib.contextmanager
def _no_output() -> Iterator[None]:
    yield None  # a rank other than 0 writes nothing


def _unlearn(
    args: argparse.Namespace,
    out: Path,
    relearn: Any,
    checkpoints: Any,
    device: str,
    launch: Launch | None,
) -> int:
    non_members = read_non_members(args)  # a user's audit: read before the model, as the other files
    task = load_task(args, args.seed)
    if args.max_length:
        task.max_length = args.max_length
    reference = load_reference(args, task.model, task.tokenizer, device)
    non_members = audit_non_members(args, non_members, task, relearn)
    task.model = with_lora(task.model, args, args.seed)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(task.model)
    target = forget_target_for(args, args.seed, split_batches(task, "forget")[0], reference=reference)
    if args.forget_target == REFERENCE:
        whose = "--reference-model's" if reference is not None else "the never-learned world model's"
        print(f"Forget target: {100 * target:.1f}%, {whose} recall of the forget set")
    settings = settings_for(args, args.rule, args.lr, args.seed, len(task.forget), target=target)
    check_rmu(task, settings)
    plan = plan_from_args(args, task)
    rates = ladder_for(args, args.lr)
    length = f"{settings.steps} steps"
    if settings.forget_target is not None:
        length = (
            f"until forget recall <= {100 * settings.forget_target:g}% (cap {settings.steps} steps, "
            f"learning rates {', '.join(f'{r:g}' for r in rates)} in turn)"
        )
    print(
        f"Unlearning {len(task.forget)} forget examples, retaining {len(task.retain)} "
        f"({task.description['source']}); rule {settings.rule}, forget loss {settings.losses.forget}, "
        f"retain loss {settings.losses.retain}, lr {settings.lr:g}, {length}, device {device}"
    )
    zero = zero_config_of(args) if launch is not None and sharding_of(args) == "deepspeed" else None
    with (
        staged_output(out, args.overwrite) if launch is None or launch.rank == 0 else _no_output() as staging
    ):
        model, outcome = run_unlearning(
            task,
            settings,
            device,
            in_place=True,
            progress=not args.no_progress,
            plan=plan,
            ladder=rates,
            min_steps=args.min_steps or 1,
            ladder_factor=args.ladder_factor or LADDER_FACTOR,
            checkpoints=checkpoints,
            shard=(launch.rank, launch.world) if launch is not None else None,
            sharding=sharding_of(args),
            zero=zero,
        )
        protocol = protocol_summary(settings, outcome)
        if protocol:
            print(f"\n{protocol_line(protocol, rates)}")
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
        # FSDP2 and ZeRO-3 leave the model sharded: every rank takes part in gathering it, rank 0 keeps it.
        whole = full_state_dict(model) if is_sharded(model) else None
        if staging is None:
            return 0
        model = saved_model(model, staging, args.save_adapter)  # a LoRA model merged
        audit = None
        if args.audit:
            with phase("auditing the forgetting"):
                if non_members is None:
                    audit = world_audit(
                        model, task.tokenizer, args.world, args.seed, relearn=relearn, recall=task.recall
                    )
                else:
                    audit = task_audit(model, task, non_members, reference, relearn)
            against = non_members_name(args) if non_members is not None else "fresh-name twins"
            print(f"\nAudit of the forgetting (forget facts against {against}):\n")
            print(audit_table(audit))
        with phase(f"saving the {'adapter' if args.save_adapter else 'model'} to {out}"):
            if not args.save_adapter:
                model.save_pretrained(staging, safe_serialization=True, state_dict=whole)
            task.tokenizer.save_pretrained(staging)
        report_settings = {
            "command": "unlearn",
            **settings.as_dict(),
            "lr": outcome.lr,
            "device": device,
            "task": task.description,
            "protocol": protocol,
            "lora": lora_settings(args),
            "gradient_checkpointing": args.gradient_checkpointing,
            "processes": launch.world if launch is not None else 1,
            "sharding": sharding_of(args) if launch is not None else None,
            "zero_optimization": zero,
        }
        write_report(
            staging / "report.json",
            report_settings,
            outcome.before,
            outcome.after,
            outcome.records,
            outcome.benchmarks,
            outcome.curve,
            audit,
        )
        plot_curves(
            staging / "curves.png", outcome.records, f"{settings.rule}, lr {outcome.lr:g}", outcome.curve
        )
    if checkpoints is not None:
        checkpoints.finish()
    saved = "LoRA adapter" if args.save_adapter else "model"
    print(f"Wrote {out}/ ({saved}, report.json, curves.png)")
    return 0
