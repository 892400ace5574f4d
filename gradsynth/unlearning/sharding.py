"""How the unlearning loop spreads one run over the ranks of a process group: DDP or FSDP2.

- ``ddp``: every rank holds the whole model; ``DistributedDataParallel`` all-reduces (averages)
  each backward's gradients into ``p.grad``.
- ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the root
  (embeddings, final norm, output layer, tied or not), over a 1-D mesh of all the ranks. Each rank
  keeps ``1/world`` of every parameter, gradient and AdamW moment; each forward gathers a layer's
  parameters, each backward reduce-scatters (averages) its gradients into sharded DTensor
  ``p.grad``, on which `gradsynth.optim.SynthesizingOptimizer` synthesizes shard by shard (its
  inner products reduced over the mesh). The model stays sharded after the run: whatever runs it
  (the evaluations) must run the same forwards on every rank, and `full_state_dict` gathers the
  weights for saving.

Both average the ranks' gradients, so the loop's per-rank loss weights
(`gradsynth.unlearning.loop.shard_weight`) serve both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradsynth.unlearning.rmu import decoder_layers

SHARDINGS = ("ddp", "fsdp2")


def wrap(model: nn.Module, sharding: str) -> nn.Module:
    """The module the losses run: ``model`` under DDP, or ``model`` itself sharded in place (FSDP2).

    Collective: every rank calls it, with the same model."""
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, broadcast_buffers=False)
    if sharding != "fsdp2":
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}; got {sharding!r}")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(module: Any) -> bool:
    """Whether ``module`` is (or contains at its root) an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sharded_reference(model: nn.Module, reference: Any) -> Any:
    """The frozen KL/NPO reference sharded like the FSDP2 ``model``, from ``model``'s current shards.

    A plain frozen copy (``reference``) is used as the skeleton and its storage freed
    (`gradsynth.integrations.sharded_reference.fsdp2_reference`); anything else (a table, a model
    already sharded, None) is returned as it is. Collective; call before the first step."""
    if not isinstance(reference, nn.Module) or is_sharded(reference):
        return reference
    from gradsynth.integrations.sharded_reference import fsdp2_reference

    return fsdp2_reference(model, reference)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The FSDP2 ``model``'s whole weights, gathered into CPU memory on rank 0 (empty elsewhere).

    Collective: every rank calls it. Gathered one parameter at a time, so rank 0 needs the model's
    size in host memory and no more than one parameter whole on the device. A tied parameter
    (output layer = embeddings) is kept under its first name only, as ``save_pretrained`` writes an
    unsharded model: gathered apart, the two copies no longer share storage for it to see."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def non_finite_parameter(model: nn.Module) -> str | None:
    """The name of a parameter holding NaN or inf (None if none), the same answer on every rank.

    Under FSDP2 each rank checks its own shards; one all-reduce tells every rank whether any is
    bad, so that all of them raise (or none does)."""
    from torch.distributed.tensor import DTensor

    bad, sharded = None, False
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        sharded = sharded or isinstance(p, DTensor)
        if bad is None and not bool(torch.isfinite(local).all()):
            bad = name
    if not sharded:
        return bad
    import torch.distributed as dist

    flag = torch.tensor([0.0 if bad is None else 1.0], device=local.device)
    dist.all_reduce(flag)
    return (bad or "a parameter sharded on another rank") if float(flag) else None
