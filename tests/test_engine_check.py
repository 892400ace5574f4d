"""`check_engine` passes plain, DDP, FSDP2 and DeepSpeed ZeRO-0..3, however wrapped; refuses ZeRO offload."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gradsynth import SynthesizingOptimizer
from gradsynth.integrations.distributed import UnsupportedEngineError, check_engine

ROOT = Path(__file__).resolve().parent.parent


def _foreign(module: str, class_name: str, **attributes):
    """An instance of a class that claims to come from ``module`` (no import of it needed)."""
    return type(class_name, (), {"__module__": module, **attributes})()


class _Offload:
    def __init__(self, device):
        self.device = type("Device", (), {"value": device})()


def _engine(stage: int, optimizer=None, offload_optimizer=None, offload_param=None):
    engine = _foreign(
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        zero_optimization_stage=lambda self: stage,
        zero_offload_optimizer=lambda self: offload_optimizer,
        zero_offload_param=lambda self: offload_param,
    )
    engine.optimizer = optimizer
    return engine


def test_plain_model_and_optimizer_pass():
    model = torch.nn.Linear(3, 2)
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    check_engine(model, opt, None)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_engine_passes_at_every_stage(stage):
    check_engine(_engine(stage))
    check_engine(_engine(stage, offload_optimizer=_Offload("none")))


@pytest.mark.parametrize("which", ["offload_optimizer", "offload_param"])
def test_zero_offload_is_refused_with_the_fix(which):
    engine = _engine(3, **{which: _Offload("cpu")})
    with pytest.raises(UnsupportedEngineError, match=f"ZeRO stage 3 and {which} to cpu.*Remove the offload"):
        check_engine(engine)
    # Found through the wrappers that hold the engine, too.
    trainer = _foreign("transformers.trainer", "Trainer", is_deepspeed_enabled=True)
    trainer.model_wrapped = engine
    with pytest.raises(UnsupportedEngineError, match=which):
        check_engine(trainer)


def test_unknown_stage_is_refused():
    with pytest.raises(UnsupportedEngineError, match="ZeRO stage 4"):
        check_engine(_engine(4))


def test_deepspeed_wrappers_and_partitioned_parameters_pass():
    zero_opt = _foreign("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3")
    accelerated = _foreign("accelerate.optimizer", "AcceleratedOptimizer")
    accelerated.optimizer = zero_opt
    trainer = _foreign("transformers.trainer", "Trainer", is_deepspeed_enabled=True)
    model = torch.nn.Linear(3, 2)
    model.weight.ds_id = 0  # what DeepSpeed's ZeRO-3 sets on the parameters it partitions
    check_engine(accelerated, trainer, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_check_imports_no_engine_library():
    source = (ROOT / "gradsynth" / "integrations" / "distributed.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
    assert imported <= {"__future__", "collections"}, imported


def test_real_deepspeed_engine_passes(tmp_path, monkeypatch):
    """With DeepSpeed installed: a real ZeRO-2 engine on one CPU process passes; DeepSpeedTasks takes it."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from gradsynth.integrations.deepspeed_tasks import DeepSpeedTasks

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    import importlib

    # No g++ build of DeepSpeed's shared-memory all-reduce (one process needs none).
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 2)
        opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
        }
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        check_engine(engine, ds_opt)
        assert DeepSpeedTasks(engine).optimizer is opt
        other = torch.nn.Linear(4, 2)
        plain, *_ = deepspeed.initialize(
            model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), config=config
        )
        with pytest.raises(TypeError, match=r"not a SynthesizingOptimizer.*client optimizer"):
            DeepSpeedTasks(plain)
    finally:
        dist.destroy_process_group()


def test_deepspeed_larger_than_accelerate_counts_is_refused(monkeypatch):
    """Accelerate counting fewer processes than DeepSpeed joined (no backend named on a machine
    without GPUs) is refused with the fix, before every process trains alone on all the data."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from gradsynth.integrations.accelerate_tasks import AcceleratedTasks

    model = torch.nn.Linear(4, 2)
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    accelerator = SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=object()), num_processes=1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match=r"joined 2 processes but Accelerate counts 1.*backend=\"gloo\""):
        AcceleratedTasks(accelerator, opt)


def _accelerator(engine: str, processes: int):
    from types import SimpleNamespace

    return SimpleNamespace(distributed_type=SimpleNamespace(name=engine), num_processes=processes)


@pytest.mark.parametrize(
    ("env", "engine", "processes", "names"),
    [
        ({"WORLD_SIZE": "2"}, "NO", 1, "use_cpu: true"),
        ({"WORLD_SIZE": "4"}, "MULTI_CPU", 2, "started 4 processes"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "MULTI_CPU", 2, "distributed_type: FSDP"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "MULTI_CPU", 2, "DEEPSPEED"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 1, 'backend="gloo"'),
    ],
)
def test_a_launch_run_as_something_else_is_refused_naming_the_setting(
    monkeypatch, env, engine, processes, names
):
    from gradsynth.integrations.launch_check import LaunchMismatchError, refuse_mismatched_launch

    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchMismatchError) as refused:
        refuse_mismatched_launch(_accelerator(engine, processes))
    assert names in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("env", "engine", "processes"),
    [
        ({}, "NO", 1),
        ({"WORLD_SIZE": "1"}, "NO", 1),
        ({"WORLD_SIZE": "2"}, "MULTI_CPU", 2),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "FSDP", 2),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "DEEPSPEED", 2),
    ],
)
def test_a_launch_that_runs_as_configured_passes(monkeypatch, env, engine, processes):
    from gradsynth.integrations.launch_check import refuse_mismatched_launch

    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refuse_mismatched_launch(_accelerator(engine, processes))
