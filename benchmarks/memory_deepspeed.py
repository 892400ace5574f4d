"""Peak memory per rank of one step under DeepSpeed ZeRO-1/2/3 (2 CPU processes, gloo), in gradient sets.

The DeepSpeed counterpart of ``memory_distributed.py``, measured the same way: a stack of
bias-free linear layers, SGD with momentum as the client optimizer, fp32, one warm-up step, then
each rank resets its peak resident set size and runs two steps::

    above = (peak - resident size before the measured steps) / (bytes of the model's whole gradient)

Plain training runs one ``engine.backward(Lf + Lr)`` and ``engine.step()``; gradsynth runs the
two task backward passes through `DeepSpeedTasks`. The difference between the two is what
gradsynth adds per rank: its two fp32 task sums (full-size at ZeRO-1/2, where DeepSpeed's
``safe_get_full_grad`` hands out whole gradients; a partition at ZeRO-3) and the temporaries of
reading them.

Usage: ``python benchmarks/memory_deepspeed.py [--layers 16] [--width 1024] [--stages 1 2 3]`` (Linux only).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

from memory_peak import resident_and_peak_kib  # this folder is on sys.path when the script runs

CONFIGS = [
    (f"ZeRO-{stage}, {rule}", stage, rule) for stage in (1, 2, 3) for rule in ("plain", "sago", "pcgrad")
]


def _rank(rank: int, world: int, store: str, config: tuple, layers: int, width: int, results) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import importlib

    import deepspeed
    import torch
    import torch.distributed as dist

    from gradsynth import SynthesizingOptimizer
    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

    # No g++ build of DeepSpeed's shared-memory all-reduce: gloo does the collectives.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _, stage, rule = config
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    grad_set_kib = sum(p.numel() * p.element_size() for p in model.parameters()) / 1024
    base = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    opt = base if rule == "plain" else SynthesizingOptimizer(base, rule)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    tasks = None if rule == "plain" else DeepSpeedTasks(engine)
    x = torch.randn(2, width)

    def step(seed: int) -> None:
        lf, lr = (lambda: -engine(x + seed).pow(2).mean()), (lambda: engine(x - seed).pow(2).mean())
        if tasks is None:
            engine.backward(lf() + lr())
            engine.step()
        else:
            tasks.backward_forget(lf())
            tasks.backward_retain(lr())
            tasks.step()

    step(0)
    gc.collect()
    before_kib, peak_kib = resident_and_peak_kib(lambda: [step(seed) for seed in range(1, 3)])
    results[rank] = ((peak_kib - before_kib) / grad_set_kib, grad_set_kib / 1024)
    dist.barrier()
    engine = model = opt = base = tasks = None
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    args = parser.parse_args()
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    import torch.multiprocessing as mp

    world = 2
    print(f"{'configuration (2 ranks)':24s} {'peak above start, gradient sets (rank 0, rank 1)':>50s}")
    for config in [c for c in CONFIGS if c[1] in args.stages]:
        with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(
                _rank, args=(world, f"{tmp}/store", config, args.layers, args.width, results), nprocs=world
            )
            above = [results[r][0] for r in range(world)]
            grad_set_mib = results[0][1]
        print(f"{config[0]:24s} {above[0]:>42.2f}, {above[1]:.2f}", flush=True)
    print(f"(one gradient set = {grad_set_mib:.0f} MiB, fp32; ZeRO partitions it over {world} ranks)")


if __name__ == "__main__":
    sys.exit(main())
