"""One unlearning run on a `Task`: metrics before, the loop with a live progress bar, metrics after."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradsynth.cli.sources import Task
from gradsynth.unlearning.encoding import encode, make_batches, pad_id_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.generation import rouge_l_of
from gradsynth.unlearning.loop import StepRecord, UnlearnSettings, unlearn
from gradsynth.unlearning.reference import is_peft_model

EVAL_BATCH = 64


@dataclass
class RunOutcome:
    """Metrics per split before and after, the per-step records and the wall time of the loop."""

    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    records: list[StepRecord]
    seconds: float


def evaluation_batches(task: Task) -> dict[str, tuple[list[dict[str, Tensor]], bool]]:
    """Each split's batches and whether it has answers (so that recall means something)."""
    return {
        name: (
            make_batches(task.tokenizer, examples, EVAL_BATCH, task.max_length),
            all(e.answer is not None for e in examples),
        )
        for name, examples in task.splits.items()
    }


def evaluate(
    model: Any, batches: dict[str, tuple[list[dict[str, Tensor]], bool]], task: Task | None = None
) -> dict[str, dict[str, Any]]:
    """NLL and recall per split; with a task that asks for it, also ROUGE-L recall of greedy answers."""
    metrics = {name: split_metrics(model, b, answers) for name, (b, answers) in batches.items()}
    if task is not None and task.generate_eval:
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
) -> tuple[Any, RunOutcome]:
    """Unlearn on a copy of ``task.model`` (or on it, ``in_place``); returns the model and the outcome."""
    torch.manual_seed(settings.seed)
    model = task.model if in_place else copy.deepcopy(task.model)
    model.to(device)
    eval_batches = eval_batches if eval_batches is not None else evaluation_batches(task)
    before = before if before is not None else evaluate(model, eval_batches, task)
    reference = None
    if settings.losses.needs_reference and not is_peft_model(model):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    forget = [encode(task.tokenizer, e, task.max_length) for e in task.forget]
    retain = [encode(task.tokenizer, e, task.max_length) for e in task.retain]
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

    start = time.perf_counter()
    try:
        records = unlearn(model, forget, retain, pad_id_of(task.tokenizer), settings, reference, on_step)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return model, RunOutcome(before, evaluate(model, eval_batches, task), records, seconds)
