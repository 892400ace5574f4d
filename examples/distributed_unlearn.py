"""Unlearning on several processes: `SynthesizingOptimizer` under DDP or FSDP2, launched by torchrun.

The world, the model and the pretraining are those of ``unlearn_custom_loop.py`` (imported from
it): a small model memorises random facts, then forgets every fact about a few entities by
gradient ascent while a retain loss holds on to the rest. Here the unlearning runs data-parallel:

* each rank takes its share of the forget facts and of one retain batch drawn with the same
  seed on every rank (so the ranks never train on the same retain samples);
* DDP all-reduces each task's gradient in that task's backward; with ``--accumulate k`` every
  micro-batch but the last runs under ``model.no_sync()``, so each task is all-reduced once;
* FSDP2 (``fully_shard``) reduce-scatters each backward into sharded DTensor gradients; it
  accumulates with its gradient sync left on (``set_requires_gradient_sync(False)`` would add
  both tasks into one private buffer);
* the wrapper synthesizes once per step, on the reduced gradients. SAGO then works on each
  rank's own shard (FSDP2) with no communication; PCGrad's inner products are reduced globally.

At the end every rank gathers all parameters and checks that they are bit-identical.

Run (CPU, gloo; on GPUs the same command uses NCCL, one GPU per process)::

    torchrun --standalone --nproc-per-node 2 examples/distributed_unlearn.py --engine ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed_unlearn.py --engine fsdp2 --rule pcgrad
    torchrun --standalone --nproc-per-node 2 examples/distributed_unlearn.py --quick --engine ddp fsdp2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradsynth import SynthesizingOptimizer, available_rules
from gradsynth.integrations.distributed import check_engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unlearn_custom_loop import FULL, QUICK, Config, World, build_world, evaluate, nll, pct, pretrain


def wrap(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """The pretrained model under DDP, or sharded with FSDP2 (each linear layer, then the root)."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def shard(facts: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's share of a batch of fact indices (the same split on every rank)."""
    return facts.tensor_split(world_size)[rank]


def full_parameters(model: nn.Module) -> Tensor:
    """Every parameter, gathered whole (FSDP2 holds shards), as one flat vector."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in parts])


def identical_on_all_ranks(vector: Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(v, vector) for v in gathered)


def unlearn(engine: str, rule: str, cfg: Config, world: World, seed: int, accumulate: int) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    pretrained = pretrain(cfg, world)  # the same numbers on every rank: same seed, same data
    before = evaluate(pretrained, world)
    model = wrap(pretrained.to(device), engine, device)
    world = World(**{name: t.to(device) for name, t in vars(world).items()})
    opt = SynthesizingOptimizer(
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0), rule, track_geometry=True
    )
    check_engine(model, opt)  # refuses ZeRO offload; DDP, FSDP2 and DeepSpeed ZeRO-0..3 pass
    batches = torch.Generator().manual_seed(seed + 1)  # one global retain batch per micro-step
    start = time.perf_counter()
    for _ in range(cfg.steps):
        opt.zero_grad()
        for micro in range(accumulate):
            last = micro == accumulate - 1
            # DDP: all-reduce each task once, in its last backward. FSDP2 keeps syncing.
            quiet = model.no_sync() if engine == "ddp" and not last else contextlib.nullcontext()
            picks = torch.randint(len(world.retain), (cfg.retain_batch,), generator=batches)
            forget = shard(world.forget.tensor_split(accumulate)[micro], rank, world_size)
            retain = shard(world.retain[picks.to(device)], rank, world_size)
            with quiet:
                opt.backward_forget(-nll(model, world, forget) / accumulate)  # gradient ascent
                opt.backward_retain(nll(model, world, retain) / accumulate)
        opt.step()
    seconds = time.perf_counter() - start
    after = evaluate(model, world)  # FSDP2: a collective forward, so every rank runs it
    geometry = opt.geometry  # global (all ranks, all shards): the same on every rank
    same = identical_on_all_ranks(full_parameters(model))
    if rank == 0:
        print(f"engine={engine} rule={rule} ranks={world_size} steps={cfg.steps} accumulate={accumulate}")
        for when, acc in (("before:", before), ("after:", after)):
            print(
                f"  {when:<7} forget {pct(acc.forget)}  retain {pct(acc.retain)}  neighb {pct(acc.neighbour)}"
            )
        print(f"  {seconds:.1f}s; last step: cos(g,r) {geometry.cos_gr:.3f}, cos(f,r) {geometry.cos_fr:.3f}")
        print(f"  parameters bit-identical on all ranks: {'yes' if same else 'NO'}", flush=True)
    if not same:
        raise SystemExit("ranks diverged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", nargs="+", choices=["ddp", "fsdp2"], default=["ddp"])
    parser.add_argument("--rule", default="sago", choices=available_rules())
    parser.add_argument("--steps", type=int, default=None, help="unlearning steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per task and step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny world and few steps (a smoke test)")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit(
            f"launch with torchrun, e.g.: torchrun --standalone --nproc-per-node 2 {sys.argv[0]}"
        )
    cfg = QUICK if args.quick else FULL
    if args.quick:
        cfg = replace(cfg, pretrain_steps=100, steps=10)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        world = build_world(cfg, torch.Generator().manual_seed(args.seed))
        for engine in args.engine:
            unlearn(engine, args.rule, cfg, world, args.seed, args.accumulate)
    finally:
        # Free the DDP/FSDP2 models (reference cycles) while the process group is alive: torch 2.13
        # sometimes aborts at exit ("terminate called without an active exception") otherwise.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
