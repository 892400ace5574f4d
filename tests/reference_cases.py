"""What the 2-process test of the sharded KL reference runs on each rank (CPU, gloo).

The same unlearning run (gradient ascent on forget batches, the KL retain loss, AdamW, a few
steps) twice per engine: once with a replicated frozen full copy as the reference, once with
the reference sharded like the model. The reference's forward gathers the same numbers the copy
holds, so the runs must end bit-identical. Not a test module itself: ``test_reference_models.py``
runs it.
"""

from __future__ import annotations

import copy

import torch
from hf_helpers import VOCAB, tiny_llama

from gradsynth import SynthesizingOptimizer
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

STEPS, PER_RANK, LENGTH = 3, 2, 8
LOSSES = LossSettings(forget="ga", retain="kl")


def _batch(step: int, task: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * task + rank)
    ids = torch.randint(0, VOCAB, (PER_RANK, LENGTH), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _whole(params) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]


def _fsdp2_run(rank: int, world: int, sharded: bool, offload: bool = False) -> list[torch.Tensor]:
    """Unlearn the FSDP2 model; returns its whole parameters (and checks the reference stayed put)."""
    from torch.distributed.device_mesh import init_device_mesh

    from gradsynth.integrations.sharded_reference import fsdp2_reference

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    full_copy = None if sharded else copy.deepcopy(model).eval().requires_grad_(False)
    model = _fsdp2(model, mesh)
    if sharded:
        with torch.device("meta"):
            skeleton = tiny_llama()
        reference = fsdp2_reference(model, skeleton, offload=offload)
        held = sum(p.to_local().numel() for p in reference.parameters())
        assert 2 * held <= sum(p.numel() for p in before) + 2 * world, f"reference not sharded: {held}"
    else:
        reference = full_copy
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), "sago")
    for step in range(STEPS):
        opt.backward_forget(forget_loss(model, _batch(step, 0, rank), LOSSES))
        opt.backward_retain(retain_loss(model, _batch(step, 1, rank), LOSSES, reference))
        opt.step()
        opt.zero_grad()
    for a, b in zip(_whole(reference.parameters()), before, strict=True):
        assert torch.equal(a, b), "the reference moved with the model"
    return _whole(model.parameters())


def _zero3_run(rank: int, world: int, sharded: bool) -> list[torch.Tensor]:
    import deepspeed
    import deepspeed_cases

    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks
    from gradsynth.integrations.sharded_reference import zero3_reference

    model = tiny_llama()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)  # before ZeRO-3 partitions the model
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), "sago")
    config = deepspeed_cases.config(
        3, world, train_micro_batch_size_per_gpu=PER_RANK, gradient_accumulation_steps=1
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    reference = zero3_reference(frozen, engine) if sharded else frozen
    if sharded:
        held = sum(p.ds_tensor.numel() for p in reference.module.parameters())
        assert 2 * held <= sum(p.ds_numel for p in reference.module.parameters()) + 2 * world, held
    tasks = DeepSpeedTasks(engine)
    for step in range(STEPS):
        tasks.backward_forget(forget_loss(engine, _batch(step, 0, rank), LOSSES))
        tasks.backward_retain(retain_loss(engine, _batch(step, 1, rank), LOSSES, reference))
        assert tasks.step()
    return deepspeed_cases.full_parameters(engine)


def sharded_reference_case(rank: int, world: int) -> None:
    """FSDP2 and ZeRO-3: the sharded reference gives the full copy's run, bit for bit."""
    import distributed_cases as cases

    want = _fsdp2_run(rank, world, sharded=False)
    for offload in (False, True):
        got = _fsdp2_run(rank, world, sharded=True, offload=offload)
        where = f"FSDP2 sharded reference (offload {offload})"
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), f"{where}: off the full copy's run by {float((a - b).abs().max())}"
        cases.assert_same_on_every_rank(got, where)

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    import deepspeed_cases

    deepspeed_cases.setup_deepspeed(rank, world)
    want = _zero3_run(rank, world, sharded=False)
    got = _zero3_run(rank, world, sharded=True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (
            f"ZeRO-3 sharded reference: off the full copy's run by {float((a - b).abs().max())}"
        )
    cases.assert_same_on_every_rank(got, "ZeRO-3 sharded reference")
