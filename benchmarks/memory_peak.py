"""Peak memory of one training step, in gradient sets above params + one gradient set.

Each configuration runs in its own process on a stack of bias-free linear layers (64M fp32
parameters, a tiny batch so activations are negligible). The peak resident set size is reset
before the measured steps (``/proc/self/clear_refs``) and read afterwards (``VmHWM``); glibc is
told to return freed blocks to the system (``MALLOC_MMAP_THRESHOLD_``) so that the resident set
follows the live tensors.

    extra = (peak - resident size with params only) / (bytes of one gradient set) - 1

Plain training (one backward of ``gamma*Lf + alpha*Lr``) holds one gradient set: extra ~ 0.

``--keep-freed-memory`` adds three columns for what the ``gradsynth`` command line runs with
(`gradsynth.keep_freed_memory`: freed blocks stay in the process for reuse). Freed memory then
stays resident, so a warm-up step cannot be left out of the count: these columns count from the
params-only size before the first full-size step (after a one-layer warm-up that pages the code
in) to the peak over it and the measured steps, with freed blocks returned as above, with
glibc's defaults (no setting: blocks under the mmap threshold, which rises to 32 MiB with use,
stay on the heap), and kept. The first step's one-off costs (from ``MIN_STEP_NUMEL`` = 2**24
elements a step, the compiled kernels: about 15 MiB that stay after their first call) are in
all three; their differences are what each malloc setting costs at the peak.

Usage: ``python benchmarks/memory_peak.py [--layers 64] [--width 1024] [--steps 2]
[--keep-freed-memory]`` (Linux only).
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


def _training(rule: str, mode: str, micro: int, layers: int, width: int, device: str):
    """``(step, optimizer, KiB of one gradient set)``: ``step(seed)`` runs a training step of ``mode``."""
    import torch

    from gradsynth import SynthesizingOptimizer

    geometry = mode.endswith("+geometry")
    mode = mode.removesuffix("+geometry")
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

    return step, opt, grad_set_kib


def measure(
    rule: str,
    mode: str,
    micro: int,
    layers: int,
    width: int,
    device: str = "cpu",
    *,
    steps: int = 2,
    keep_freed: bool = False,
    from_start: bool = False,
) -> dict:
    import torch

    from gradsynth import keep_freed_memory

    if keep_freed and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc's malloc (Linux)")
    torch.set_num_threads(1)
    measured = cuda_allocated_and_peak_kib if torch.device(device).type == "cuda" else resident_and_peak_kib
    if from_start or keep_freed:  # kept, the warm-up's freed blocks stay resident: count them
        warm_up, _, _ = _training(rule, mode, micro, 1, width, device)
        warm_up(0)
        del warm_up
        step, _, grad_set_kib = _training(rule, mode, micro, layers, width, device)
        params_only_kib, peak_kib = measured(lambda: [step(seed) for seed in range(steps + 1)])
    else:
        step, opt, grad_set_kib = _training(rule, mode, micro, layers, width, device)
        step(0)  # warm-up: lazily allocated state and buffers
        opt.zero_grad(set_to_none=True)
        params_only_kib, peak_kib = measured(lambda: [step(seed) for seed in range(1, steps + 1)])
    return {
        "extra_sets": (peak_kib - params_only_kib) / grad_set_kib - 1,
        "grad_set_mib": grad_set_kib / 1024,
    }


#: The columns: (malloc setting, counted from the first step), see the module's docstring.
COLUMNS = {
    "extra gradient sets": ("returned", False),
    "first step, returned": ("returned", True),
    "glibc defaults": ("default", True),
    "kept": ("kept", True),
}


def measure_in_child(
    rule: str,
    mode: str,
    micro: int,
    layers: int,
    width: int,
    *,
    steps: int = 2,
    malloc: str = "returned",
    from_start: bool = False,
) -> dict:
    """`measure` on the CPU in a fresh process (the resident set must start clean), one thread;
    ``malloc``: freed blocks ``"returned"`` to the system, glibc's ``"default"``, or ``"kept"``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "returned":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--layers", str(layers), "--width", str(width)]
    command += ["--steps", str(steps), "--child", rule, mode, str(micro)]
    command += ["--from-start"] if from_start else []
    command += ["--keep-freed-memory"] if malloc == "kept" else []
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="three more columns from the first step: freed memory returned, glibc's defaults, kept",
    )
    parser.add_argument("--from-start", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=3, metavar=("RULE", "MODE", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rule, mode, micro = args.child
        size = {"layers": args.layers, "width": args.width, "steps": args.steps}
        found = measure(
            rule, mode, int(micro), **size, keep_freed=args.keep_freed_memory, from_start=args.from_start
        )
        print(json.dumps(found))
        return
    names = list(COLUMNS) if args.keep_freed_memory else list(COLUMNS)[:1]
    print(f"{'configuration':58s} {'rule':15s} " + " ".join(f"{name:>20s}" for name in names))
    for label, rule, mode, micro in CONFIGS:
        found = [
            measure_in_child(
                rule, mode, micro, args.layers, args.width, steps=args.steps, malloc=m, from_start=start
            )
            for m, start in (COLUMNS[name] for name in names)
        ]
        print(f"{label:58s} {rule:15s} " + " ".join(f"{r['extra_sets']:20.3f}" for r in found))
    print(f"(one gradient set = {found[0]['grad_set_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
