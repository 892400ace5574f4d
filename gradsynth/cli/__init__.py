"""The ``gradsynth`` command line: ``gradsynth unlearn``, ``gradsynth compare`` and ``gradsynth eval``.

`main` returns the exit status. A problem with the input is printed as one line,
``gradsynth: error: ...``, with exit status 2, and no output folder is left behind.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``gradsynth`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    import torch

    from gradsynth.cli import compare_command, eval_command, unlearn_command
    from gradsynth.cli.errors import CliError
    from gradsynth.cli.parser import build_parser

    try:
        args = build_parser().parse_args(argv)
        torch.set_num_threads(args.threads)
        command = {
            "unlearn": unlearn_command.run,
            "compare": compare_command.run,
            "eval": eval_command.run,
        }[args.command]
        return command(args)
    except CliError as err:
        print(f"gradsynth: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradsynth: interrupted; no output folder was written", file=sys.stderr)
        return 130


__all__ = ["main"]
