"""What the 2-process DeepSpeed tests run on each rank (CPU accelerator, gloo).

Same comparison as ``distributed_cases.py``: each ZeRO stage and rule, two micro-batches per
step, against the single process on the whole batch that every rank computes for itself.
Not a test module itself: ``test_deepspeed.py`` runs it.
"""

from __future__ import annotations

import os

import distributed_cases as cases
import torch

from gradsynth import SynthesizingOptimizer

STAGES = [0, 1, 2, 3]  # 0: the engine without ZeRO (p.grad read and written)
TRAINER_STAGES = [1, 2, 3]


def setup_deepspeed(rank: int, world: int) -> None:
    """Environment DeepSpeed reads, on a process group that is already up (gloo)."""
    os.environ.update(
        {"DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29599")
    import importlib

    # DeepSpeed's CPU backend compiles a shared-memory all-reduce with g++ on first use (~80 s);
    # gloo does every collective here without it. (import_module: the attribute path
    # deepspeed.comm.torch resolves to torch itself, which deepspeed.comm imports.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


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


def grouped_optimizer(model: torch.nn.Module) -> SynthesizingOptimizer:
    """Per-group settings: PCGrad with gamma 0.5 on the first layer, SAGO with alpha 2 on the last."""
    base = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "rule": "pcgrad", "gamma": 0.5},
            {"params": model[2].parameters(), "alpha": 2.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    return SynthesizingOptimizer(base, "sago", track_geometry=True)


def engine_for(stage: int, world: int, rule, model=None, make_optimizer=None, **extra):
    import deepspeed

    model = model if model is not None else cases.small_model()
    opt = make_optimizer(model) if make_optimizer else cases.make_optimizer(model.parameters(), rule)
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


def _check_run(engine, want: list[torch.Tensor], want_geometry: dict[str, float], where: str) -> None:
    got = full_parameters(engine)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=cases.RTOL, atol=cases.ATOL, msg=lambda m, w=where: f"{w}: {m}")
    cases.assert_same_on_every_rank(got, where)
    cases.assert_geometry_close(cases.find_geometry(engine), want_geometry, where)


def zero_case(rank: int, world: int) -> None:
    """Every ZeRO stage x rule (and per-group settings) equals the single process; clipping acts on g."""
    setup_deepspeed(rank, world)
    for rule in cases.RULES:
        want, want_geometry = cases.reference(rule)
        for stage in STAGES:
            engine = engine_for(stage, world, rule)
            run_raw(engine, rank, world)
            _check_run(engine, want, want_geometry, f"ZeRO-{stage} {rule}")

    model = cases.small_model()
    opt = grouped_optimizer(model)
    cases.run(model, opt)
    want, want_geometry = [p.detach() for p in model.parameters()], opt.geometry.as_dict()
    for stage in STAGES:
        engine = engine_for(stage, world, None, make_optimizer=grouped_optimizer)
        run_raw(engine, rank, world)
        _check_run(engine, want, want_geometry, f"ZeRO-{stage} per-group settings")

    for stage in STAGES:
        _check_clipping(stage, rank, world)
    _check_projection_is_global(rank, world)


def _check_clipping(stage: int, rank: int, world: int, max_norm: float = 0.05) -> None:
    """The engine's gradient_clipping clips the synthesized g: its norm is g's, the step is max_norm long."""
    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

    engine = engine_for(stage, world, "pcgrad", gradient_clipping=max_norm, gradient_accumulation_steps=1)
    before = full_parameters(engine)
    tasks = DeepSpeedTasks(engine)
    xf, xr = cases.micro_batch(0, 0, rank, world)
    tasks.backward_forget(-engine(xf).pow(2).mean())
    tasks.backward_retain((engine(xr) - 1).pow(2).mean())
    assert tasks.step()
    norm_g = tasks.geometry.norm_g
    assert norm_g > 2 * max_norm, f"ZeRO-{stage}: g too small ({norm_g}) for the clipping to show"
    if stage > 0:  # stage 0 clips p.grad without recording the norm (get_global_grad_norm() is None)
        clipped = engine.get_global_grad_norm()
        assert abs(clipped - norm_g) <= 1e-5 * norm_g, (
            f"ZeRO-{stage}: the engine clipped a gradient of norm {clipped}, g has {norm_g}"
        )
    moved = torch.cat([(a - b).reshape(-1) for a, b in zip(full_parameters(engine), before, strict=True)])
    lr = 0.1  # SGD's first step with momentum moves by lr * (clipped g)
    torch.testing.assert_close(float(moved.norm()), lr * max_norm, rtol=1e-4, atol=0.0)


def _check_projection_is_global(rank: int, world: int) -> None:
    """ZeRO-3 on the sign-split gradients of distributed_cases: PCGrad's sums are global, not shard-local."""
    from gradsynth import FunctionRule
    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

    assert world == 2, "the chosen gradients assume two ranks"
    whole_f, whole_r = [cases.F_W, cases.F_V], [cases.R_W, cases.R_V]
    expected = {
        "pcgrad": [cases.pcgrad(f, r) for f, r in zip(whole_f, whole_r, strict=True)],
        "pcgrad_global": cases._pcgrad_global_whole(whole_f, whole_r),
    }
    got = {}
    for name, rule in [
        ("pcgrad", "pcgrad"),
        ("pcgrad_global", "pcgrad_global"),
        ("local float()", FunctionRule(cases._local_pcgrad, "local_pcgrad")),
    ]:

        def make(model, rule=rule):
            return SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), rule)

        engine = engine_for(
            3,
            world,
            None,
            model=cases._Linear(),
            make_optimizer=make,
            gradient_accumulation_steps=1,
            train_micro_batch_size_per_gpu=1,
        )
        # ZeRO-3 splits each flat 4x2 weight in two: rows 0-1 on rank 0, rows 2-3 on rank 1.
        assert engine.module.w.ds_tensor.numel() == 4, engine.module.w.ds_tensor.numel()
        tasks = DeepSpeedTasks(engine)
        # Every rank sees the same targets, so the averaged gradient is exactly the target.
        tasks.backward_forget(engine(cases.F_W, cases.F_V))
        tasks.backward_retain(engine(cases.R_W, cases.R_V))
        assert tasks.step()
        got[name] = [-p for p in full_parameters(engine)]  # SGD(lr=1) from zero: g = -p
    for name in ("pcgrad", "pcgrad_global"):
        for a, b in zip(got[name], expected[name], strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"ZeRO-3 {n} on sign-split data: {m}")
    pairs = zip(got["local float()"], expected["pcgrad"], strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs), (
        "the sign-split gradients failed to expose a rule that uses the shard-local partial sums"
    )


# ----- the Hugging Face Trainer with TrainingArguments(deepspeed=...) ------------------------------

# SGD: AdamW's m / sqrt(v) turns the rounding of near-zero gradients (summed in another order
# over two ranks) into steps of size lr, which no tolerance separates from a real difference.
TRAINER_LR, TRAINER_MAX_NORM = 0.5, 0.5


def _trainer_args(output_dir: str, stage: int, **overrides):
    import transformers

    settings = {
        "output_dir": output_dir,
        "per_device_train_batch_size": cases.BATCH // 2,
        "gradient_accumulation_steps": cases.ACCUMULATE,
        "learning_rate": TRAINER_LR,
        "optim": "sgd",
        "max_grad_norm": TRAINER_MAX_NORM,
        "max_steps": cases.STEPS,
        "train_sampling_strategy": "sequential",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        # Under DeepSpeed, TrainingArguments lets Accelerate pick the backend, and on a CPU-only
        # machine it finds none (one process); the state set up by `_fresh_accelerate_state` names gloo.
        "accelerator_config": {"use_configured_state": True},
        "deepspeed": {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9,
        },
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def _fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` / `deepspeed` set
    PartialState(backend="gloo")


def trainer_reference():
    """The hand-written loop of hf_helpers on the whole micro-batches the two ranks split."""
    import hf_helpers

    from gradsynth.integrations.task_batches import TaskPairCollator

    examples = hf_helpers.paired_examples(cases.STEPS * cases.ACCUMULATE * cases.BATCH)
    collate = TaskPairCollator()
    batches = [collate(examples[i : i + cases.BATCH]) for i in range(0, len(examples), cases.BATCH)]
    model, _ = hf_helpers.reference_run(
        [b["forget"] for b in batches],
        [b["retain"] for b in batches],
        cases.STEPS,
        cases.ACCUMULATE,
        lr=TRAINER_LR,
        max_norm=TRAINER_MAX_NORM,
        base=torch.optim.SGD,
    )
    return examples, [p.detach() for p in model.parameters()]


def trainer_case(rank: int, world: int, output_dir: str) -> None:
    """SynthesizingTrainer with deepspeed=config at each stage equals the hand-written whole-batch loop,
    and a run resumed from its checkpoint equals the run not stopped."""
    import hf_helpers

    from gradsynth.integrations.hf_trainer import SynthesizingTrainer

    setup_deepspeed(rank, world)
    examples, want = trainer_reference()
    for stage in TRAINER_STAGES:
        _fresh_accelerate_state()
        trainer = SynthesizingTrainer(
            hf_helpers.tiny_llama(), _trainer_args(f"{output_dir}/{stage}", stage), train_dataset=examples
        )
        trainer.train()
        where = f"Trainer ZeRO-{stage}"
        engine = trainer.model_wrapped
        assert engine.zero_optimization_stage() == stage, where
        got = full_parameters(engine)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(
                a, b, rtol=cases.RTOL, atol=cases.ATOL, msg=lambda m, w=where: f"{w}: {m}"
            )
        cases.assert_same_on_every_rank(got, where)
        _check_resume(stage, output_dir)


RESUME_STEPS = 4  # a checkpoint at step 2, so the resumed run takes two steps of its own


def _check_resume(stage: int, output_dir: str) -> None:
    """A Trainer run under DeepSpeed, stopped at its step-2 checkpoint and resumed, ends bit for bit
    where the run not stopped ends (same ranks and order of every sum, so no rounding differs).
    AdamW, so its moments must come back from the checkpoint; pcgrad given to the first trainer
    only, so the resumed one must take its rule from the checkpoint (the default is sago)."""
    import hf_helpers

    from gradsynth.integrations.hf_trainer import SynthesizingTrainer

    where, run_dir = f"Trainer ZeRO-{stage} resume", f"{output_dir}/resume-{stage}"
    examples = hf_helpers.paired_examples(RESUME_STEPS * cases.ACCUMULATE * cases.BATCH)
    args = {"output_dir": run_dir, "max_steps": RESUME_STEPS, "optim": "adamw_torch", "learning_rate": 1e-2}
    _fresh_accelerate_state()
    full = SynthesizingTrainer(
        hf_helpers.tiny_llama(),
        _trainer_args(stage=stage, save_strategy="steps", save_steps=2, **args),
        train_dataset=examples,
        rule="pcgrad",
    )
    full.train()
    want = full_parameters(full.model_wrapped)
    _fresh_accelerate_state()
    # Other initial weights: all that the resumed run ends with must come from the checkpoint.
    resumed = SynthesizingTrainer(
        hf_helpers.tiny_llama(seed=123), _trainer_args(stage=stage, **args), train_dataset=examples
    )
    resumed.train(resume_from_checkpoint=f"{run_dir}/checkpoint-2")
    assert resumed.state.global_step == RESUME_STEPS, where
    rule = resumed.synthesizing_optimizer.rule
    assert rule.name == "pcgrad", f"{where}: the checkpoint's rule was not restored ({rule})"
    got = full_parameters(resumed.model_wrapped)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), f"{where}: differs from the run not stopped by {float((a - b).abs().max())}"
    cases.assert_same_on_every_rank(got, where)
