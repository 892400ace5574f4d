r"""The frozen reference model of the KL retain loss, sharded like the model (FSDP2, ZeRO-3).

The KL retain loss compares the model with ``pi_ref``, the model from before unlearning, on every
retain batch. A replicated frozen copy costs a whole model per rank; sharded like the model it
costs ``1/world`` of one (or nothing on the device with CPU offload), and each forward gathers
the parameters layer by layer as the model's own forward does. The reference's logits are those
of the full copy: the gathered parameters are the same numbers, run through the same forward.

- **FSDP2**: `fsdp2_reference` applies ``fully_shard`` to a *skeleton* of the model (the same
  architecture, best built on the meta device, so it costs no memory) at the modules where the
  model has it, on the model's mesh, and copies each rank's local shards of the model's
  parameters into it: no rank ever holds a full copy.
- **ZeRO-3**: `zero3_reference` wraps a frozen copy of the model in a DeepSpeed ZeRO-3 engine
  without an optimizer, which partitions its parameters over the ranks (DeepSpeed's own way to
  hold a reference model). The copy must be taken *before* ``deepspeed.initialize`` partitions the
  model; it is whole on every rank until this engine partitions it (build it under
  ``deepspeed.zero.Init()`` to avoid even that).

Both return a module to call as ``reference(input_ids=..., attention_mask=...)``, in eval mode and
without gradients, e.g. as ``unlearn(..., reference=...)`` or in a custom loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fsdp2_reference", "zero3_reference"]


def fsdp2_reference(model: nn.Module, skeleton: nn.Module, *, offload: bool = False) -> nn.Module:
    """A frozen copy of the FSDP2 ``model`` from its current parameters, sharded as ``model`` is.

    Args:
        model: the model after ``fully_shard`` (and before unlearning changes it).
        skeleton: an unsharded module of the same architecture and parameter names, e.g.
            ``with torch.device("meta"): skeleton = AutoModelForCausalLM.from_config(config)``.
            It is sharded in place and returned; its own values are never read.
        offload: keep the reference's shards in CPU memory (``CPUOffloadPolicy``); each forward
            copies one layer's shards to the device and gathers them there.

    Collective: every rank calls it, on the same modules.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    sharded = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    local = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not sharded or not local:
        raise TypeError(
            f"{type(model).__name__} is not sharded by fully_shard (FSDP2): fsdp2_reference copies its "
            "shards; for an unsharded model pass a frozen copy as the reference"
        )
    mesh, device = local[0].device_mesh, local[0].to_local().device
    # Pinned host memory needs an accelerator; without one the shards stay in plain CPU memory.
    policy = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if offload else OffloadPolicy()
    skeleton.requires_grad_(False)
    for name in reversed(sharded):  # inner modules first, as fully_shard requires
        fully_shard(skeleton.get_submodule(name), mesh=mesh, offload_policy=policy)
    skeleton.to_empty(device="cpu" if offload else device)
    with torch.no_grad():
        for name, param in skeleton.named_parameters():
            source = model.get_parameter(name)
            target = param.to_local() if isinstance(param, DTensor) else param
            target.copy_(source.to_local() if isinstance(source, DTensor) else source)
        # Buffers (rotary frequencies, ...) are not sharded, and to_empty left them unset.
        for name, buffer in skeleton.named_buffers():
            buffer.copy_(model.get_buffer(name))
    # FSDP2 leaves the root module's parameters (embeddings, output layer) gathered after its
    # forward, for the backward that a reference never runs: free them at once.
    skeleton.register_forward_hook(lambda module, args, output: module.reshard())
    return skeleton.eval()


def zero3_reference(reference: nn.Module, engine: Any, *, offload: bool = False) -> Any:
    """``reference`` (a frozen copy of the model) partitioned by a ZeRO-3 engine without optimizer.

    Args:
        reference: a copy of the model from before unlearning, taken before
            ``deepspeed.initialize`` partitioned the model (or built under ``deepspeed.zero.Init()``).
        engine: the training engine; its micro-batch size and bf16/fp16 settings are reused.
        offload: keep the reference's partitions in CPU memory (``offload_param``); the training
            engine itself must not offload (gradsynth refuses that, untested).

    Returns the reference's engine, in eval mode; call it as the model. Collective, like
    ``deepspeed.initialize``.
    """
    import deepspeed

    zero: dict[str, Any] = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(engine.bfloat16_enabled())},
        "fp16": {"enabled": bool(engine.fp16_enabled())},
        "steps_per_print": 10**9,
    }
    reference.requires_grad_(False)
    reference_engine, *_ = deepspeed.initialize(model=reference.eval(), config=config)
    reference_engine.eval()
    return reference_engine
