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
- **DeepSpeed** (ZeRO stage 0-3): supported through the engine, not through ``p.grad``: the
  engine adds every backward of a step into its own reduced, partitioned buffers and hands the
  optimizer flat fp32 partitions, so `gradsynth.integrations.deepspeed_tasks.DeepSpeedTasks`
  reads each task's gradient out of the engine after its backward and writes ``g`` back before
  ``engine.step()`` (the Trainer and `AcceleratedTasks` use it by themselves). Refused by
  `check_engine`: ZeRO with ``offload_optimizer`` / ``offload_param`` (untested), and any other
  stage.

Nothing here imports DeepSpeed, Accelerate or Transformers: objects are recognised by the
module their class comes from and by the attributes those libraries set.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["UnsupportedEngineError", "check_engine"]

#: Attributes through which wrappers reach what they wrap: DeepSpeed engines (``module``,
#: ``optimizer``), Accelerate's wrappers (``engine``, ``optimizer``), HF Trainer (``model``,
#: ``model_wrapped``, ``optimizer``).
_WRAPPED = ("module", "model", "model_wrapped", "engine", "optimizer")

_FIX = (
    "Remove the offload from zero_optimization (or shard with PyTorch FSDP2, "
    "torch.distributed.fsdp.fully_shard, which supports CPU offload of parameters); see the "
    "'Scaling out' page of the docs."
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
            "live in host or NVMe buffers, a path gradsynth has not tested"
        )
    return None


def check_engine(*objects: object) -> None:
    """Raise `UnsupportedEngineError` when any object runs under an engine gradsynth cannot serve.

    Pass what the training code holds: the model (wrapped or not), the optimizer, the
    ``Accelerator``, the ``Trainer``; wrapped objects are followed through their ``module``,
    ``model``, ``model_wrapped``, ``engine`` and ``optimizer`` attributes. Plain, DDP, FSDP2 and
    DeepSpeed ZeRO-0/1/2/3 engines pass (DeepSpeed through
    `gradsynth.integrations.deepspeed_tasks`); a DeepSpeed engine with ZeRO offload is refused.
    """
    for obj in objects:
        for item in _walk(obj):
            found = _deepspeed_refusal(item)
            if found is not None:
                raise UnsupportedEngineError(f"gradsynth cannot run under {found}. {_FIX}")
