"""The ``gradsynth`` command line: ``gradsynth unlearn`` and ``gradsynth compare``.

`main` returns the exit status. A problem with the input is printed as one line,
``gradsynth: error: ...``, with exit status 2, and no output folder is left behind.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``gradsynth`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        import datasets  # noqa: F401  (fail early and clearly without the lm extra)
        import transformers
    except ImportError as err:
        print(
            f"gradsynth: error: the command line needs the 'lm' extra ({err.name} is missing): "
            "pip install 'gradsynth[lm]'",
            file=sys.stderr,
        )
        return 2
    from gradsynth.cli import compare_command, unlearn_command
    from gradsynth.cli.errors import CliError
    from gradsynth.cli.parser import build_parser

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        args = build_parser().parse_args(argv)
        import torch

        torch.set_num_threads(getattr(args, "threads", 1))
        command = {"unlearn": unlearn_command.run, "compare": compare_command.run}[args.command]
        return command(args)
    except CliError as err:
        print(f"gradsynth: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradsynth: interrupted; no output folder was written", file=sys.stderr)
        return 130


__all__ = ["main"]
