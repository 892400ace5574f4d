"""Refuse a multi-process launch that Accelerate runs as something else.

A launcher (``accelerate launch``, ``torchrun``) tells each process how many were started in
``WORLD_SIZE``, and ``accelerate launch`` tells it the engine the config file named
(``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``). Accelerate can then quietly run
something else, measured on a machine without GPUs with the configs of ``examples/accelerate/``:

- ``use_cpu: false``: every process joins no process group, counts itself alone
  (``DistributedType.NO``) and trains on the whole data set: 2 processes, 2 independent runs,
  4.4e-2 off the one-process result, no warning;
- ``distributed_type: FSDP`` with ``use_cpu: true``: Accelerate's FSDP path is for accelerators
  only, so it runs plain data parallelism (``MULTI_CPU``) instead of sharding;
- DeepSpeed without a GPU: Accelerate names no process-group backend, DeepSpeed joins all
  processes anyway, and Accelerate counts one.

`refuse_mismatched_launch` turns each into one error that names the setting to change.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["LaunchMismatchError", "refuse_mismatched_launch"]


class LaunchMismatchError(RuntimeError):
    """The processes the launcher started are not the run Accelerate is about to do."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _launched_processes() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def refuse_mismatched_launch(accelerator: Any) -> None:
    """Raise `LaunchMismatchError` if ``accelerator`` does not run what the launcher started.

    Checks, in order: the processes Accelerate counts against ``WORLD_SIZE``; the engine it runs
    against the one ``accelerate launch`` was configured for (FSDP, DeepSpeed); and, under
    DeepSpeed, the size of the process group DeepSpeed joined against Accelerate's count.
    """
    engine = getattr(getattr(accelerator, "distributed_type", None), "name", None)
    running = int(getattr(accelerator, "num_processes", 1))
    launched = _launched_processes()
    if engine == "DEEPSPEED" or getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
        _refuse_lone_deepspeed_process(running, launched)
    if launched > 1 and running != launched:
        raise LaunchMismatchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate runs "
            f"each as {running} of {running} (engine {engine}), so each would train alone on all the "
            "data: on a machine without GPUs set use_cpu: true in the accelerate config file (or pass "
            "--cpu to accelerate launch), or run on GPUs"
        )
    if _flag("ACCELERATE_USE_FSDP") and engine not in (None, "FSDP"):
        raise LaunchMismatchError(
            f"the accelerate config names distributed_type: FSDP but Accelerate runs {engine} (its FSDP "
            "path is for accelerators only, so on CPUs it falls back to data parallelism): on CPUs use "
            "distributed_type: MULTI_CPU (examples/accelerate/ddp.yaml) or fully_shard under torchrun "
            "(docs/scaling.md)"
        )
    if _flag("ACCELERATE_USE_DEEPSPEED") and engine not in (None, "DEEPSPEED"):
        raise LaunchMismatchError(
            f"the accelerate config names distributed_type: DEEPSPEED but Accelerate runs {engine}: "
            "remove use_cpu: true (DeepSpeed picks its own device) or Accelerator(cpu=True)"
        )


def _refuse_lone_deepspeed_process(running: int, launched: int) -> None:
    import torch.distributed as dist

    joined = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launched
    if joined != running:
        raise LaunchMismatchError(
            f"DeepSpeed joined {joined} processes but Accelerate counts {running} (without "
            "a GPU Accelerate names no process-group backend under DeepSpeed): name one, "
            'Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]); with the Trainer, '
            'PartialState(backend="gloo") before TrainingArguments(..., accelerator_config='
            '{"use_configured_state": True})'
        )
