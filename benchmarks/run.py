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

The header says where it ran: the CPU model, PyTorch's CPU capability
(``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...; the compiled kernels are
vectorised for it), the thread count, the bandwidth of ``torch.add`` and the load average before
and after. ``--repeat K`` reruns the speed table K times and reports each ratio's median and
range (min-max over the runs); the JSON carries every run.

``--device cuda`` runs the speed table on a GPU (tensors made there, timings synchronised), adds
the card and the bandwidth of a device-to-device copy to the header, and measures memory with
``torch.cuda.max_memory_allocated`` and the end-to-end step on that device;
``benchmarks/gpu_check.py`` drives it at real sizes.

Usage: ``python benchmarks/run.py [--quick] [--repeat K] [--out DIR] [--threads 1] [--device cpu]``
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


def synchronizer(device: str):
    """A function that waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _median_time(fn, reps: int, interleave, sync=lambda: None) -> tuple[float, float]:
    """Medians of ``fn`` and of ``interleave`` (the roofline), run alternately ``reps`` times.

    ``sync`` waits for the device before each clock reading, so that a GPU's queued kernels count.
    """
    own, base = [], []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        interleave()
        sync()
        base.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn()
        sync()
        own.append(time.perf_counter() - start)
    return statistics.median(own), statistics.median(base)


def random_tensors(shapes: list, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[list, list]:
    """Forget and retain gradients of ``shapes``: made on the device itself (a GPU), or on the CPU."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if torch.device(device).type == "cpu":
        forget = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        retain = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        return forget, retain
    forget = [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]
    retain = [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]
    return forget, retain


def _synthesize(rule_name: str, forget: list, retain: list) -> None:
    rule = get_rule(rule_name)
    n = len(retain)
    context = rule.prepare(forget, retain, alpha=[1.0] * n, gamma=[1.0] * n)
    for f, r in zip(forget, retain, strict=True):
        rule.combine(f, r, alpha=1.0, gamma=1.0, out=r, context=context)


def _rows_for(
    layout: str, dtype_name: str, shapes: list, reps: int, ref_reps: int, device: str = "cpu"
) -> list[dict]:
    dtype = DTYPES[dtype_name]
    sync = synchronizer(device)
    forget, retain = random_tensors(shapes, dtype, device)
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

        sync()
        start = time.perf_counter()
        synthesize()
        sync()
        first = time.perf_counter() - start
        fused, add_time = _median_time(synthesize, reps, add, sync)
        with use_backend("eager"):
            eager, add_time_eager = _median_time(synthesize, max(3, reps // 2), add, sync)
        slow = _median_time(reference, ref_reps, add, sync)[0] if ref_reps else None
        row = {
            "rule": rule,
            "layout": layout,
            "dtype": dtype_name,
            "device": device,
            "ms": fused * 1e3,
            "ratio_to_add": fused / add_time,
            "gb_per_s": TRAFFIC.get(rule, 3) * set_bytes / fused / 1e9,
            "eager_ratio_to_add": eager / add_time_eager,
            "speedup_vs_reference": slow / fused if slow is not None else None,
            "warmup_s": max(0.0, first - fused),
        }
        rows.append(row)
        print(
            f"{rule:19s} {layout:6s} {dtype_name:5s} {row['ms']:9.2f} {row['ratio_to_add']:7.2f} "
            f"{row['gb_per_s']:7.1f} {row['eager_ratio_to_add']:8.2f} "
            f"{_num(row['speedup_vs_reference'], 9, 1)} {row['warmup_s']:8.1f}",
            flush=True,
        )
    return rows


def speed_rows(layouts: dict, reps: int, ref_reps: int, device: str = "cpu") -> list[dict]:
    return [
        row
        for layout, shapes in layouts.items()
        for dtype_name in DTYPES
        for row in _rows_for(layout, dtype_name, shapes, reps, ref_reps, device)
    ]


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


SPREAD = ("ms", "ratio_to_add", "gb_per_s", "eager_ratio_to_add", "speedup_vs_reference")


def summarize(runs: list[list[dict]]) -> list[dict]:
    """One row per case: each measure's median over the runs, with ``<measure>_runs`` and a range."""
    rows = []
    for same in zip(*runs, strict=True):
        row = dict(same[0])
        for key in SPREAD:
            values = [r[key] for r in same if r[key] is not None]  # the reference: first run only
            row[key] = statistics.median(values) if values else None
            row[f"{key}_runs"] = values
            row[f"{key}_range"] = [min(values), max(values)] if values else None
        row["warmup_s"] = same[0]["warmup_s"]  # the compilation happens in the first run only
        rows.append(row)
    return rows


def print_summary(rows: list[dict]) -> None:
    print(
        f"\nmedian [min-max] over {len(rows[0]['ratio_to_add_runs'])} runs of the table:\n"
        f"{'rule':19s} {'layout':6s} {'dtype':5s} {'ms':>9s} {'x add':>18s} {'eager x add':>18s}"
    )
    for row in rows:
        lo, hi = row["ratio_to_add_range"]
        elo, ehi = row["eager_ratio_to_add_range"]
        print(
            f"{row['rule']:19s} {row['layout']:6s} {row['dtype']:5s} {row['ms']:9.2f} "
            f"{row['ratio_to_add']:6.2f} [{lo:4.2f}-{hi:4.2f}] "
            f"{row['eager_ratio_to_add']:6.2f} [{elo:4.2f}-{ehi:4.2f}]"
        )


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bandwidth(numel: int, reps: int, device: str, copy: bool) -> float:
    sync = synchronizer(device)
    a, b = torch.randn(numel, device=device), torch.randn(numel, device=device)
    c = torch.empty_like(a)

    def run() -> None:
        c.copy_(a) if copy else torch.add(a, b, out=c)

    run()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return (2 if copy else 3) * numel * 4 / statistics.median(times) / 1e9


def add_bandwidth(numel: int, reps: int = 5, device: str = "cpu") -> float:
    """GB/s of ``torch.add(a, b, out=c)`` on float32 tensors of ``numel`` elements (median)."""
    return _bandwidth(numel, reps, device, copy=False)


def copy_bandwidth(numel: int, reps: int = 5, device: str = "cpu") -> float:
    """GB/s (read + write) of ``c.copy_(a)`` on float32 tensors of ``numel`` elements (median)."""
    return _bandwidth(numel, reps, device, copy=True)


def gpu_info(device: str) -> dict:
    """The card, its memory, the driver and the CUDA and Triton versions (None where unknown)."""
    index = torch.device(device).index or 0
    properties = torch.cuda.get_device_properties(index)
    try:
        driver = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": properties.name,
        "gpu_memory_gib": properties.total_memory / 2**30,
        "gpu_capability": f"{properties.major}.{properties.minor}",
        "gpu_count": torch.cuda.device_count(),
        "driver": driver,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def machine(threads: int, numel: int, device: str = "cpu") -> dict:
    where = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "logical_cpus": os.cpu_count(),
        "add_gb_per_s": add_bandwidth(numel, device=device),
        "copy_gb_per_s": copy_bandwidth(numel, device=device),
        "load_average_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        where.update(gpu_info(device))
    return where


MEMORY_CONFIGS = [(rule, "loss") for rule in RULES] + [("sago", "streaming"), ("sago", "plain")]
MEMORY_CONFIGS += [(rule, "loss+geometry") for rule in ("sago", "pcgrad")] + [("sago", "streaming+geometry")]
MEMORY_NAMES = {"loss": "{rule}", "streaming": "{rule} streaming", "plain": "plain training"}


def memory_name(rule: str, mode: str) -> str:
    """The row name of a `memory_peak.py` configuration (``sago streaming``, ``pcgrad geometry``)."""
    geometry = mode.endswith("+geometry")
    name = MEMORY_NAMES[mode.removesuffix("+geometry")].format(rule=rule)
    return f"{name} geometry" if geometry else name


def memory_rows(layers: int, width: int, device: str = "cpu", configs=None) -> dict[str, float]:
    """Extra gradient sets of a step per (rule, `memory_peak.py` mode): one process each on the CPU
    (the resident set must start clean), in this process on a CUDA device (the allocator counts)."""
    import memory_peak

    configs = MEMORY_CONFIGS if configs is None else configs
    if torch.device(device).type == "cuda":
        result = {}
        for rule, mode in configs:
            result[memory_name(rule, mode)] = memory_peak.measure(rule, mode, 1, layers, width, device)[
                "extra_sets"
            ]
            torch.cuda.empty_cache()
        return result
    return {
        memory_name(rule, mode): memory_peak.measure_in_child(rule, mode, 1, layers, width)["extra_sets"]
        for rule, mode in configs
    }


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
    parser.add_argument("--repeat", type=int, default=1, help="runs of the speed table (median and range)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the suite runs")
    args = parser.parse_args()
    if args.quick:
        args.numel, args.llama, args.reps, args.ref_reps = 1 << 16, "64,2,128,256", 3, 1
    torch.set_num_threads(args.threads)
    hidden, layers, intermediate, vocab = (int(x) for x in args.llama.split(","))
    layouts = {"flat": [(args.numel,)], "llama": llama_shapes(hidden, layers, intermediate, vocab)}
    n_llama = sum(torch.Size(s).numel() for s in layouts["llama"])
    where = machine(args.threads, args.numel, args.device)
    print(
        f"torch {where['torch']}, CPU {where['cpu']}, capability {where['cpu_capability']}, "
        f"{args.threads} thread(s) of {where['logical_cpus']}, torch.add {where['add_gb_per_s']:.1f} GB/s "
        f"(float32, {args.numel / 1e6:.1f}M), load average {where['load_average_before']}; "
        f"flat {args.numel / 1e6:.1f}M elements, "
        f"llama list {n_llama / 1e6:.1f}M in {len(layouts['llama'])} tensors"
    )
    if "gpu" in where:
        print(
            f"device {args.device}: {where['gpu']}, driver {where['driver']}, CUDA {where['cuda']}, "
            f"Triton {where['triton']}; copy {where['copy_gb_per_s']:.0f} GB/s, "
            f"torch.add {where['add_gb_per_s']:.0f} GB/s"
        )
    runs = []
    for run in range(args.repeat):
        if args.repeat > 1:
            print(f"\nrun {run + 1} of {args.repeat}")
        print(
            f"{'rule':19s} {'layout':6s} {'dtype':5s} {'ms':>9s} {'x add':>7s} {'GB/s':>7s} "
            f"{'eager x':>8s} {'x vs ref':>9s} {'warm-up s':>8s}"
        )
        # The slow reference-style code is timed in the first run only.
        runs.append(speed_rows(layouts, args.reps, args.ref_reps if run == 0 else 0, args.device))
    rows = summarize(runs)
    if args.repeat > 1:
        print_summary(rows)
    where["load_average_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    memory = memory_rows(*((4, 128) if args.quick else (16, 1024)), device=args.device)
    print("\npeak memory of a step, extra gradient sets above params + one set:")
    for name, extra in memory.items():
        print(f"  {name:22s} {extra:6.3f}")
    e2e = end_to_end.measure(
        *((32, 1) if args.quick else (256, 4)), reps=3 if args.quick else 15, device=args.device
    )
    print(
        f"\nend to end, {e2e['params'] / 1e6:.2f}M-parameter Llama, AdamW, "
        f"naive step {e2e['naive_ms']:.1f} ms:"
    )
    for name, row in e2e["variants"].items():
        print(f"  {name:22s} x{row['ratio']:.3f}  (first step {row['first_step_s']:.1f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": where,
        "repeat": args.repeat,
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
