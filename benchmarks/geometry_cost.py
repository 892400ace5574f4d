"""The cost of ``track_geometry`` in the synthesis alone, on a list shaped like a Llama's gradients.

For ``sago``, ``pcgrad`` and ``sum``: `combine_all` over the list as the optimizer runs it (into
the retain gradients), without and with a `GeometryAccumulator` (reduced and read), thread CPU
time, medians of ``--reps`` interleaved repetitions, against ``torch.add`` over the same list.
The default shape is an untied Llama of SmolLM2-135M's size (176.1M float32 elements).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/geometry_cost.py [--reps 5] [--hidden 576 --layers 30]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import llama_shapes

from gradsynth.optim.combine import combine_all
from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.rules import fused, get_rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = llama_shapes(args.hidden, args.layers, args.intermediate, args.vocab)
    forgets = [torch.randn(s) for s in shapes]
    originals = [torch.randn(s) for s in shapes]
    retains = [t.clone() for t in originals]
    outs = [torch.empty_like(t) for t in forgets]
    times: dict[tuple[str, bool], list[float]] = {
        (r, g): [] for r in ("sago", "pcgrad", "sum") for g in (False, True)
    }
    adds = []
    for _ in range(args.reps):
        start = time.thread_time()
        for a, b, c in zip(forgets, retains, outs, strict=True):
            torch.add(a, b, out=c)
        adds.append(time.thread_time() - start)
        for (rule, tracked), samples in times.items():
            for a, b in zip(retains, originals, strict=True):
                a.copy_(b)
            entries = [(get_rule(rule), 1.0, 1.0, f, r) for f, r in zip(forgets, retains, strict=True)]
            geometry = GeometryAccumulator() if tracked else None
            start = time.thread_time()
            combine_all(entries, geometry)
            if geometry is not None:
                geometry.reduce()
                geometry.result()
            samples.append(time.thread_time() - start)
    add = statistics.median(adds)
    numel = sum(f.numel() for f in forgets)
    print(f"{numel / 1e6:.1f}M elements in {len(shapes)} tensors, torch.add {add * 1e3:.0f} ms CPU")
    for (rule, tracked), samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(
            f"{rule:7s} {'+ geometry' if tracked else '          '} {ms:7.0f} ms  x add {ms / 1e3 / add:.2f}"
        )
    print(fused.status())


if __name__ == "__main__":
    main()
