"""What the 2-process tests of the unlearning loop's data parallelism run on each rank (CPU, gloo).

`run_loop` unlearns a tiny Llama for a few steps on examples of different lengths (so the ranks'
slices hold different numbers of loss tokens, which the loss weights must correct), in one
process (``shard=None``) or as one rank of a group. Not a test module: ``test_cli_launch.py`` runs it.
"""

from __future__ import annotations

import copy
import random

import torch
from hf_helpers import VOCAB, tiny_llama

from gradsynth.unlearning.loop import UnlearnSettings, unlearn
from gradsynth.unlearning.task_losses import LossSettings

BATCH = 4  # per task and micro-batch, split across the ranks


def _examples(seed: str, n: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 5))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 9))]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def run_loop(
    shard: tuple[int, int] | None,
    forget_loss: str,
    sharding: str = "ddp",
    retain_loss: str = "nll",
    zero: dict | None = None,
) -> dict:
    """Weights after 3 steps (gathered whole under FSDP2 and ZeRO-3), the step records, and the batch
    sizes the model's forward saw. The KL retain loss gets a frozen copy as its reference."""
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if retain_loss == "kl" else None
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(int(kw["input_ids"].shape[0])), with_kwargs=True
    )
    settings = UnlearnSettings(
        rule="sago",
        lr=1e-2,
        steps=3,
        batch_size=BATCH,
        grad_accum=2,
        losses=LossSettings(forget=forget_loss, retain=retain_loss),
    )
    records = unlearn(
        model,
        _examples("forget", 10),
        _examples("retain", 10),
        0,
        settings,
        reference,
        shard=shard,
        sharding=sharding,
        zero=zero,
    )
    return {
        "sharded": [
            n for n, p in model.named_parameters() if hasattr(p, "full_tensor") or hasattr(p, "ds_tensor")
        ],
        # ZeRO-3 parameters whose data is this rank's partition alone (none whole on every rank)
        "partitioned": [
            n for n, p in model.named_parameters() if hasattr(p, "ds_tensor") and p.data.numel() == 0
        ],
        "weights": _whole_weights(model),
        "records": [(r.forget_loss, r.retain_loss, r.cos_fr) for r in records],
        "seen": seen,
    }


def _whole_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every rank: FSDP2 shards and ZeRO-3 partitions gathered."""
    named = list(model.named_parameters())
    if any(hasattr(p, "ds_tensor") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    whole = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in named}
    return {n: p.detach().clone() for n, p in whole.items()}


def ddp_loop_case(out: str, forget_loss: str, rank: int, world: int, weighted: bool = True) -> None:
    if not weighted:  # what the loss weights correct: each rank's own mean, averaged
        import gradsynth.unlearning.loop as loop

        loop.shard_weight = lambda items, shard, per_example: 1.0
    torch.save(run_loop((rank, world), forget_loss), f"{out}.{rank}")


def unweighted_case(out: str, rank: int, world: int) -> None:
    ddp_loop_case(out, "ga", rank, world, weighted=False)


def fsdp2_loop_case(out: str, forget_loss: str, retain_loss: str, rank: int, world: int) -> None:
    torch.save(run_loop((rank, world), forget_loss, "fsdp2", retain_loss), f"{out}.{rank}")


def non_finite_case(out: str, rank: int, world: int) -> None:
    """A NaN in rank 1's shard alone: every rank must see it (or one would raise and one hang)."""
    from gradsynth.unlearning.sharding import non_finite_parameter, wrap

    model = wrap(tiny_llama(), "fsdp2")
    clean = non_finite_parameter(model)
    if rank == 1:
        with torch.no_grad():
            model.get_parameter("model.layers.1.mlp.up_proj.weight").to_local()[0, 0] = float("nan")
    torch.save({"clean": clean, "bad": non_finite_parameter(model)}, f"{out}.{rank}")


# DeepSpeed keeps parameters under 1e5 elements whole on every rank by default: all of a tiny model's.
PARTITION_ALL = {"stage3_param_persistence_threshold": 0}


def deepspeed_loop_case(out: str, runs: list[tuple[str, str, int]], rank: int, world: int) -> None:
    """The loop through a DeepSpeed engine for each (forget loss, retain loss, ZeRO stage) in turn."""
    from deepspeed_cases import setup_deepspeed

    setup_deepspeed(rank, world)
    done = {
        (f, r, stage): run_loop((rank, world), f, "deepspeed", r, {"stage": stage, **PARTITION_ALL})
        for f, r, stage in runs
    }
    torch.save(done, f"{out}.{rank}")


def deepspeed_partition_case(out: str, rank: int, world: int) -> None:
    """A tiny Llama partitioned by ZeRO-3: `full_state_dict` must gather it whole on rank 0 (the tied
    output weight once), and a NaN in rank 1's partition alone must be seen by every rank."""
    from deepspeed_cases import setup_deepspeed

    from gradsynth.optim import SynthesizingOptimizer
    from gradsynth.unlearning.sharding import deepspeed_steps, full_state_dict, non_finite_parameter

    setup_deepspeed(rank, world)
    torch.manual_seed(0)
    model = tiny_llama()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    optimizer = SynthesizingOptimizer(torch.optim.AdamW(model.parameters()), "sago")
    deepspeed_steps(model, optimizer, {"stage": 3, **PARTITION_ALL}, 2, 1)
    partitioned = all(p.data.numel() == 0 for p in model.parameters())
    gathered = full_state_dict(model)
    clean = non_finite_parameter(model)
    if rank == 1:
        with torch.no_grad():
            model.get_parameter("model.layers.1.mlp.up_proj.weight").ds_tensor[0] = float("nan")
    result = {"partitioned": partitioned, "gathered": gathered, "before": before, "clean": clean}
    torch.save({**result, "bad": non_finite_parameter(model)}, f"{out}.{rank}")


def diverging_run(shard: tuple[int, int] | None, stage: int = 3) -> str | None:
    """`Diverged`'s message from a run whose learning rate makes the weights overflow (None if it ends)."""
    from gradsynth.unlearning.loop import Diverged

    torch.manual_seed(0)
    settings = UnlearnSettings(rule="sum", lr=1e37, steps=4, batch_size=BATCH)
    try:
        unlearn(
            tiny_llama(),
            _examples("forget", 10),
            _examples("retain", 10),
            0,
            settings,
            shard=shard,
            sharding="deepspeed",
            zero={"stage": stage},
        )
    except Diverged as err:
        return str(err)
    return None


def deepspeed_diverging_case(out: str, stages: list[int], rank: int, world: int) -> None:
    from deepspeed_cases import setup_deepspeed

    setup_deepspeed(rank, world)
    torch.save({stage: diverging_run((rank, world), stage) for stage in stages}, f"{out}.{rank}")
