"""One unlearning run on a `Task`: metrics before, the loop with a live progress bar, metrics after.

Each example is encoded once per task (`encodings`: the evaluation splits and the training sets
share it, and every cell of a comparison reuses it), and the long phases (encoding or scoring
`LONG_PHASE` examples or more) show a progress bar of their own when progress is on.
"""

from __future__ import annotations

import copy
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gradsynth.cli.benchmark_plan import BenchmarkPlan
from gradsynth.cli.errors import CliError, RunDiverged
from gradsynth.cli.memory import check_batch_fits, vocabulary_of
from gradsynth.cli.progress import StepLines, phase
from gradsynth.cli.resume import RunCheckpoints
from gradsynth.cli.sources import Task
from gradsynth.unlearning.answers import answer_scores
from gradsynth.unlearning.checkpoint import Checkpointing, CheckpointMismatch
from gradsynth.unlearning.encoding import IGNORE_INDEX, collate, encode_many, pad_id_of
from gradsynth.unlearning.loop import Diverged, StepRecord, UnlearnSettings, unlearn
from gradsynth.unlearning.protocol import Rung, climb
from gradsynth.unlearning.reference import is_peft_model
from gradsynth.unlearning.split_scores import score_splits

EVAL_BATCH = 64
LONG_PHASE = 5000  # examples: a phase this long gets a progress bar (300k rows were silent 15 min)
# Per tokenizer and max length, each (prompt, answer) encoded once (see `encodings`).
_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class RunOutcome:
    """Metrics per split before and after, the per-step records and the wall time of the loop."""

    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    records: list[StepRecord]
    seconds: float
    benchmarks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # before/after
    curve: list[dict[str, Any]] = field(default_factory=list)  # every split's metrics over steps
    lr: float = 0.0  # the learning rate of the run the outcome is from (the last rung climbed)
    rungs: list[Rung] = field(default_factory=list)  # the ladder climbed (with a forget target)


def _bar(total: int, desc: str, progress: bool) -> Any:
    """A transient progress bar on stderr for a phase of ``total`` examples, or None if short/off."""
    if not progress or total < LONG_PHASE:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="ex", mininterval=1.0)


def encodings(task: Task, examples: list, what: str, progress: bool = False) -> list:
    """`encode_many` of ``examples`` with the task's tokenizer and max length, shared across calls."""
    memo = _MEMOS.setdefault(task.tokenizer, {}).setdefault(task.max_length, {})
    bar = _bar(len(examples), f"encoding {what}", progress)
    try:
        return encode_many(
            task.tokenizer, examples, task.max_length, memo, None if bar is None else bar.update
        )
    finally:
        if bar is not None:
            bar.close()


def split_batches(task: Task, name: str, progress: bool = False) -> tuple[list[dict[str, Tensor]], bool]:
    """One split's evaluation batches and whether it has answers (so that recall means something)."""
    examples = task.splits[name]
    encoded = encodings(task, examples, f"the {name} split", progress)
    pad = pad_id_of(task.tokenizer)
    return (
        [collate(encoded[i : i + EVAL_BATCH], pad) for i in range(0, len(encoded), EVAL_BATCH)],
        all(e.answer is not None for e in examples),
    )


def evaluation_batches(task: Task, progress: bool = False) -> dict[str, tuple[list[dict[str, Tensor]], bool]]:
    """Each split's batches and whether it has answers (so that recall means something)."""
    return {name: split_batches(task, name, progress) for name in task.splits}


def _counted(name: str, batches: list, progress: bool) -> Any:
    """One split's batches; when the split is long, counted on a progress bar as they are scored."""
    bar = _bar(sum(int(b["labels"].shape[0]) for b in batches), f"scoring {name}", progress)
    return batches if bar is None else _counting(batches, bar)


def _counting(batches: list, bar: Any) -> Any:
    try:
        for batch in batches:
            yield batch
            bar.update(int(batch["labels"].shape[0]))
    finally:
        bar.close()


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
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """NLL and recall per split; the multiple-choice accuracy of splits that have questions; with a
    task that asks for it (and ``generate``), also ROUGE-L recall of greedy answers. A task whose
    recall is ``contains`` scores recall and ROUGE-L on greedy answers always (`answer_scores`)."""
    shown = {name: (_counted(name, b, progress), answers) for name, (b, answers) in batches.items()}
    if task is None:
        return score_splits(model, None, shown)
    answered = {name: examples for name, examples in task.splits.items() if batches[name][1]}
    if task.recall == "contains":
        return score_splits(
            model, task.tokenizer, shown, task.choices, max_length=task.max_length, contained=answered
        )
    rouge = answered if task.generate_eval and generate else {}
    return score_splits(model, task.tokenizer, shown, task.choices, rouge, max_length=task.max_length)


def run_unlearning(
    task: Task,
    settings: UnlearnSettings,
    device: str,
    *,
    in_place: bool = False,
    progress: bool = False,  # the bar; the phase lines on stderr are written either way
    eval_batches: dict | None = None,
    before: dict | None = None,
    plan: BenchmarkPlan | None = None,
    benchmarks_before: dict | None = None,
    ladder: list[float] | None = None,
    min_steps: int = 1,
    ladder_factor: float = 2.0,
    checkpoints: RunCheckpoints | None = None,
    shard: tuple[int, int] | None = None,
    sharding: str = "ddp",
    zero: dict[str, Any] | None = None,
) -> tuple[Any, RunOutcome]:
    """Unlearn on a copy of ``task.model`` (or on it, ``in_place``); returns the model and the outcome.

    With a ``plan``, its lm-eval tasks are run before and after, and with ``plan.every`` the
    split metrics (and tasks) every that many steps, on the model in memory. With
    ``settings.forget_target``, the learning rates of ``ladder`` (default ``[settings.lr]``) are
    climbed as `gradsynth.unlearning.protocol.climb` says, each rung from the original model; with
    ``min_steps`` > 1 a first rung that reaches the target sooner descends by ``ladder_factor`` (at
    most as many times as the ladder has rates). With ``checkpoints`` (`gradsynth.cli.resume`), each
    rung's loop saves checkpoints, and a resumed run skips the rungs finished before the stop.
    ``shard=(rank, world)``: this process's slice of a data-parallel run (`gradsynth.cli.launch`),
    under ``sharding`` ``ddp``, ``fsdp2`` or ``deepspeed`` (``zero``: DeepSpeed's ``zero_optimization``
    section); after FSDP2 or ZeRO-3 the returned model is sharded: every rank must run what runs it, and
    `gradsynth.unlearning.sharding.full_state_dict` gathers it."""
    plan = plan or BenchmarkPlan()
    target = settings.forget_target
    if target is not None and any(e.answer is None for e in task.forget):
        raise CliError(
            "--forget-target needs question/answer forget data (recall is measured on the answers); "
            "this forget set is plain text"
        )
    check_batch_fits(settings.batch_size, task.max_length, vocabulary_of(task.model), device)
    eval_batches = eval_batches if eval_batches is not None else evaluation_batches(task, progress)
    if before is None:
        task.model.to(device)
        with phase(f"evaluating {split_sizes(task)} before unlearning"):
            before = evaluate(task.model, eval_batches, task, progress=progress)
    if target is not None and before["forget"]["recall"] <= target:
        raise CliError(
            f"--forget-target {target:g}: the forget set's recall is already "
            f"{100 * before['forget']['recall']:.1f}% before unlearning ({task.recall} recall of "
            f"{len(task.splits['forget'])} answers), at or below the target: nothing to forget; check "
            "that the model knows these facts in this prompt format (--prompt-format, --recall) or "
            "lower --forget-target"
        )
    benchmarks = {}
    if plan.tasks:
        task.model.to(device)
        benchmarks["before"] = (
            benchmarks_before if benchmarks_before is not None else plan.run(task.model, task.tokenizer)
        )
    forget = encodings(task, task.forget, "the forget set", progress)
    retain = encodings(task, task.retain, "the retain set", progress)
    check_learnable(forget, "forget", task.max_length)
    check_learnable(retain, "retain", task.max_length)
    lrs = ladder if (ladder and target is not None) else [settings.lr]
    # Per rung (no model): its learning rate, records, curve and loop time.
    runs: list[tuple[float, list[StepRecord], list[dict[str, Any]], float]] = []
    descends = target is not None and min_steps > 1

    def finished() -> list[dict[str, Any]]:  # the rungs done, as a checkpoint keeps them
        return [
            {"lr": r[0], "records": [asdict(x) for x in r[1]], "curve": r[2], "seconds": r[3]} for r in runs
        ]

    def rung(lr: float) -> tuple[Any, list[StepRecord]]:
        index = len(runs)
        resumed = checkpoints.resumed if checkpoints is not None else None
        if resumed is not None and index < resumed.rung:  # finished before the stop: not reached
            done = resumed.finished[index]
            records = [StepRecord(**r) for r in done["records"]]
            runs.append((lr, records, done["curve"], done["seconds"]))
            return None, records
        # Every rung starts from the original model; only a single plain run may use it in place.
        model = task.model if in_place and len(lrs) == 1 and not descends else copy.deepcopy(task.model)
        curve = (
            [{"step": 0, "splits": before, "benchmarks": benchmarks.get("before", {})}] if plan.every else []
        )
        saving = checkpoints.for_rung(index, finished, curve) if checkpoints is not None else None
        start = time.perf_counter()
        records = _loop(
            task,
            model,
            replace(settings, lr=lr),
            device,
            forget,
            retain,
            eval_batches,
            plan,
            curve,
            progress,
            saving,
            shard,
            sharding,
            zero,
        )
        runs.append((lr, records, curve, time.perf_counter() - start))
        return model, records

    if target is None:
        model, records = rung(lrs[0])
        rungs: list[Rung] = []
    else:
        model, records, rungs = climb(
            rung, lrs, target, min_steps=min_steps, factor=ladder_factor, descents=len(lrs) if descends else 0
        )
    seconds = sum(r[3] for r in runs)
    # The result's run: after a descent that no longer forgot, it is not the last one.
    lr, _, curve, _ = next(run for run in runs if run[1] is records)
    with phase(f"evaluating {split_sizes(task)} after unlearning"):
        after = evaluate(model, eval_batches, task, progress=progress)
    if plan.tasks:
        benchmarks["after"] = plan.run(model, task.tokenizer)
    if plan.every:
        curve.append({"step": len(records), "splits": after, "benchmarks": benchmarks.get("after", {})})
    return model, RunOutcome(before, after, records, seconds, benchmarks, curve, lr, rungs)


def split_sizes(task: Task) -> str:
    """``forget (4), retain (4)``: the splits evaluated, for the progress lines."""
    return ", ".join(f"{name} ({len(examples)})" for name, examples in task.splits.items())


def _loop(
    task: Task,
    model: Any,
    settings: UnlearnSettings,
    device: str,
    forget: list,
    retain: list,
    eval_batches: dict,
    plan: BenchmarkPlan,
    curve: list[dict[str, Any]],
    progress: bool,
    checkpoint: Checkpointing | None = None,
    shard: tuple[int, int] | None = None,
    sharding: str = "ddp",
    zero: dict[str, Any] | None = None,
) -> list[StepRecord]:
    """One run of the loop on ``model`` with a progress bar and the evaluation curve."""
    torch.manual_seed(settings.seed)
    model.to(device)
    reference = None
    if settings.losses.needs_reference and not is_peft_model(model):
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    bar = None
    label = f"{settings.rule}, lr {settings.lr:g}, seed {settings.seed}:"
    lines = None if progress else StepLines(settings.steps, label)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=settings.steps,
            desc=f"unlearning ({settings.rule}, lr {settings.lr:g})",
            file=sys.stderr,
            leave=True,
        )

    def on_step(record: StepRecord) -> None:
        if bar is not None:
            extra = {} if record.forget_recall is None else {"recall": f"{record.forget_recall:.2f}"}
            bar.set_postfix(
                forget=f"{record.forget_loss:.3f}", retain=f"{record.retain_loss:.3f}", **extra, refresh=False
            )
            bar.update(1)
        if lines is not None:
            recall = (
                "" if record.forget_recall is None else f", forget recall {100 * record.forget_recall:.1f}%"
            )
            reached = record.forget_recall is not None and record.forget_recall <= (
                settings.forget_target or 0
            )
            lines.step(
                record.step,
                f"forget loss {record.forget_loss:.3f}, retain loss {record.retain_loss:.3f}{recall}",
                last=reached,
            )
        if plan.every and record.step % plan.every == 0 and record.step < settings.steps:
            splits = evaluate(model, eval_batches, task, generate=False)
            curve.append(
                {"step": record.step, "splits": splits, "benchmarks": plan.run(model, task.tokenizer)}
            )

    try:
        # The target is checked on the evaluation's answer-only forget batches: the training
        # encoding may label every token (--loss-scope full).
        recall_batches = eval_batches["forget"][0] if "forget" in eval_batches else None
        recall_of = None
        if task.recall == "contains" and "forget" in task.splits:
            forget_split = task.splits["forget"]

            def recall_of(m: Any) -> float:
                return answer_scores(m, task.tokenizer, forget_split, task.max_length)["recall"] or 0.0

        return unlearn(
            model,
            forget,
            retain,
            pad_id_of(task.tokenizer),
            settings,
            reference,
            on_step,
            recall_batches=recall_batches,
            recall_of=recall_of,
            checkpoint=checkpoint,
            shard=shard,
            sharding=sharding,
            zero=zero,
        )
    except CheckpointMismatch as err:
        raise CliError(f"--resume: {err}; give the interrupted run's model and settings") from err
    except Diverged as err:
        raise RunDiverged(f"rule {settings.rule}, lr {settings.lr:g}, seed {settings.seed}: {err}") from err
    finally:
        if bar is not None:
            bar.close()
