"""``torchrun --nproc-per-node N -m gradsynth.cli unlearn ...``: one `unlearn` on N data-parallel processes.

A launcher that started several processes says so in ``WORLD_SIZE`` (and ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). Each process then joins one process group (gloo on the CPU, NCCL
on GPUs, one GPU per process: ``cuda:LOCAL_RANK``), loads the same model and data, draws the same
batches and trains on its slice of each under ``DistributedDataParallel``, with each rank's loss
weighted so that the averaged gradient is the whole batch's
(`gradsynth.unlearning.loop.shard_weight`): the run is the one-process run, to float32 rounding
of the sums. ``--sharding fsdp2`` shards the model with FSDP2 instead of DDP;
``--sharding deepspeed`` runs it in a DeepSpeed engine at ``--zero-stage`` (default 3; more ZeRO
keys from ``--deepspeed-config``'s ``zero_optimization`` section, `zero_config_of`), each task's
gradient read out of the engine and the synthesized one written back
(`gradsynth.unlearning.sharding`). ``--sharding`` without a launcher is refused. Every rank
evaluates (the same model, so the same numbers; under FSDP2 and ZeRO-3 the same forwards in
lockstep); rank 0 alone prints the tables and writes ``--out`` (under FSDP2 and ZeRO-3 the weights
gathered from every rank); the others write nothing.

DeepSpeed on the CPU builds its shared-memory communication op with g++ the first time an engine
starts on a machine (80 s to 3 min measured; cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and loaded from there afterwards). gradsynth leaves that build to
DeepSpeed and does not patch it out, although training never calls the op (only DeepSpeed's
``inference_all_reduce`` does): docs/cli.md says so.

Refused under several processes, each in one line: ``--batch-size`` not a multiple of the process
count, LoRA (the adapters-off reference of a wrapped model), RMU (its hooks on the layers), the
audit and lm-eval tasks (single-process evaluations), and checkpoints (``--save-every``,
``--resume``); under DeepSpeed also ``--dtype`` other than float32 (DeepSpeed's own bf16/fp16
settings are not wired through the command), ZeRO offload in ``--deepspeed-config`` (measured
wrong with the per-task recipe), any key of that file but ``zero_optimization``, and a stage
there that ``--zero-stage`` contradicts. ``--zero-stage`` or ``--deepspeed-config`` without
``--sharding deepspeed``, and ``--sharding deepspeed`` without DeepSpeed installed, are refused
in any run.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsynth.cli.errors import CliError
from gradsynth.unlearning.sharding import ZERO_STAGES


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


def zero_config_of(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section for ``--sharding deepspeed``: ``--deepspeed-config``'s,
    its stage from ``--zero-stage``, else the file's, else 3 (everything partitioned)."""
    path = getattr(args, "deepspeed_config", None)
    zero: dict[str, Any] = {}
    if path is not None:
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CliError(f"--deepspeed-config {path}: not a readable JSON file ({err})") from err
        if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
            raise CliError(
                f"--deepspeed-config {path}: expected a JSON object with a zero_optimization object"
            )
        other = sorted(set(config) - {"zero_optimization"})
        if other:
            raise CliError(
                f"--deepspeed-config {path}: {', '.join(other)} set by the command itself (batch sizes, "
                "fp32, no clipping, AdamW); give only a zero_optimization section"
            )
        zero = dict(config.get("zero_optimization", {}))
    stage = getattr(args, "zero_stage", None)
    if stage is not None and zero.get("stage", stage) != stage:
        raise CliError(
            f"--zero-stage {stage} and --deepspeed-config's stage {zero['stage']} disagree; give one of them"
        )
    zero["stage"] = stage if stage is not None else zero.get("stage", 3)
    if zero["stage"] not in ZERO_STAGES:
        raise CliError(f"--deepspeed-config {path}: stage {zero['stage']!r}; DeepSpeed's ZeRO stages are 0-3")
    offloaded = [key for key in ("offload_optimizer", "offload_param") if _offloads(zero.get(key))]
    if offloaded:
        raise CliError(
            f"--deepspeed-config {path}: {' and '.join(offloaded)} is refused: each task's gradient read "
            "out of an offloading engine and the result written back was measured wrong (relative error "
            "1-3.6); remove the offload, or shard with --sharding fsdp2"
        )
    return zero


def _offloads(section: Any) -> bool:
    """Whether a ZeRO ``offload_*`` section moves something off the device (``device`` not none)."""
    return isinstance(section, dict) and str(section.get("device", "none")).lower() != "none"


def check_launch_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, what a multi-process `unlearn` does not run."""
    world = launched_processes()
    sharding = getattr(args, "sharding", None)
    for flag in ("zero_stage", "deepspeed_config"):
        given = getattr(args, flag, None)
        if given is not None and sharding != "deepspeed":
            name = "--" + flag.replace("_", "-")
            raise CliError(
                f"{name} {given} is a DeepSpeed setting; add --sharding deepspeed (under torchrun), "
                f"or drop {name}"
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
    zero_config_of(args)  # the file read and checked before any work


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
