"""Which distributed engines the optimizer shell runs under, and a check that refuses the rest.

The shell needs each task's gradient, reduced over the data-parallel ranks, in ``p.grad`` after
that task's backward:

- **DDP** (``DistributedDataParallel``): every backward all-reduces ``p.grad``; supported,
  also with ``no_sync`` gradient accumulation and ``gradient_as_bucket_view=True``.
- **FSDP2** (``torch.distributed.fsdp.fully_shard``): every backward reduce-scatters into a
  sharded DTensor ``p.grad``; supported. Elementwise rules run on the local shard; PCGrad's
  inner products are DTensor partial sums that reduce globally. Accumulating with
  ``set_requires_gradient_sync(False)`` is *not* supported: FSDP2 then adds every backward,
  of both tasks, into one private unsharded buffer.
- **FSDP1** (``FullyShardedDataParallel``, what Accelerate and the Trainer build unless told
  ``fsdp_version: 2``): refused by `check_engine` and by `refuse_fsdp1`. Each backward
  reduce-scatters into the flat parameter's own gradient, which is *added to* when it already
  exists, and ``p.grad`` (with ``use_orig_params=True``) is only a view into that flat buffer: a
  task stash taken from ``p.grad`` would receive the other task's gradient too. Its shards are
  plain tensors, so PCGrad's inner products would silently be this rank's partial sums.
- **DeepSpeed** (ZeRO stage 0-3): supported through the engine, not through ``p.grad``: the
  engine adds every backward of a step into its own reduced, partitioned buffers and hands the
  optimizer flat fp32 partitions, so `gradsynth.integrations.deepspeed_tasks.DeepSpeedTasks`
  reads each task's gradient out of the engine after its backward and writes ``g`` back before
  ``engine.step()`` (the Trainer and `AcceleratedTasks` use it by themselves). Refused by
  `check_engine`: ZeRO with ``offload_optimizer`` / ``offload_param`` (measured wrong, below),
  and any other stage.

ZeRO offload was measured with DeepSpeed 0.19.8 on 2 CPU ranks (its CPU accelerator, gloo, SGD
with momentum, accumulation 2): plain DeepSpeed with ``offload_optimizer`` at ZeRO-2 and -3 (and
``offload_param`` at ZeRO-3) matched one process to 1e-7, but the per-task recipe above did not,
even for the linear ``sum`` rule (relative error 1.3-3.6, 1.05-3.6 over sago, pcgrad and sum; 1e-7
without offload): the offloaded engine keeps its own host-side gradient buffers, which the read /
clear / write-back functions do not reach.

Nothing here imports DeepSpeed, Accelerate or Transformers: objects are recognised by the
module their class comes from and by the attributes those libraries set.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["UnsupportedEngineError", "check_engine", "refuse_fsdp1"]

#: Attributes through which wrappers reach what they wrap: DeepSpeed engines (``module``,
#: ``optimizer``), Accelerate's wrappers (``engine``, ``optimizer``), HF Trainer (``model``,
#: ``model_wrapped``, ``optimizer``).
_WRAPPED = ("module", "model", "model_wrapped", "engine", "optimizer")

_FIX = (
    "Remove the offload from zero_optimization (or shard with PyTorch FSDP2, "
    "torch.distributed.fsdp.fully_shard, which supports CPU offload of parameters); see the "
    "'Scaling out' page of the docs."
)


_FSDP1_FIX = (
    "Use FSDP2: fsdp_version: 2 in the Accelerate config (FullyShardedDataParallelPlugin(fsdp_version=2)), "
    'fsdp_config={"version": 2} in TrainingArguments, or torch.distributed.fsdp.fully_shard in your own '
    "code; see the 'Scaling out' page of the docs."
)


class UnsupportedEngineError(RuntimeError):
    """A distributed engine under which the task gradients cannot be kept apart."""


def _root_module(obj: object) -> str:
    return type(obj).__module__.split(".")[0]


def _walk(obj: object, depth: int = 4) -> Iterator[object]:
    """``obj`` and what it wraps, a few levels down; each object once."""
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        item, level = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if level < depth:
            todo.extend((getattr(item, name, None), level + 1) for name in _WRAPPED)


def _offloaded(engine: object) -> list[str]:
    """The ZeRO offloads an engine is configured with (``"offload_optimizer to cpu"``, ...)."""
    found = []
    for name in ("offload_optimizer", "offload_param"):
        getter = getattr(engine, f"zero_{name}", None)
        config = getter() if callable(getter) else None
        device = getattr(getattr(config, "device", None), "value", getattr(config, "device", "none"))
        if config is not None and str(device) != "none":
            found.append(f"{name} to {device}")
    return found


def _deepspeed_refusal(obj: object) -> str | None:
    """Why gradsynth cannot run under the DeepSpeed engine ``obj``, or None (not one, or supported)."""
    stage = getattr(obj, "zero_optimization_stage", None)
    if _root_module(obj) != "deepspeed" or not callable(stage):
        return None
    if stage() not in (0, 1, 2, 3):
        return f"a DeepSpeed engine with ZeRO stage {stage()}, which gradsynth does not know"
    offloaded = _offloaded(obj)
    if offloaded:
        return (
            f"a DeepSpeed engine with ZeRO stage {stage()} and {' and '.join(offloaded)}: the gradients then "
            "live in host buffers that DeepSpeed's per-parameter gradient functions do not reach (measured: "
            "each task's gradient read out of the engine and g written back ended with relative errors "
            "of 1-3.6, where DeepSpeed alone with the same offload was exact)"
        )
    return None


def _fsdp1(obj: object) -> str | None:
    """A description of the FSDP1 setup ``obj`` belongs to, or None (FSDP2 and DDP give None)."""
    name = type(obj).__name__
    if name == "FullyShardedDataParallel" and type(obj).__module__.startswith("torch.distributed.fsdp"):
        return "a FullyShardedDataParallel (FSDP1) module"
    if name == "FlatParameter" or getattr(obj, "_fsdp_flattened", False) is True:
        return "an FSDP1 flat parameter"
    distributed = str(getattr(getattr(obj, "distributed_type", None), "name", ""))
    if distributed == "FSDP" and getattr(obj, "is_fsdp2", True) is False:
        return f"an {name} with FSDP1 (fsdp_version 1)"
    accelerator = getattr(obj, "accelerator", None)
    if getattr(obj, "is_fsdp_enabled", False) is True and getattr(accelerator, "is_fsdp2", True) is False:
        return f"a {name} with FSDP1 (fsdp_version 1)"
    for p in _first_parameters(obj):
        if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False) is True:
            return "FSDP1 flat parameters"
    return None


def _first_parameters(obj: object, n: int = 4) -> list[object]:
    """A few of the parameters of a module or an optimizer (FSDP1 flattens all or none)."""
    parameters = getattr(obj, "parameters", None)
    if callable(parameters):
        try:
            return [p for _, p in zip(range(n), parameters(), strict=False)]
        except TypeError:
            return []
    groups = getattr(obj, "param_groups", None)
    if isinstance(groups, list):
        return [p for g in groups if isinstance(g, dict) for p in g.get("params", ())][:n]
    return []


def refuse_fsdp1(*objects: object) -> None:
    """Raise `UnsupportedEngineError` when any object (or what it wraps) runs under FSDP1."""
    for obj in objects:
        for item in _walk(obj):
            found = _fsdp1(item)
            if found is not None:
                raise UnsupportedEngineError(
                    f"gradsynth cannot run under FSDP1 (found {found}): FSDP1 adds every backward into one "
                    "flat gradient buffer that p.grad only views, so the forget and retain gradients cannot "
                    "be kept apart, and its shards give PCGrad this rank's partial inner products. "
                    f"{_FSDP1_FIX}"
                )


def check_engine(*objects: object) -> None:
    """Raise `UnsupportedEngineError` when any object runs under an engine gradsynth cannot serve.

    Pass what the training code holds: the model (wrapped or not), the optimizer, the
    ``Accelerator``, the ``Trainer``; wrapped objects are followed through their ``module``,
    ``model``, ``model_wrapped``, ``engine`` and ``optimizer`` attributes. Plain, DDP, FSDP2 and
    DeepSpeed ZeRO-0/1/2/3 engines pass (DeepSpeed through
    `gradsynth.integrations.deepspeed_tasks`); a DeepSpeed engine with ZeRO offload is refused, and
    so is FSDP1 (`refuse_fsdp1`).
    """
    refuse_fsdp1(*objects)
    for obj in objects:
        for item in _walk(obj):
            found = _deepspeed_refusal(item)
            if found is not None:
                raise UnsupportedEngineError(f"gradsynth cannot run under {found}. {_FIX}")
