"""What the 2-process DeepSpeed tests run on each rank (CPU accelerator, gloo).

Same comparison as ``distributed_cases.py``: each ZeRO stage and rule, two micro-batches per
step, against the single process on the whole batch that every rank computes for itself.
Not a test module itself: ``test_deepspeed.py`` runs it.
"""

from __future__ import annotations

import os

import torch

import distributed_cases as cases
from gradsynth import SynthesizingOptimizer

STAGES = [1, 2, 3]


def setup_deepspeed(rank: int, world: int) -> None:
    """Environment DeepSpeed reads, on a process group that is already up (gloo)."""
    os.environ.update(
        {"DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29599")
    import sys

    import deepspeed.comm.torch  # noqa: F401  (the name resolves to torch itself: deepspeed.comm imports it)

    # DeepSpeed's CPU backend compiles a shared-memory all-reduce with g++ on first use (~80 s);
    # gloo does every collective here without it.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def config(stage: int, world: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cases.BATCH // world,
        "gradient_accumulation_steps": cases.ACCUMULATE,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the client optimizer is a SynthesizingOptimizer
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the clipping case sets its own
        **extra,
    }


def engine_for(stage: int, world: int, rule, model=None, **extra):
    import deepspeed

    model = model if model is not None else cases.small_model()
    opt = cases.make_optimizer(model.parameters(), rule)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, world, **extra))
    return engine


def full_parameters(engine) -> list[torch.Tensor]:
    """The whole parameters on every rank (gathered under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def run_raw(engine, rank: int, world: int) -> None:
    """The `run` loop of distributed_cases through DeepSpeedTasks (engine.backward scales by 1/GAS)."""
    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

    tasks = DeepSpeedTasks(engine)
    for step in range(cases.STEPS):
        for micro in range(cases.ACCUMULATE):
            xf, xr = cases.micro_batch(step, micro, rank, world)
            tasks.backward_forget(-engine(xf).pow(2).mean())
            tasks.backward_retain((engine(xr) - 1).pow(2).mean())
            stepped = tasks.step()
            assert stepped == (micro == cases.ACCUMULATE - 1), f"stepped at micro-batch {micro}"


def zero_case(rank: int, world: int) -> None:
    """Every ZeRO stage x rule equals the single process; ranks identical; geometry global."""
    setup_deepspeed(rank, world)
    for rule in cases.RULES:
        want, want_geometry = cases.reference(rule)
        for stage in STAGES:
            where = f"ZeRO-{stage} {rule}"
            engine = engine_for(stage, world, rule)
            run_raw(engine, rank, world)
            got = full_parameters(engine)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(
                    a, b, rtol=cases.RTOL, atol=cases.ATOL, msg=lambda m, w=where: f"{w}: {m}"
                )
            cases.assert_same_on_every_rank(got, where)
            geometry = cases.find_geometry(engine)
            cases.assert_geometry_close(geometry, want_geometry, where)
