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
- **DeepSpeed** (any ZeRO stage): refused by `check_engine`. The engine adds every backward of
  a step into its own reduced (ZeRO-1/2: partitioned) buffers, outside ``p.grad``, and hands
  the optimizer flat fp32 partitions: the two task gradients cannot be told apart any more.

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
    "Shard with PyTorch FSDP2 instead (torch.distributed.fsdp.fully_shard, the ZeRO-3 layout, "
    "supported) or replicate with DistributedDataParallel; see the 'Scaling out' page of the docs."
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


def _deepspeed_stage(obj: object) -> str | None:
    """A description of the DeepSpeed setup ``obj`` belongs to, or None."""
    stage = getattr(obj, "zero_optimization_stage", None)
    if _root_module(obj) == "deepspeed" and callable(stage):
        return f"a DeepSpeed engine with ZeRO stage {stage()}"
    name = type(obj).__name__
    if _root_module(obj) == "deepspeed":
        return f"DeepSpeed's {name}" + (" (ZeRO-3)" if "Stage3" in name else "")
    if _root_module(obj) == "accelerate" and name.startswith("DeepSpeed"):
        return f"Accelerate's {name}"
    if getattr(obj, "is_deepspeed_enabled", False) is True:
        return f"a {name} with DeepSpeed enabled"
    if str(getattr(getattr(obj, "distributed_type", None), "name", "")) == "DEEPSPEED":
        return f"an {name} with DeepSpeed enabled"
    return None


def _zero3_parameter(obj: object) -> bool:
    """True when ``obj`` (a module or an optimizer) holds a ZeRO-3 partitioned parameter."""
    parameters = getattr(obj, "parameters", None)
    if callable(parameters):
        try:
            return any(hasattr(p, "ds_id") for p in parameters())
        except TypeError:
            return False
    groups = getattr(obj, "param_groups", None)
    if isinstance(groups, list):
        return any(hasattr(p, "ds_id") for g in groups if isinstance(g, dict) for p in g.get("params", ()))
    return False


def check_engine(*objects: object) -> None:
    """Raise `UnsupportedEngineError` when any object runs under DeepSpeed; else do nothing.

    Pass what the training code holds: the model (wrapped or not), the optimizer, the
    ``Accelerator``, the ``Trainer``. Wrapped objects are followed through their ``module``,
    ``model``, ``model_wrapped``, ``engine`` and ``optimizer`` attributes, and a parameter
    that carries DeepSpeed's ZeRO-3 ``ds_id`` is recognised too. DDP and FSDP2 pass.
    """
    for obj in objects:
        for item in _walk(obj):
            found = _deepspeed_stage(item) or (
                "ZeRO-3 partitioned parameters" if _zero3_parameter(item) else None
            )
            if found is not None:
                raise UnsupportedEngineError(
                    f"gradsynth cannot run under DeepSpeed (found {found}): DeepSpeed adds the gradients "
                    "of every backward in a step into its own reduced, partitioned buffers instead of "
                    "p.grad, so the forget and retain gradients can no longer be told apart, and the "
                    f"synthesis would act on a mixed or partial gradient. {_FIX}"
                )
