"""``gradsynth eval MODEL --tasks ...``: lm-eval scores of a saved model, as a table (and ``eval.json``).

The model is loaded once with transformers and handed to lm-eval in memory, the same path
``gradsynth unlearn --eval-tasks`` takes, so the two give the same numbers for the same weights.
"""

from __future__ import annotations

import argparse
import json

from gradsynth.cli.errors import CliError
from gradsynth.cli.output_folder import check_output_folder, staged_output
from gradsynth.cli.parser import parse_list
from gradsynth.cli.tables import benchmark_table
from gradsynth.unlearning.benchmarks import (
    EvalExtraMissing,
    EvalFailed,
    UnknownTask,
    evaluate_tasks,
    require_lm_eval,
)


def run(args: argparse.Namespace) -> int:
    from gradsynth.cli.sources import _load_model, require_lm_extra
    from gradsynth.cli.unlearn_command import resolve_device

    tasks = parse_list(args.tasks, str, "--tasks")
    for folder in args.include_path or []:
        if not folder.is_dir():
            raise CliError(f"--include-path {folder}: no such folder; give the folder of your task YAMLs")
    if args.out is not None:
        check_output_folder(args.out, args.overwrite)
    require_lm_extra()
    try:
        require_lm_eval()
    except EvalExtraMissing as err:
        raise CliError(str(err)) from err
    device = resolve_device(args.device)
    model, tokenizer = _load_model(args.model, args.dtype)
    if args.chat_template and not getattr(tokenizer, "chat_template", None):
        raise CliError(
            f"--chat-template: the tokenizer of {args.model} has no chat template; drop --chat-template "
            "(or give a tokenizer_config.json with one)"
        )
    model.to(device)
    try:
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
            (staging / "eval.json").write_text(json.dumps(payload, indent=2))
        print(f"Wrote {args.out}/eval.json")
    return 0
