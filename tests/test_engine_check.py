"""`check_engine` refuses DeepSpeed, however it is wrapped, and lets DDP / FSDP2 / plain pass."""

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


def _engine(stage: int, optimizer=None):
    engine = _foreign(
        "deepspeed.runtime.engine", "DeepSpeedEngine", zero_optimization_stage=lambda self: stage
    )
    engine.optimizer = optimizer
    return engine


def test_plain_model_and_optimizer_pass():
    model = torch.nn.Linear(3, 2)
    opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    check_engine(model, opt, None)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_engine_is_refused_with_its_stage(stage):
    with pytest.raises(UnsupportedEngineError, match=f"ZeRO stage {stage}.*fully_shard"):
        check_engine(_engine(stage))


def test_deepspeed_found_through_wrappers():
    zero_opt = _foreign("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3")
    accelerated = _foreign("accelerate.optimizer", "AcceleratedOptimizer")
    accelerated.optimizer = zero_opt
    with pytest.raises(UnsupportedEngineError, match="ZeRO-3"):
        check_engine(accelerated)
    wrapper = _foreign("accelerate.utils.deepspeed", "DeepSpeedEngineWrapper")
    with pytest.raises(UnsupportedEngineError, match="Accelerate's DeepSpeedEngineWrapper"):
        check_engine(wrapper)
    trainer = _foreign("transformers.trainer", "Trainer", is_deepspeed_enabled=True)
    with pytest.raises(UnsupportedEngineError, match="Trainer with DeepSpeed enabled"):
        check_engine(trainer)
    accelerator = _foreign("accelerate.accelerator", "Accelerator")
    accelerator.distributed_type = _foreign("accelerate.utils", "DistributedType", name="DEEPSPEED")
    with pytest.raises(UnsupportedEngineError, match="Accelerator with DeepSpeed"):
        check_engine(accelerator)


def test_zero3_partitioned_parameter_is_refused():
    model = torch.nn.Linear(3, 2)
    model.weight.ds_id = 0  # what DeepSpeed's ZeRO-3 sets on the parameters it partitions
    with pytest.raises(UnsupportedEngineError, match="ZeRO-3 partitioned"):
        check_engine(model)
    with pytest.raises(UnsupportedEngineError, match="ZeRO-3 partitioned"):
        check_engine(torch.optim.SGD(model.parameters(), lr=0.1))


def test_check_imports_no_engine_library():
    source = (ROOT / "gradsynth" / "integrations" / "distributed.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
    assert imported <= {"__future__", "collections"}, imported


def test_real_deepspeed_engine_is_refused(tmp_path, monkeypatch):
    """With DeepSpeed installed: a real ZeRO-2 engine on one CPU process is recognised."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
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
        for obj in (engine, ds_opt):
            with pytest.raises(UnsupportedEngineError, match="DeepSpeed"):
                check_engine(obj)
    finally:
        dist.destroy_process_group()
