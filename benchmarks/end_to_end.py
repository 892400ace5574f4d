"""Cost of a whole training step with `SynthesizingOptimizer`, as a ratio to the naive step.

A small ``LlamaForCausalLM`` (built from a config, random weights) and AdamW. The naive step is
plain GradDiff: one backward of ``gamma*Lf + alpha*Lr``. The wrapped step runs the two backward
passes separately and synthesizes. Both run the same two forward passes; the timings are
interleaved and the ratio is of medians.

Usage: ``python benchmarks/end_to_end.py [--hidden 256 --layers 4 --reps 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsynth import SynthesizingOptimizer
from gradsynth.rules import fused

# (rule, streaming, backend). Under "auto" a model this small runs the eager rules
# (`fused.for_step`); the "compiled" row shows what the fused kernels would give it.
VARIANTS = [
    ("sago", False, "auto"),
    ("sago", False, "compiled"),
    ("sago", True, "auto"),
    ("pcgrad", False, "auto"),
    ("sum", False, "auto"),
]


def _model(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
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
    return LlamaForCausalLM(config)


def measure(
    hidden: int = 256, layers: int = 4, vocab: int = 512, batch: int = 8, seq: int = 64, reps: int = 15
) -> dict:
    """Median step times (ms) and ratios to the naive step for each variant."""
    model = _model(hidden, layers, vocab)
    generator = torch.Generator().manual_seed(0)
    forget_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    retain_ids = torch.randint(0, vocab, (batch, seq), generator=generator)

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
    for rule, streaming, backend in VARIANTS:
        opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-6), rule, streaming=streaming)

        def wrapped_step(opt=opt, backend=backend):
            with fused.use_backend(backend):
                opt.zero_grad()
                lf, lr = losses()
                opt.backward_forget(lf)
                opt.backward_retain(lr)
                opt.step()

        name = f"{rule}{' streaming' if streaming else ''}{' compiled' if backend == 'compiled' else ''}"
        steps[name] = wrapped_step
    warmup = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()  # optimizer state, compiled kernels
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(reps):
        # A different order each round, so that no variant always follows the same one.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            step = steps[name]
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["naive"])
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "config": dict(hidden=hidden, layers=layers, vocab=vocab, batch=batch, seq=seq, reps=reps),
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
