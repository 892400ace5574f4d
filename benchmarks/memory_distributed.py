"""Peak memory per rank of one step under DDP and FSDP2 (2 CPU processes, gloo), in gradient sets.

Each configuration runs on two fresh processes over a stack of bias-free linear layers. As in
``memory_peak.py``, each rank resets its peak resident set size (``/proc/self/clear_refs``)
after a warm-up step and ``zero_grad(set_to_none=True)``, runs two steps and reads ``VmHWM``;
glibc returns freed blocks to the system (``MALLOC_MMAP_THRESHOLD_``)::

    above = (peak - resident size before the measured steps) / (bytes of the model's whole gradient)

The resident size before the steps already holds the parameters (FSDP2: one shard), the
optimizer state and the engine's own buffers (DDP's gradient buckets). Plain training does
one backward of ``Lf + Lr`` with the same engine.

Usage: ``python benchmarks/memory_distributed.py [--layers 16] [--width 1024]`` (Linux only).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

from memory_peak import resident_and_peak_kib  # this folder is on sys.path when the script runs

CONFIGS = [
    ("DDP, plain", "ddp", False, "plain"),
    ("DDP, gradsynth sago", "ddp", False, "sago"),
    ("DDP bucket views, plain", "ddp", True, "plain"),
    ("DDP bucket views, gradsynth sago", "ddp", True, "sago"),
    ("FSDP2, plain", "fsdp2", False, "plain"),
    ("FSDP2, gradsynth sago", "fsdp2", False, "sago"),
    ("FSDP2, gradsynth pcgrad", "fsdp2", False, "pcgrad"),
]


def _rank(rank: int, world: int, store: str, config: tuple, layers: int, width: int, results) -> None:
    import torch
    import torch.distributed as dist

    from gradsynth import SynthesizingOptimizer

    _, engine, bucket_view, rule = config
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    grad_set_kib = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    base = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    opt = base if rule == "plain" else SynthesizingOptimizer(base, rule)
    x = torch.randn(2, width)

    def step(seed: int) -> None:
        opt.zero_grad(set_to_none=True)
        lf, lr = (lambda: -model(x + seed).pow(2).mean()), (lambda: model(x - seed).pow(2).mean())
        if rule == "plain":
            (lf() + lr()).backward()
        else:
            opt.backward_forget(lf())
            opt.backward_retain(lr())
        opt.step()

    step(0)
    opt.zero_grad(set_to_none=True)
    before_kib, peak_kib = resident_and_peak_kib(lambda: [step(seed) for seed in range(1, 3)])
    results[rank] = ((peak_kib - before_kib) / grad_set_kib, grad_set_kib / 1024)
    dist.barrier()
    # Free DDP/FSDP2 (reference cycles) while the group is alive: torch 2.13 sometimes aborts at
    # exit otherwise ("terminate called without an active exception").
    model = opt = base = None
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    import torch.multiprocessing as mp

    world = 2
    print(f"{'configuration (2 ranks)':36s} {'peak above start, gradient sets (rank 0, rank 1)':>50s}")
    for config in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(
                _rank, args=(world, f"{tmp}/store", config, args.layers, args.width, results), nprocs=world
            )
            above = [results[r][0] for r in range(world)]
            grad_set_mib = results[0][1]
        print(f"{config[0]:36s} {above[0]:>42.2f}, {above[1]:.2f}")
    print(f"(one gradient set = {grad_set_mib:.0f} MiB; FSDP2 shards it over {world} ranks)")


if __name__ == "__main__":
    sys.exit(main())
