"""Peak memory per rank of the KL reference under FSDP2 and ZeRO-3: a replicated full copy against
one sharded like the model (`gradsynth.integrations.sharded_reference`).

Each configuration runs in fresh processes (2 CPU ranks, gloo): a Llama from a config (no
download), the reference made and the model sharded, 2 unlearning steps (gradient ascent, KL
retain loss, AdamW); per rank the peak resident memory (VmHWM) and the resident memory after the
steps, both minus the resident memory before the reference is made (the method of
``memory_reference.py``). Run::

    python benchmarks/memory_sharded_reference.py               # hidden 512, 8 layers
    python benchmarks/memory_sharded_reference.py --hidden 128 --layers 2
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

from memory_reference import _rss

CONFIGS = ["fsdp2-full-copy", "fsdp2-sharded", "zero3-full-copy", "zero3-sharded"]


def _model(hidden: int, layers: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _rank(rank: int, world: int, store: str, name: str, hidden: int, layers: int, results) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29598")
    import torch
    import torch.distributed as dist

    from gradsynth import SynthesizingOptimizer
    from gradsynth.integrations import sharded_reference
    from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    engine_kind, how = name.split("-", 1)
    model = _model(hidden, layers)
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), "sago")
    before = _rss("VmRSS")
    if engine_kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        reference = copy.deepcopy(model).eval().requires_grad_(False) if how == "full-copy" else None
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), "sago")
        if reference is None:
            with torch.device("meta"):
                skeleton = _model(hidden, layers)
            reference = sharded_reference.fsdp2_reference(model, skeleton)
        forward, backward_forget, backward_retain, step = (
            model,
            opt.backward_forget,
            opt.backward_retain,
            opt.step,
        )
    else:
        import deepspeed

        importlib_torch = __import__("importlib").import_module("deepspeed.comm.torch")
        importlib_torch.build_shm_op = lambda: None  # no g++ build; gloo does the collectives
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        reference = sharded_reference.zero3_reference(frozen, engine) if how == "sharded" else frozen
        del frozen
        from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

        tasks = DeepSpeedTasks(engine)
        forward, backward_forget, backward_retain, step = (
            engine,
            tasks.backward_forget,
            tasks.backward_retain,
            tasks.step,
        )
    losses = LossSettings(forget="ga", retain="kl")
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        batches = []
        for _task in range(2):
            ids = torch.randint(1, 4096, (4, 24), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        backward_forget(forget_loss(forward, batches[0], losses))
        backward_retain(retain_loss(forward, batches[1], losses, reference))
        step()
        if engine_kind == "fsdp2":
            opt.zero_grad()
    params_mib = sum(p.numel() * 4 for p in _model(hidden, layers).parameters()) / 2**20 if rank == 0 else 0.0
    results.put(
        (rank, round(_rss("VmHWM") - before, 1), round(_rss("VmRSS") - before, 1), round(params_mib, 1))
    )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    args = parser.parse_args()
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    import torch.multiprocessing as mp

    print("| configuration | parameters (MiB) | peak above start, per rank (MiB) | resident after (MiB) |")
    print("|---|---|---|---|")
    for name in args.configs:
        context = mp.get_context("spawn")
        results = context.Queue()
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(
                _rank,
                args=(2, f"{folder}/store", name, args.hidden, args.layers, results),
                nprocs=2,
                join=True,
            )
        rows = sorted(results.get() for _ in range(2))
        peak = " / ".join(str(row[1]) for row in rows)
        after = " / ".join(str(row[2]) for row in rows)
        print(f"| {name} | {rows[0][3]} | {peak} | {after} |", flush=True)


if __name__ == "__main__":
    main()
