"""Benchmark scores through lm-evaluation-harness (``lm-eval``), on a model already in memory.

`evaluate_tasks` wraps the model and tokenizer in lm-eval's ``HFLM`` (no save, no reload) and
runs ``simple_evaluate`` on any task lm-eval knows (``wmdp_bio``, ``wmdp_cyber``, ``mmlu``, ...)
or on task YAMLs in ``include_path``. Needs the ``eval`` extra (``pip install 'gradsynth[eval]'``);
without it `EvalExtraMissing` says so in one line. Hub tasks download their data on first use;
tasks reading local files (``dataset_path: json``) run offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsynth.unlearning.quiet import quiet_loggers

INSTALL_HINT = "pip install 'gradsynth[eval]'"


class EvalExtraMissing(ImportError):
    """lm-eval is not installed; the message names the extra that installs it."""


class UnknownTask(ValueError):
    """A task name lm-eval does not know, with the way to find the right one."""


class EvalFailed(RuntimeError):
    """lm-eval raised while building or running the tasks (a bad task YAML, a missing data file,
    ...): its first line, with the tasks it was running."""


def _failed(tasks: Sequence[str], err: Exception) -> EvalFailed:
    reason = (str(err).strip().splitlines() or [""])[0][:200] or type(err).__name__
    return EvalFailed(
        f"lm-eval failed on {', '.join(tasks)} ({type(err).__name__}: {reason}); check the task "
        "files and their data"
    )


def require_lm_eval() -> None:
    """Raise `EvalExtraMissing` (one line, naming the extra) when lm-eval, or what its HF model
    imports (accelerate, ...), cannot be imported."""
    try:
        import lm_eval.models.huggingface  # noqa: F401  (lm-eval, and accelerate, imported at its top)
    except ImportError as err:
        raise EvalExtraMissing(
            f"benchmark evaluation needs the 'eval' extra ({err.name} is missing): {INSTALL_HINT}"
        ) from err


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5}`` per task."""
    flat: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if (
                "_stderr" in metric
                or metric == "sample_len"
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            metrics[metric if filter_name in ("none", "") else f"{metric},{filter_name}"] = float(value)
        flat[task] = metrics
    return flat


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    chat_template: bool = False,
) -> dict[str, dict[str, float]]:
    """Scores of ``model`` on lm-eval ``tasks``: ``{task: {metric: value}}``, e.g. ``{"mmlu": {"acc": 0.4}}``.

    ``include_path``: folder(s) of extra task YAMLs. ``limit``: at most this many documents per
    task (a fraction if < 1). Group tasks (``mmlu``) report their aggregate and each subtask.
    Standard errors are not computed (``bootstrap_iters=0``): they cost more than the scores.
    ``num_fewshot``: examples put before each question (the task's own default if None).
    ``chat_template``: format each request with the tokenizer's chat template (few-shot examples
    as earlier turns of the conversation), as lm-eval's ``--apply_chat_template`` does.
    The model's train/eval mode is restored afterwards.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given; name at least one lm-eval task (e.g. 'mmlu')")
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    # Indexing lm-eval's own thousands of task files takes most of a minute on a small CPU:
    # skip it when the include path has every task asked for.
    manager = None
    try:
        with quiet_loggers():
            if paths:
                manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
            if manager is None or any(t not in manager.all_tasks for t in tasks):
                manager = TaskManager(include_path=[str(p) for p in paths] or None)
    except Exception as err:  # lm-eval raises anything from a task folder it cannot index
        raise _failed(tasks, err) from err
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UnknownTask(
            f"lm-eval has no task {unknown[0]!r}; list the names with `lm_eval ls tasks`, "
            "or give the folder of your own task YAML with include_path / --include-path"
        )
    import logging

    import datasets

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO lines would bury the results
    datasets.disable_progress_bars()
    was_training = model.training
    model.eval()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with quiet_loggers():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                apply_chat_template=chat_template,
                fewshot_as_multiturn=chat_template and bool(num_fewshot),
                bootstrap_iters=0,
                log_samples=False,
            )
    except Exception as err:  # a task's YAML, data or metric failed inside lm-eval: one line
        raise _failed(tasks, err) from err
    finally:
        model.train(was_training)
    return _flatten(output["results"])


def utility_kept(before: float | None, after: float | None) -> float | None:
    """The share of the original score kept: ``after / before`` (``None`` if undefined)."""
    if before is None or after is None or before == 0:
        return None
    return after / before
