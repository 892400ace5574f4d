"""Cost of a whole training step with `SynthesizingOptimizer`, as a ratio to the naive step.

A small ``LlamaForCausalLM`` (built from a config, random weights) and AdamW. The naive step is
plain GradDiff: one backward of ``gamma*Lf + alpha*Lr``. The wrapped step runs the two backward
passes separately and synthesizes. Both run the same two forward passes; the timings are
interleaved and the ratio is of medians.

On a GPU (``measure(..., device="cuda", dtype=torch.bfloat16)``, as ``benchmarks/gpu_check.py``
runs it on a ~1B-parameter model) each timing waits for the device before the clock is read.

Usage: ``python benchmarks/end_to_end.py [--hidden 256 --layers 4 --reps 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsynth import SynthesizingOptimizer
from gradsynth.rules import fused

# (rule, streaming, backend[, track_geometry]). Under "auto" a model this small runs the eager
# rules (`fused.for_step`); the "compiled" row shows what the fused kernels would give it.
VARIANTS = [
    ("sago", False, "auto"),
    ("sago", False, "compiled"),
    ("sago", True, "auto"),
    ("pcgrad", False, "auto"),
    ("sum", False, "auto"),
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


def measure(
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 512,
    batch: int = 8,
    seq: int = 64,
    reps: int = 15,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    variants: list[tuple] = VARIANTS,
) -> dict:
    """Median step times (ms) and ratios to the naive step for each variant."""
    model = _model(hidden, layers, vocab, device).to(device, dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    generator = torch.Generator().manual_seed(0)
    forget_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    retain_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)

    def losses():
        lf = -model(input_ids=forget_ids, labels=forget_ids).loss
        lr = model(input_ids=retain_ids, labels=retain_ids).loss
        return lf, lr

    naive = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def naive_step():
        naive.zero_grad()
        lf, lr = losses()
        (lf + lr).backward()
        naive.step()

    steps = {"naive": naive_step}
    for rule, streaming, backend, *geometry in variants:
        track = bool(geometry and geometry[0])
        opt = SynthesizingOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-6), rule, streaming=streaming, track_geometry=track
        )

        def wrapped_step(opt=opt, backend=backend, track=track):
            with fused.use_backend(backend):
                opt.zero_grad()
                lf, lr = losses()
                opt.backward_forget(lf)
                opt.backward_retain(lr)
                opt.step()
                if track:
                    opt.geometry  # noqa: B018 (read as a logger would: one host sync)

        steps[variant_name(rule, streaming, backend, track)] = wrapped_step
    warmup = {}
    for name, step in steps.items():
        sync()
        start = time.perf_counter()
        step()  # optimizer state, compiled kernels
        sync()
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(reps):
        # A different order each round, so that no variant always follows the same one.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            step = steps[name]
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["naive"])
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "config": dict(
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            batch=batch,
            seq=seq,
            reps=reps,
            device=device,
            dtype=str(dtype).removeprefix("torch."),
        ),
        "naive_ms": base * 1e3,
        "variants": {
            name: {
                "ms": statistics.median(t) * 1e3,
                "ratio": statistics.median(t) / base,
                "first_step_s": warmup[name],
            }
            for name, t in times.items()
            if name != "naive"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.hidden, args.layers, reps=args.reps)
    print(f"{result['params'] / 1e6:.1f}M parameters, naive step {result['naive_ms']:.1f} ms")
    for name, row in result["variants"].items():
        print(f"{name:20s} {row['ms']:8.1f} ms  x{row['ratio']:.3f}")


if __name__ == "__main__":
    main()
