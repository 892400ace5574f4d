"""Per-call cost of a compiled kernel: gradsynth's direct call of the compiled graph against
``torch.compile``'s own call, with the default stance and with the documented
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, on small tensors at one thread.

    OMP_NUM_THREADS=1 python benchmarks/compile_call_overhead.py [--sizes 4096,32768] [--reps 2000]

Prints microseconds per call (median of 7 rounds) and ``torch.add`` on the same bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsynth.rules.kernels import compiled


def _per_call(fn, reps: int) -> float:
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,32768")
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = "sago_into_retain"
    for n in (int(s) for s in args.sizes.split(",")):
        f, r, out = torch.randn(n), torch.randn(n), torch.empty(n)
        with torch.no_grad():
            for _ in range(3):  # compile (once per process) and set up the direct call
                compiled.run(name, r, f, 0.5, 2.0)
            kernel = compiled._compiled[name]
            flat = [compiled.flat(t) for t in (r, f)]

            def add(f=f, r=r, out=out):
                torch.add(f, r, out=out)

            def direct(f=f, r=r):
                compiled.run(name, r, f, 0.5, 2.0)

            def through(kernel=kernel, flat=flat):
                kernel(*flat, 0.5, 2.0)

            rows = {
                "torch.add": _per_call(add, args.reps),
                "direct call (gradsynth)": _per_call(direct, args.reps),
                "torch.compile, default": _per_call(through, args.reps),
            }
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                through()
                rows["torch.compile, skip_guard_eval_unsafe"] = _per_call(through, args.reps)
        for label, us in rows.items():
            print(f"n={n:>7}  {label:<40} {us:8.2f} us/call")


if __name__ == "__main__":
    main()
