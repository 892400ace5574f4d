"""Peak memory of SynthesizingTrainer steps, held vs ``streaming=True``, in gradient sets.

Each configuration trains a Llama built from a config (wide layers, 8-token sequences, batch 1,
SGD without momentum: the parameters and gradients dominate) in its own process. The resident
set size is read when step 1 ends (``p.grad`` freed by the Trainer: parameters only), its peak
is reset (``/proc/self/clear_refs``) and read again after the remaining steps (``VmHWM``), with
glibc told to return freed blocks (``MALLOC_MMAP_THRESHOLD_``):

    extra = (peak - resident size after step 1) / (bytes of one gradient set) - 1

so plain training, which holds one gradient set, would read about 0.

Usage: ``python benchmarks/trainer_memory.py [--layers 8] [--hidden 512]`` (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = [
    ("held (default)", {"streaming": False, "track_geometry": False}),
    ("streaming=True", {"streaming": True, "track_geometry": False}),
    ("held, geometry tracked", {"streaming": False, "track_geometry": True}),
    ("streaming=True, geometry tracked", {"streaming": True, "track_geometry": True}),
]


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(settings: dict, layers: int, hidden: int, steps: int) -> dict:
    import torch
    import transformers

    from gradsynth.integrations.hf_trainer import SynthesizingTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = transformers.LlamaForCausalLM(config)
    grad_set_kib = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
    tokens = torch.arange(8)
    pairs = [
        {
            "forget": {"input_ids": tokens, "labels": tokens},
            "retain": {"input_ids": tokens + 8, "labels": tokens + 8},
        }
    ] * steps
    marks: dict[str, int] = {}

    class Peak(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marks["after_step_1"] = _kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=1,
        max_steps=steps,
        optim="sgd",
        learning_rate=1e-6,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SynthesizingTrainer(model, args, train_dataset=pairs, callbacks=[Peak()], **settings)
    trainer.train()
    peak = _kib("VmHWM")
    return {
        "extra_sets": (peak - marks["after_step_1"]) / grad_set_kib - 1,
        "grad_set_mib": grad_set_kib / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args.layers, args.hidden, args.steps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    print(f"{'SynthesizingTrainer':36s} {'extra gradient sets':>20s}")
    for label, settings in CONFIGS:
        command = [sys.executable, __file__, "--layers", str(args.layers), "--hidden", str(args.hidden)]
        command += ["--steps", str(args.steps), "--child", json.dumps(settings)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:36s} {result['extra_sets']:20.3f}")
    print(f"(one gradient set = {result['grad_set_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
