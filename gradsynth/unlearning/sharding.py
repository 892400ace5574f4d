"""How the unlearning loop spreads one run over the ranks of a process group: DDP, FSDP2 or DeepSpeed.

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
- ``deepspeed``: a ``deepspeed.initialize`` engine at ZeRO stage 0-3 (`deepspeed_steps`) over the
  `gradsynth.optim.SynthesizingOptimizer`, driven by
  `gradsynth.integrations.deepspeed_tasks.DeepSpeedTasks` (`DeepSpeedSteps`): each task's reduced
  gradient is read out of the engine after its backward, and the synthesized one written back
  before ``engine.step()``. At ZeRO-3 the parameters stay partitioned after the run, as under
  FSDP2 (the same forwards on every rank; `full_state_dict` gathers them); at stages 0-2 every
  rank holds the whole updated model.

All three average the ranks' gradients, so the loop's per-rank loss weights
(`gradsynth.unlearning.loop.shard_weight`) serve all three.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradsynth.unlearning.rmu import decoder_layers

SHARDINGS = ("ddp", "fsdp2", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)


def wrap(model: nn.Module, sharding: str) -> nn.Module:
    """The module the losses run: ``model`` under DDP, or ``model`` itself sharded in place (FSDP2).

    Collective: every rank calls it, with the same model."""
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, broadcast_buffers=False)
    if sharding != "fsdp2":  # DeepSpeed's engine needs the optimizer: `deepspeed_steps`
        raise ValueError(f"wrap shards with ddp or fsdp2; got {sharding!r}")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def deepspeed_steps(
    model: nn.Module, optimizer: Any, zero: dict[str, Any], micro_batch: int, grad_accum: int
) -> DeepSpeedSteps:
    """``model`` in a DeepSpeed engine over ``optimizer`` (a `SynthesizingOptimizer`), with ``zero`` as
    its ``zero_optimization`` section (``{"stage": 3}``, and any tuning key DeepSpeed takes).

    Collective: every rank calls it, with the same model, after the process group is up. The rest
    of the config is the loop's own: no clipping (DeepSpeed clips at 1.0 by default; one process
    does not clip), fp32. The batch sizes only feed DeepSpeed's bookkeeping: the loop feeds the
    batches itself. ZeRO offload is refused (by `DeepSpeedTasks`: measured wrong)."""
    if zero.get("stage") not in ZERO_STAGES:
        raise ValueError(f"zero_optimization's stage must be one of {ZERO_STAGES}; got {zero.get('stage')!r}")
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": dict(zero),
        "zero_allow_untested_optimizer": True,  # the client optimizer is a SynthesizingOptimizer
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return DeepSpeedSteps(engine)


class DeepSpeedSteps:
    """The loop's optimizer calls (``zero_grad``, ``backward_forget``/``backward_retain``, ``step``,
    ``geometry``) on a DeepSpeed engine, through `DeepSpeedTasks`.

    ``engine`` runs the losses' forwards. The loop already divides each loss by its accumulation
    count, so the engine's own division is turned off (``scale_wrt_gas=False``), and the loop
    says when its window ends (``step``)."""

    def __init__(self, engine: Any) -> None:
        from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

        self.engine = engine
        self.tasks = DeepSpeedTasks(engine)

    def zero_grad(self) -> None:
        """Nothing to clear: `DeepSpeedTasks` empties the engine's gradients after each backward
        and takes its task sums out when it steps."""

    def backward_forget(self, loss: Tensor) -> None:
        self.tasks.backward_forget(loss, scale_wrt_gas=False)

    def backward_retain(self, loss: Tensor) -> None:
        self.tasks.backward_retain(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.tasks.step(boundary=True)

    @property
    def applied(self) -> bool:
        """Whether the last step updated the weights. At ZeRO-1/2/3 the engine skips a step whose
        gradient is non-finite on any rank (one process would have applied it and diverged)."""
        return bool(self.engine.was_step_applied())

    @property
    def geometry(self) -> Any:
        return self.tasks.geometry


def _zero3(p: Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 partitioned parameter (its data is this rank's ``ds_tensor``)."""
    return hasattr(p, "ds_tensor")


def is_sharded(module: Any) -> bool:
    """Whether ``module`` is (or contains at its root) an FSDP2 module, or holds ZeRO-3 partitions."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or any(_zero3(p) for p in module.parameters())


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
    """The FSDP2 or ZeRO-3 ``model``'s whole weights, gathered into CPU memory on rank 0 (empty elsewhere).

    Collective: every rank calls it. Gathered one parameter at a time, so rank 0 needs the model's
    size in host memory and no more than one parameter whole on the device. A tied parameter
    (output layer = embeddings) is kept under its first name only, as ``save_pretrained`` writes an
    unsharded model: gathered apart, the two copies no longer share storage for it to see."""
    if any(_zero3(p) for p in model.parameters()):
        state = _zero3_state_dict(model)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def _zero3_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`full_state_dict` at ZeRO-3: each partitioned tensor of ``model.state_dict()`` gathered in turn
    (``deepspeed.zero.GatheredParameters``, every rank), copied to rank 0's CPU memory."""
    import deepspeed
    import torch.distributed as dist

    keep = dist.get_rank() == 0
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        with deepspeed.zero.GatheredParameters([tensor] if _zero3(tensor) else []):
            if keep:
                state[name] = tensor.detach().to("cpu", copy=True)
    return state


def non_finite_parameter(model: nn.Module) -> str | None:
    """The name of a parameter holding NaN or inf (None if none), the same answer on every rank.

    Under FSDP2 and ZeRO-3 each rank checks its own shards; one all-reduce tells every rank
    whether any is bad, so that all of them raise (or none does)."""
    from torch.distributed.tensor import DTensor

    bad, sharded = None, False
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p.ds_tensor if _zero3(p) else p
        sharded = sharded or isinstance(p, DTensor) or _zero3(p)
        if bad is None and not bool(torch.isfinite(local).all()):
            bad = name
    if not sharded:
        return bad
    import torch.distributed as dist

    flag = torch.tensor([0.0 if bad is None else 1.0], device=local.device)
    dist.all_reduce(flag)
    return (bad or "a parameter sharded on another rank") if float(flag) else None
