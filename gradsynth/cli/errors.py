"""The one exception the command line turns into a one-line message and a non-zero exit."""


class CliError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


class RunDiverged(CliError):
    """One unlearning run produced a non-finite loss or weight; `gradsynth compare` records it and
    goes on with the other cells, `gradsynth unlearn` stops with it."""
