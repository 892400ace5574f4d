"""``gradsynth eval MODEL --tasks ...``: lm-eval scores of a saved model, as a table (and ``eval.json``).

The model is loaded once with transformers and handed to lm-eval in memory, the same path
``gradsynth unlearn --eval-tasks`` takes, so the two give the same numbers for the same weights.
``--eval NAME=FILE`` splits are scored as ``gradsynth unlearn`` scores its splits (recall, ROUGE-L,
NLL, multiple choice), in the same prompt format.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradsynth.cli.errors import CliError
from gradsynth.cli.output_folder import check_output_folder, run_inputs, staged_output
from gradsynth.cli.parser import parse_list
from gradsynth.cli.progress import phase
from gradsynth.cli.tables import benchmark_table, split_table
from gradsynth.unlearning.benchmarks import (
    EvalExtraMissing,
    EvalFailed,
    UnknownTask,
    evaluate_tasks,
    require_lm_eval,
)


def score_splits(model: Any, tokenizer: Any, splits: dict[str, list], args: argparse.Namespace) -> dict:
    """The ``--eval`` splits scored as ``unlearn`` scores its splits; printed as a table."""
    if not splits:
        return {}
    from gradsynth.cli.run_one import evaluate, evaluation_batches, split_sizes
    from gradsynth.cli.sources import Task, formatted, held_out_choices

    splits, _ = formatted(splits, tokenizer, args)
    task = Task(
        model=model,
        tokenizer=tokenizer,
        forget=[],
        retain=[],
        splits=splits,
        max_length=args.max_length or 256,
        choices=held_out_choices(splits),
        generate_eval=True,
        recall=args.recall or "contains",
    )
    with phase(f"evaluating {split_sizes(task)}"):
        metrics = evaluate(model, evaluation_batches(task), task)
    print(split_table(metrics, {name: len(examples) for name, examples in splits.items()}))
    return metrics


def run(args: argparse.Namespace) -> int:
    from gradsynth.cli.sources import _load_model, held_out_names, read_splits, require_lm_extra
    from gradsynth.cli.unlearn_command import resolve_device

    if not args.tasks and not args.eval:
        raise CliError("give --tasks (lm-eval tasks) and/or --eval NAME=FILE (splits of your own)")
    tasks = parse_list(args.tasks, str, "--tasks") if args.tasks else []
    files = held_out_names(args)
    for folder in args.include_path or []:
        if not folder.is_dir():
            raise CliError(f"--include-path {folder}: no such folder; give the folder of your task YAMLs")
    if args.out is not None:
        check_output_folder(args.out, args.overwrite, run_inputs(args))
    require_lm_extra()
    if tasks:
        try:
            require_lm_eval()
        except EvalExtraMissing as err:
            raise CliError(str(err)) from err
    splits = read_splits(files)
    device = resolve_device(args.device)
    with phase(f"loading {args.model}"):
        model, tokenizer = _load_model(args.model, args.dtype, args.gguf_file)
    if args.chat_template and not getattr(tokenizer, "chat_template", None):
        raise CliError(
            f"--chat-template: the tokenizer of {args.model} has no chat template; drop --chat-template "
            "(or give a tokenizer_config.json with one)"
        )
    model.to(device)
    metrics = score_splits(model, tokenizer, splits, args)
    scores = {}
    if tasks:
        try:
            with phase(f"scoring {', '.join(tasks)}"):
                scores = evaluate_tasks(
                    model,
                    tokenizer,
                    tasks,
                    args.include_path,
                    args.limit,
                    args.batch_size,
                    num_fewshot=args.num_fewshot,
                    chat_template=args.chat_template,
                )
        except (UnknownTask, EvalFailed) as err:
            raise CliError(f"--tasks: {err}") from err
        print(benchmark_table({"score": scores}))
    if args.out is not None:
        with staged_output(args.out, args.overwrite) as staging:
            payload = {
                "model": args.model,
                "tasks": tasks,
                "limit": args.limit,
                "num_fewshot": args.num_fewshot,
                "chat_template": args.chat_template,
                "results": scores,
            }
            if splits:
                payload["splits"] = metrics
            (staging / "eval.json").write_text(json.dumps(payload, indent=2))
        print(f"Wrote {args.out}/eval.json")
    return 0
