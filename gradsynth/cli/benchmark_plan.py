"""What the command line evaluates besides the split metrics: lm-eval tasks, and how often.

``--eval-tasks`` takes any lm-eval task name, plus ``world_<split>`` (``world_forget``, ...):
the embedded world's multiple-choice questions, written as lm-eval task files (YAML + JSONL)
into a temporary folder at run time from the splits of this run, so they follow the world
whatever its splits are. ``--include-path`` adds folders of the user's own task YAMLs.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradsynth.cli.errors import CliError
from gradsynth.cli.parser import parse_list

WORLD_PREFIX = "world_"


@dataclass
class BenchmarkPlan:
    """lm-eval tasks to run on the in-memory model, and every how many steps to evaluate (0: never)."""

    tasks: list[str] = field(default_factory=list)
    include_path: list[Path] = field(default_factory=list)
    limit: float | None = None
    every: int = 0

    def run(self, model: Any, tokenizer: Any) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}``, or ``{}`` without tasks."""
        if not self.tasks:
            return {}
        from gradsynth.unlearning.benchmarks import EvalFailed, UnknownTask, evaluate_tasks

        try:
            return evaluate_tasks(model, tokenizer, self.tasks, self.include_path, self.limit)
        except (UnknownTask, EvalFailed) as err:
            raise CliError(f"--eval-tasks: {err}") from err


def plan_from_args(args: argparse.Namespace, task: Any) -> BenchmarkPlan:
    """The plan the options describe; checks the extra and the folders before any work starts."""
    tasks = parse_list(args.eval_tasks, str, "--eval-tasks") if getattr(args, "eval_tasks", None) else []
    include = list(getattr(args, "include_path", None) or [])
    for folder in include:
        if not folder.is_dir():
            raise CliError(f"--include-path {folder}: no such folder; give the folder of your task YAMLs")
    plan = BenchmarkPlan(
        tasks, include, getattr(args, "eval_limit", None), getattr(args, "eval_every", 0) or 0
    )
    if include and not tasks:
        raise CliError("--include-path needs --eval-tasks naming the tasks to run from it")
    if tasks:
        from gradsynth.unlearning.benchmarks import EvalExtraMissing, require_lm_eval

        try:
            require_lm_eval()
        except EvalExtraMissing as err:
            raise CliError(str(err)) from err
        world = [t for t in tasks if t.startswith(WORLD_PREFIX)]
        if world:
            plan.include_path.append(write_world_tasks(task, world))
    return plan


def write_world_tasks(task: Any, names: list[str]) -> Path:
    """The world's multiple-choice questions of each named split as lm-eval tasks in a temporary folder."""
    from gradsynth.unlearning.multiple_choice import write_lm_eval_task

    unknown = [n for n in names if n[len(WORLD_PREFIX) :] not in task.choices]
    if unknown:
        known = ", ".join(WORLD_PREFIX + s for s in task.choices) or "none: this is not the embedded world"
        raise CliError(f"--eval-tasks: {unknown[0]!r} is not a split of this run ({known})")
    folder = Path(tempfile.mkdtemp(prefix="gradsynth-world-tasks-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for name in names:
        write_lm_eval_task(task.choices[name[len(WORLD_PREFIX) :]], folder, name)
    return folder
