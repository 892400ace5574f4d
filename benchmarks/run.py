"""The performance suite: synthesis speed, memory and the end-to-end step, in one table.

For every rule, on a flat tensor and on a list shaped like a Llama model's gradients, in float32
and bfloat16, side by side in one process (medians of interleaved repetitions):

- ``ms``: the synthesis as the optimizer runs it (``prepare`` over the list, then ``combine``
  into the retain gradient, tensor by tensor);
- ``x add``: that time over ``torch.add(f, r, out=o)`` on the same tensors, the roofline of an
  elementwise rule (2 reads + 1 write); PCGrad must read both gradients twice, so its limit is 5/3;
- ``GB/s``: the rule's minimal traffic (3 gradient sets, 5 for PCGrad) over its time;
- ``eager x add``: the same with the fused kernels off (the automatic fallback path);
- ``x faster than ref``: reference-style code (`reference_style.py`) over the rule;
- ``warm-up s``: extra time of the first call (compilation), paid once per process;
- ``extra sets``: peak memory of an optimizer step above params + one gradient set
  (`memory_peak.py`, one process per rule).

Then the end-to-end step ratio (`end_to_end.py`). Writes ``results.json`` and ``results.png``
to ``--out``.

Usage: ``python benchmarks/run.py [--quick] [--out DIR] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import end_to_end  # noqa: E402
import reference_style  # noqa: E402

from gradsynth import get_rule, use_backend  # noqa: E402

RULES = ["sago", "sago_prefer_retain", "sum", "pcgrad", "pcgrad_global"]
TRAFFIC = {"pcgrad": 5, "pcgrad_global": 5}  # gradient sets read or written at the minimum
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of an untied Llama decoder (embeddings, attention, MLP, norms, head)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
        shapes += [(hidden,)] * 2
    return [*shapes, (hidden,), (vocab, hidden)]


def _median_time(fn, reps: int, interleave) -> tuple[float, float]:
    """Medians of ``fn`` and of ``interleave`` (the roofline), run alternately ``reps`` times."""
    own, base = [], []
    for _ in range(reps):
        start = time.perf_counter()
        interleave()
        base.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        own.append(time.perf_counter() - start)
    return statistics.median(own), statistics.median(base)


def _synthesize(rule_name: str, forget: list, retain: list) -> None:
    rule = get_rule(rule_name)
    n = len(retain)
    context = rule.prepare(forget, retain, alpha=[1.0] * n, gamma=[1.0] * n)
    for f, r in zip(forget, retain, strict=True):
        rule.combine(f, r, alpha=1.0, gamma=1.0, out=r, context=context)


def _rows_for(layout: str, dtype_name: str, shapes: list, reps: int, ref_reps: int) -> list[dict]:
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)
    forget = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    retain = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    sums = [torch.empty_like(r) for r in retain]
    set_bytes = sum(r.numel() * r.element_size() for r in retain)

    def add() -> None:
        for f, r, o in zip(forget, retain, sums, strict=True):
            torch.add(f, r, out=o)

    rows = []
    for rule in RULES:

        def synthesize(rule: str = rule) -> None:
            _synthesize(rule, forget, retain)

        def reference(rule: str = rule) -> None:
            reference_style.RULES[rule](forget, retain, 1.0, 1.0)

        start = time.perf_counter()
        synthesize()
        first = time.perf_counter() - start
        fused, add_time = _median_time(synthesize, reps, add)
        with use_backend("eager"):
            eager, add_time_eager = _median_time(synthesize, max(3, reps // 2), add)
        slow, _ = _median_time(reference, ref_reps, add)
        row = {
            "rule": rule,
            "layout": layout,
            "dtype": dtype_name,
            "ms": fused * 1e3,
            "ratio_to_add": fused / add_time,
            "gb_per_s": TRAFFIC.get(rule, 3) * set_bytes / fused / 1e9,
            "eager_ratio_to_add": eager / add_time_eager,
            "speedup_vs_reference": slow / fused,
            "warmup_s": max(0.0, first - fused),
        }
        rows.append(row)
        print(
            f"{rule:19s} {layout:6s} {dtype_name:5s} {row['ms']:9.2f} {row['ratio_to_add']:7.2f} "
            f"{row['gb_per_s']:7.1f} {row['eager_ratio_to_add']:8.2f} "
            f"{row['speedup_vs_reference']:9.1f} {row['warmup_s']:8.1f}",
            flush=True,
        )
    return rows


def speed_rows(layouts: dict, reps: int, ref_reps: int) -> list[dict]:
    return [
        row
        for layout, shapes in layouts.items()
        for dtype_name in DTYPES
        for row in _rows_for(layout, dtype_name, shapes, reps, ref_reps)
    ]


def memory_rows(layers: int, width: int) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    configs = [(rule, "loss") for rule in RULES] + [("sago", "streaming"), ("sago", "plain")]
    result = {}
    for rule, mode in configs:
        out = subprocess.run(
            [
                *(sys.executable, str(HERE / "memory_peak.py")),
                *("--layers", str(layers), "--width", str(width), "--child", rule, mode, "1"),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        name = {"loss": rule, "streaming": f"{rule} streaming", "plain": "plain training"}[mode]
        result[name] = json.loads(out.stdout.strip().splitlines()[-1])["extra_sets"]
    return result


def plot(rows: list[dict], e2e: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    cases = [(layout, dtype) for layout in dict.fromkeys(r["layout"] for r in rows) for dtype in DTYPES]
    width = 0.8 / len(cases)
    for i, (layout, dtype) in enumerate(cases):
        values = [
            next(
                r["ratio_to_add"]
                for r in rows
                if (r["rule"], r["layout"], r["dtype"]) == (rule, layout, dtype)
            )
            for rule in RULES
        ]
        ax.bar([k + i * width for k in range(len(RULES))], values, width, label=f"{layout}, {dtype}")
    ax.axhline(1.25, color="k", linestyle="--", linewidth=1, label="target, elementwise rules (1.25)")
    ax.axhline(1.9, color="gray", linestyle=":", linewidth=1, label="target, PCGrad (1.9)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(RULES))], RULES)
    ax.set_ylabel("time / torch.add on the same tensors")
    ax.set_title("Synthesis against the memory roofline (lower is better)")
    ax.legend(fontsize=8)
    names = list(e2e["variants"])
    ax2.bar(names, [e2e["variants"][n]["ratio"] for n in names], color="tab:green")
    ax2.axhline(1.10, color="k", linestyle="--", linewidth=1, label="target (1.10)")
    ax2.set_ylabel("step time / naive GradDiff step")
    ax2.set_title(f"End-to-end step, {e2e['params'] / 1e6:.1f}M Llama")
    ax2.tick_params(axis="x", rotation=30)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the suite runs (CI)")
    parser.add_argument("--numel", type=int, default=1 << 26, help="elements of the flat tensor")
    parser.add_argument(
        "--llama",
        default="768,6,2048,16000",
        help="hidden,layers,intermediate,vocab of the Llama-shaped list (default ~67M elements)",
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ref-reps", type=int, default=2, help="repetitions of the slow reference code")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.quick:
        args.numel, args.llama, args.reps, args.ref_reps = 1 << 16, "64,2,128,256", 3, 1
    torch.set_num_threads(args.threads)
    hidden, layers, intermediate, vocab = (int(x) for x in args.llama.split(","))
    layouts = {"flat": [(args.numel,)], "llama": llama_shapes(hidden, layers, intermediate, vocab)}
    n_llama = sum(torch.Size(s).numel() for s in layouts["llama"])
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
        f"flat {args.numel / 1e6:.1f}M elements, "
        f"llama list {n_llama / 1e6:.1f}M in {len(layouts['llama'])} tensors"
    )
    print(
        f"{'rule':19s} {'layout':6s} {'dtype':5s} {'ms':>9s} {'x add':>7s} {'GB/s':>7s} "
        f"{'eager x':>8s} {'x vs ref':>9s} {'warm-up s':>8s}"
    )
    rows = speed_rows(layouts, args.reps, args.ref_reps)
    memory = memory_rows(*((4, 128) if args.quick else (16, 1024)))
    print("\npeak memory of a step, extra gradient sets above params + one set:")
    for name, extra in memory.items():
        print(f"  {name:22s} {extra:6.3f}")
    e2e = end_to_end.measure(*((32, 1) if args.quick else (256, 4)), reps=3 if args.quick else 15)
    print(
        f"\nend to end, {e2e['params'] / 1e6:.2f}M-parameter Llama, AdamW, "
        f"naive step {e2e['naive_ms']:.1f} ms:"
    )
    for name, row in e2e["variants"].items():
        print(f"  {name:22s} x{row['ratio']:.3f}  (first step {row['first_step_s']:.1f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "sizes": {"flat": args.numel, "llama": n_llama, "llama_config": args.llama},
        "synthesis": rows,
        "memory_extra_sets": memory,
        "end_to_end": e2e,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, e2e, out / "results.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")


if __name__ == "__main__":
    main()
