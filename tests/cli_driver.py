"""Runs ``gradsynth`` in a child process, optionally pausing at a named point, for fault tests.

``python tests/cli_driver.py POINT ARGS...`` runs ``gradsynth ARGS...``; when the run reaches
POINT it prints ``PAUSED POINT`` on stderr and sleeps, so that a test can send a signal there.
POINT ``none`` never pauses. With ``GS_RELEASE=FILE`` the run goes on once FILE exists.
With ``GS_FAST_PRETRAIN=1`` the world model is not trained (the fault tests check files and
exit codes, not recall), which keeps a cold-cache run to seconds.

Points: ``pretrain`` (training the world model), ``cache-save`` (writing the cache entry),
``unlearn`` (inside the unlearning loop), ``save`` (writing the output folder).
"""

from __future__ import annotations

import os
import sys
import time


def _pause(point: str) -> None:
    if sys.argv[1] == point:
        print(f"PAUSED {point}", file=sys.stderr, flush=True)
        release = os.environ.get("GS_RELEASE")  # with it: wait for that file, then go on
        for _ in range(1200):
            if release and os.path.exists(release):
                return
            time.sleep(0.1)


def _wrap(module, name: str, point: str) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        _pause(point)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    import gradsynth.cli.run_one as run_one
    import gradsynth.cli.unlearn_command as unlearn_command
    import gradsynth.world.cache as cache
    from gradsynth.cli import main as gradsynth_main

    if os.environ.get("GS_FAST_PRETRAIN") == "1":
        cache.pretrain = lambda *args, **kwargs: {"recall": 1.0, "steps": 0}
    _wrap(cache, "pretrain", "pretrain")
    _wrap(cache, "write_manifest", "cache-save")
    original_unlearn = run_one.unlearn

    def unlearn(*args, **kwargs):
        on_step = args[6] if len(args) > 6 else kwargs.get("on_step")

        def step(record):
            if on_step is not None:
                on_step(record)
            _pause("unlearn")

        kwargs["on_step"] = step  # the other keywords (recall, checkpoints) pass through
        return original_unlearn(*args[:6], **kwargs)

    run_one.unlearn = unlearn
    _wrap(unlearn_command, "write_report", "save")
    return gradsynth_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
