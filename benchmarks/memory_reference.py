"""Peak memory of the NPO / KL reference: a full frozen copy against the copy-free references.

Each configuration runs in a fresh process: a Llama from a config (no download), 2 unlearning
steps of `gradsynth.unlearning.loop.unlearn`, and the process's peak resident memory (VmHWM)
minus its resident memory just before the reference is made. Run::

    python benchmarks/memory_reference.py              # hidden 512, 8 layers (~40M parameters)
    python benchmarks/memory_reference.py --hidden 128 --layers 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

CONFIGS = {
    "npo-full-copy": ("npo", "nll", False, "copy"),
    "npo-precomputed": ("npo", "nll", False, None),
    "kl-lora-full-copy": ("ga", "kl", True, "copy"),
    "kl-lora-adapters-disabled": ("ga", "kl", True, None),
}


def _rss(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _one(name: str, hidden: int, layers: int) -> dict:
    import torch
    import transformers

    from gradsynth.unlearning.loop import UnlearnSettings, unlearn
    from gradsynth.unlearning.task_losses import LossSettings

    torch.set_num_threads(1)
    forget_loss, retain_loss, lora, reference = CONFIGS[name]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    data = [
        (ids := torch.randint(1, 4096, (24,), generator=g).tolist(), [-100] * 12 + ids[12:])
        for _ in range(64)
    ]
    settings = UnlearnSettings(
        steps=2, batch_size=8, losses=LossSettings(forget=forget_loss, retain=retain_loss)
    )
    before = _rss("VmRSS")
    ref = None
    if reference == "copy":
        base = model.get_base_model() if lora else model
        ref = copy.deepcopy(base).eval().requires_grad_(False)
    unlearn(model, data[:32], data[32:], 0, settings, ref, precompute_reference=reference is None)
    return {
        "config": name,
        "params_mib": round(params_mib, 1),
        "peak_above_start_mib": round(_rss("VmHWM") - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.hidden, args.layers)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    print("| configuration | parameters (MiB) | peak above start (MiB) |\n|---|---|---|")
    for name in CONFIGS:
        command = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {name} | {row['params_mib']} | {row['peak_above_start_mib']} |")


if __name__ == "__main__":
    main()
