"""One unlearning run on a `Task`: metrics before, the loop with a live progress bar, metrics after."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradsynth.cli.benchmark_plan import BenchmarkPlan
from gradsynth.cli.errors import CliError
from gradsynth.cli.sources import Task
from gradsynth.unlearning.encoding import IGNORE_INDEX, encode, make_batches, pad_id_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.generation import rouge_l_of
from gradsynth.unlearning.loop import Diverged, StepRecord, UnlearnSettings, unlearn
from gradsynth.unlearning.multiple_choice import mc_accuracy
from gradsynth.unlearning.reference import is_peft_model

EVAL_BATCH = 64


@dataclass
class RunOutcome:
    """Metrics per split before and after, the per-step records and the wall time of the loop."""

    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    records: list[StepRecord]
    seconds: float
    benchmarks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # before/after
    curve: list[dict[str, Any]] = field(default_factory=list)  # every split's metrics over steps


def evaluation_batches(task: Task) -> dict[str, tuple[list[dict[str, Tensor]], bool]]:
    """Each split's batches and whether it has answers (so that recall means something)."""
    return {
        name: (
            make_batches(task.tokenizer, examples, EVAL_BATCH, task.max_length),
            all(e.answer is not None for e in examples),
        )
        for name, examples in task.splits.items()
    }


def check_learnable(encoded: list[tuple[list[int], list[int]]], name: str, max_length: int) -> None:
    """Refuse examples cut so short that no token is left to learn (the first one is never predicted)."""
    empty = sum(1 for _, labels in encoded if all(label == IGNORE_INDEX for label in labels[1:]))
    if empty:
        raise CliError(
            f"--max-length {max_length}: {empty} of {len(encoded)} {name} examples keep no token to learn "
            "from; raise --max-length"
        )


def evaluate(
    model: Any,
    batches: dict[str, tuple[list[dict[str, Tensor]], bool]],
    task: Task | None = None,
    generate: bool = True,
) -> dict[str, dict[str, Any]]:
    """NLL and recall per split; the multiple-choice accuracy of splits that have questions; with a
    task that asks for it (and ``generate``), also ROUGE-L recall of greedy answers."""
    metrics = {name: split_metrics(model, b, answers) for name, (b, answers) in batches.items()}
    for name, choices in (task.choices if task is not None else {}).items():
        metrics[name]["mc_acc"] = mc_accuracy(model, task.tokenizer, choices)
    if task is not None and task.generate_eval and generate:
        for name, examples in task.splits.items():
            if batches[name][1]:
                metrics[name]["rougeL_recall"] = rouge_l_of(model, task.tokenizer, examples)
    return metrics


def run_unlearning(
    task: Task,
    settings: UnlearnSettings,
    device: str,
    *,
    in_place: bool = False,
    progress: bool = False,
    eval_batches: dict | None = None,
    before: dict | None = None,
    plan: BenchmarkPlan | None = None,
    benchmarks_before: dict | None = None,
) -> tuple[Any, RunOutcome]:
    """Unlearn on a copy of ``task.model`` (or on it, ``in_place``); returns the model and the outcome.

    With a ``plan``, its lm-eval tasks are run before and after, and with ``plan.every`` the
    split metrics (and tasks) every that many steps, on the model in memory."""
    plan = plan or BenchmarkPlan()
    torch.manual_seed(settings.seed)
    model = task.model if in_place else copy.deepcopy(task.model)
    model.to(device)
    eval_batches = eval_batches if eval_batches is not None else evaluation_batches(task)
    before = before if before is not None else evaluate(model, eval_batches, task)
    if plan.tasks:
        benchmarks = {
            "before": benchmarks_before if benchmarks_before is not None else plan.run(model, task.tokenizer)
        }
    else:
        benchmarks = {}
    curve = [{"step": 0, "splits": before, "benchmarks": benchmarks.get("before", {})}] if plan.every else []
    reference = None
    if settings.losses.needs_reference and not is_peft_model(model):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    forget = [encode(task.tokenizer, e, task.max_length) for e in task.forget]
    retain = [encode(task.tokenizer, e, task.max_length) for e in task.retain]
    check_learnable(forget, "forget", task.max_length)
    check_learnable(retain, "retain", task.max_length)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, desc=f"unlearning ({settings.rule})", file=sys.stderr, leave=True)

    def on_step(record: StepRecord) -> None:
        if bar is not None:
            bar.set_postfix(
                forget=f"{record.forget_loss:.3f}", retain=f"{record.retain_loss:.3f}", refresh=False
            )
            bar.update(1)
        if plan.every and record.step % plan.every == 0 and record.step < settings.steps:
            splits = evaluate(model, eval_batches, task, generate=False)
            curve.append(
                {"step": record.step, "splits": splits, "benchmarks": plan.run(model, task.tokenizer)}
            )

    start = time.perf_counter()
    try:
        records = unlearn(model, forget, retain, pad_id_of(task.tokenizer), settings, reference, on_step)
    except Diverged as err:
        raise CliError(f"rule {settings.rule}, lr {settings.lr:g}, seed {settings.seed}: {err}") from err
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    after = evaluate(model, eval_batches, task)
    if plan.tasks:
        benchmarks["after"] = plan.run(model, task.tokenizer)
    if plan.every:
        curve.append({"step": settings.steps, "splits": after, "benchmarks": benchmarks.get("after", {})})
    return model, RunOutcome(before, after, records, seconds, benchmarks, curve)
