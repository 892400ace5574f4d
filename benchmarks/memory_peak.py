"""Peak memory of one training step, in gradient sets above params + one gradient set.

Each configuration runs in its own process on a stack of bias-free linear layers (64M fp32
parameters, a tiny batch so activations are negligible). The peak resident set size is reset
before the measured steps (``/proc/self/clear_refs``) and read afterwards (``VmHWM``); glibc is
told to return freed blocks to the system (``MALLOC_MMAP_THRESHOLD_``) so that the resident set
follows the live tensors.

    extra = (peak - resident size with params only) / (bytes of one gradient set) - 1

Plain training (one backward of ``gamma*Lf + alpha*Lr``) holds one gradient set: extra ~ 0.

On a CUDA device (``measure(..., device="cuda")``, used by ``benchmarks/gpu_check.py``) the same
formula takes the allocator's exact counts instead: ``torch.cuda.memory_allocated()`` with params
only, and ``torch.cuda.max_memory_allocated()`` over the measured steps. A mode ending in
``+geometry`` tracks the gradient geometry (``track_geometry=True``).

Usage: ``python benchmarks/memory_peak.py [--layers 64] [--width 1024]`` (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

CONFIGS = [
    ("plain", "sum", "plain", 1),
    ("wrapper, losses passed", "sum", "loss", 1),
    ("wrapper, losses passed", "sago", "loss", 1),
    ("wrapper, losses passed", "pcgrad", "loss", 1),
    ("wrapper, losses passed", "pcgrad_global", "loss", 1),
    ("wrapper, losses passed, 2 interleaved micro-batches", "sago", "loss", 2),
    ("wrapper, backward_*(None)", "sago", "none", 1),
    ("wrapper, backward_*(None), 2 interleaved micro-batches", "sago", "none", 2),
    ("wrapper, streaming=True", "sago", "streaming", 1),
    ("wrapper, streaming=True", "pcgrad", "streaming", 1),
    ("wrapper, losses passed, track_geometry=True", "sago", "loss+geometry", 1),
    ("wrapper, losses passed, track_geometry=True", "pcgrad", "loss+geometry", 1),
    ("wrapper, losses passed, track_geometry=True", "sum", "loss+geometry", 1),
    ("wrapper, streaming=True, track_geometry=True", "sago", "streaming+geometry", 1),
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_and_peak_kib(steps: Callable[[], None]) -> tuple[int, int]:
    """The resident set size now, and its peak while ``steps()`` runs (both in KiB)."""
    before_kib = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    steps()
    return before_kib, _rss_kib("VmHWM")


def cuda_allocated_and_peak_kib(steps: Callable[[], None]) -> tuple[float, float]:
    """Bytes allocated on the current CUDA device now, and their peak while ``steps()`` runs (KiB)."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    steps()
    torch.cuda.synchronize()
    return before / 1024, torch.cuda.max_memory_allocated() / 1024


def measure(rule: str, mode: str, micro: int, layers: int, width: int, device: str = "cpu") -> dict:
    import torch

    from gradsynth import SynthesizingOptimizer

    geometry = mode.endswith("+geometry")
    mode = mode.removesuffix("+geometry")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    model.to(device)
    grad_set_kib = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
    base = torch.optim.SGD(model.parameters(), lr=1e-6)
    opt = (
        base
        if mode == "plain"
        else SynthesizingOptimizer(base, rule, streaming=mode == "streaming", track_geometry=geometry)
    )
    x = torch.randn(2, width, device=device)

    def losses(seed: int):
        xf, xr = x + seed, x - seed
        return -model(xf).pow(2).mean(), model(xr).pow(2).mean()

    def step(seed: int) -> None:
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            lf, lr = losses(seed + m)
            if mode == "plain":
                (lf + lr).backward()
            elif mode in ("loss", "streaming"):
                opt.backward_forget(lf)
                opt.backward_retain(lr)
            else:
                lf.backward()
                opt.backward_forget(None)
                lr.backward()
                opt.backward_retain(None)
        opt.step()
        if geometry:
            assert opt.geometry is not None

    step(0)  # warm-up: lazily allocated state and buffers
    opt.zero_grad(set_to_none=True)
    measured = cuda_allocated_and_peak_kib if torch.device(device).type == "cuda" else resident_and_peak_kib
    params_only_kib, peak_kib = measured(lambda: [step(seed) for seed in range(1, 3)])
    return {
        "extra_sets": (peak_kib - params_only_kib) / grad_set_kib - 1,
        "grad_set_mib": grad_set_kib / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--child", nargs=3, metavar=("RULE", "MODE", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rule, mode, micro = args.child
        print(json.dumps(measure(rule, mode, int(micro), args.layers, args.width)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    print(f"{'configuration':58s} {'rule':15s} {'extra gradient sets':>20s}")
    for label, rule, mode, micro in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
                "--child",
                rule,
                mode,
                str(micro),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label:58s} {rule:15s} {result['extra_sets']:20.3f}")
    print(f"(one gradient set = {result['grad_set_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
