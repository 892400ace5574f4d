"""Refusing, before any allocation, what cannot fit in the memory available here.

A config describing 70B-160B parameters was loaded and the process OOM-killed; a
``--batch-size`` of 5,000,000 asked for petabytes of logits. Both are now measured first:

- a model's parameters are counted on the meta device (no data is allocated), and its weights
  need ``parameters x bytes per element of --dtype``;
- a micro-batch's logits need at least ``3 x batch x max_length x vocabulary x 4`` bytes (the
  float32 logits, their log-probabilities and the gradient of the loss with respect to them).

Memory available is the least of the kernel's ``MemAvailable``, what the cgroup still allows
(``memory.max - memory.current``), and the address space ``RLIMIT_AS`` leaves; on a CUDA device,
the free device memory as well.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from gradsynth.cli.errors import CliError

LOGIT_COPIES = 3
GB = 1e9


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_left() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_bytes(device: str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (host memory for ``cpu``); None if unknown."""
    if torch.device(device).type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    known = [v for v in (_meminfo_available(), _cgroup_left(), _address_space_left()) if v is not None]
    return max(min(known), 0) if known else None


def parameter_count(path: str) -> int | None:
    """Parameters of the causal LM whose config is at ``path``, counted on the meta device (no data);
    None when the config cannot be built this way (the load itself then reports the problem)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # any config transformers cannot build: leave the diagnosis to the load
        return None


def check_model_fits(path: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Refuse ``--model path`` when its weights in ``dtype`` need more memory than is available."""
    count = parameter_count(path)
    if count is None:
        return
    element = torch.empty(0, dtype=dtype).element_size()
    needed = count * element
    for where in dict.fromkeys(["cpu", device]):  # loaded on the host first, then moved
        free = available_bytes(where)
        if free is not None and needed > free:
            half = f"; in bfloat16 it would need {count * 2 / GB:.1f} GB" if element > 2 else ""
            raise CliError(
                f"--model {path}: its config describes {count / 1e9:.2f}B parameters, "
                f"{needed / GB:.1f} GB in {str(dtype).removeprefix('torch.')}, but only "
                f"{free / GB:.1f} GB of memory is available {'here' if where == 'cpu' else 'on ' + where}"
                f"{half}; use a smaller model or a machine with more memory"
            )


def check_batch_fits(batch_size: int, max_length: int, vocabulary: int, device: str) -> None:
    """Refuse a ``--batch-size`` whose logits alone cannot fit (see the module docstring)."""
    needed = LOGIT_COPIES * batch_size * max_length * vocabulary * 4
    free = available_bytes(device)
    if free is not None and needed > free:
        fitting = max(1, free // (LOGIT_COPIES * max_length * vocabulary * 4))
        raise CliError(
            f"--batch-size {batch_size}: a micro-batch needs at least {needed / GB:.1f} GB for its "
            f"logits ({batch_size} x {max_length} tokens x {vocabulary} vocabulary x 4 bytes x "
            f"{LOGIT_COPIES}) but {free / GB:.1f} GB is available; use --batch-size {fitting} or less "
            "(--grad-accum adds micro-batches without the memory)"
        )


def vocabulary_of(model: Any) -> int:
    """The width of the model's logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.vocab_size)
