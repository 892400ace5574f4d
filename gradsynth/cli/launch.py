"""``torchrun --nproc-per-node N -m gradsynth.cli unlearn ...``: one `unlearn` on N data-parallel processes.

A launcher that started several processes says so in ``WORLD_SIZE`` (and ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). Each process then joins one process group (gloo on the CPU, NCCL
on GPUs, one GPU per process: ``cuda:LOCAL_RANK``), loads the same model and data, draws the same
batches and trains on its slice of each under ``DistributedDataParallel``, with each rank's loss
weighted so that the averaged gradient is the whole batch's
(`gradsynth.unlearning.loop.shard_weight`): the run is the one-process run, to float32 rounding
of the sums. ``--sharding fsdp2`` shards the model with FSDP2 instead of DDP;
``--sharding deepspeed`` runs it in a DeepSpeed engine at ``--zero-stage`` (default 3), each task's
gradient read out of the engine and the synthesized one written back
(`gradsynth.unlearning.sharding`). ``--sharding`` without a launcher is refused. Every rank
evaluates (the same model, so the same numbers; under FSDP2 and ZeRO-3 the same forwards in
lockstep); rank 0 alone prints the tables and writes ``--out`` (under FSDP2 and ZeRO-3 the weights
gathered from every rank); the others write nothing.

DeepSpeed on the CPU builds its shared-memory communication op with g++ the first time an engine
starts on a machine (about 80 s; cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and loaded from there afterwards). gradsynth leaves that to DeepSpeed.

Refused under several processes, each in one line: ``--batch-size`` not a multiple of the process
count, LoRA (the adapters-off reference of a wrapped model), RMU (its hooks on the layers), the
audit and lm-eval tasks (single-process evaluations), and checkpoints (``--save-every``,
``--resume``); under DeepSpeed also ``--dtype`` other than float32 (DeepSpeed's own bf16/fp16
settings are not wired through the command). ``--zero-stage`` without ``--sharding deepspeed``,
and ``--sharding deepspeed`` without DeepSpeed installed, are refused in any run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from gradsynth.cli.errors import CliError


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def is_writer() -> bool:
    """Whether this process writes the output: the only one, or rank 0 of a launch."""
    return launched_processes() == 1 or _env_int("RANK", 0) == 0


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process run, and the device it trains on."""

    rank: int
    world: int
    device: str


def sharding_of(args: argparse.Namespace) -> str:
    """How the ranks share the model: ``--sharding``, or DDP."""
    return getattr(args, "sharding", None) or "ddp"


def zero_stage_of(args: argparse.Namespace) -> int:
    """The ZeRO stage of ``--sharding deepspeed``: ``--zero-stage``, or 3 (everything partitioned)."""
    stage = getattr(args, "zero_stage", None)
    return 3 if stage is None else stage


def check_launch_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, what a multi-process `unlearn` does not run."""
    world = launched_processes()
    sharding = getattr(args, "sharding", None)
    if getattr(args, "zero_stage", None) is not None and sharding != "deepspeed":
        raise CliError(
            f"--zero-stage {args.zero_stage} is a DeepSpeed setting; add --sharding deepspeed (under "
            "torchrun), or drop --zero-stage"
        )
    if world == 1:
        if sharding is not None:
            raise CliError(
                f"--sharding {sharding} shares the model between several processes, and this is one "
                f"(WORLD_SIZE unset or 1); start them with torchrun --nproc-per-node N -m gradsynth.cli "
                f"unlearn ... --sharding {sharding}, or drop --sharding"
            )
        return
    if sharding == "deepspeed":
        _check_deepspeed(args)
    where = f"under {world} processes (WORLD_SIZE={world})"
    refused = [
        (args.lora_rank is not None, "--lora-rank"),
        (args.forget_loss == "rmu", "--forget-loss rmu"),
        (bool(args.audit), "--audit"),
        (bool(args.eval_tasks), "--eval-tasks"),
        (bool(args.save_every), "--save-every"),
        (args.resume is not None, "--resume"),
    ]
    for given, flag in refused:
        if given:
            raise CliError(f"{flag} is not offered {where}; run it in one process, or drop {flag}")
    if args.batch_size % world:
        fits = world * max(1, args.batch_size // world)
        raise CliError(
            f"--batch-size {args.batch_size}: not a multiple of the {world} processes; each rank trains "
            f"on an equal slice of every batch, so give e.g. --batch-size {fits}"
        )


def _check_deepspeed(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise CliError(
            "--sharding deepspeed: DeepSpeed is not installed; pip install deepspeed, or use "
            "--sharding ddp or fsdp2"
        )
    if args.dtype != "float32":
        raise CliError(
            f"--dtype {args.dtype} is not offered with --sharding deepspeed (DeepSpeed's own bf16/fp16 "
            "settings are not wired through the command); use --dtype float32, or --sharding ddp or fsdp2"
        )


def join(device: str) -> Launch | None:
    """Join the launcher's process group (None when this is the only process)."""
    world = launched_processes()
    if world == 1:
        return None
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{_env_int('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend)
    except (RuntimeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CliError(
            f"WORLD_SIZE={world}: could not join the process group ({reason}); start the processes "
            "with torchrun --nproc-per-node N -m gradsynth.cli unlearn ..."
        ) from err
    if dist.get_world_size() != world:
        raise CliError(
            f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes; start them "
            "with torchrun"
        )
    return Launch(dist.get_rank(), world, device)


def leave(launch: Launch | None) -> None:
    """Leave the process group joined by `join`."""
    if launch is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
