"""DeepSpeed ZeRO-1/2/3 on two CPU processes (DeepSpeed's CPU accelerator, gloo).

One spawn per case runs every stage and rule (process and engine start-up dominate the cost);
the checks live in ``deepspeed_cases.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import distributed_cases as cases
import pytest
import torch.distributed as dist

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

import deepspeed_cases  # noqa: E402  (imports nothing from deepspeed at module level)

ROOT = Path(__file__).resolve().parent.parent


def test_zero_stages_match_one_process(tmp_path):
    """ZeRO-1/2/3 x sago, pcgrad, pcgrad_global, accumulation 2: parameters and geometry."""
    cases.spawn(deepspeed_cases.zero_case, tmp_path, timeout=300)


def test_trainer_with_deepspeed_config_matches_one_process(tmp_path):
    """SynthesizingTrainer(TrainingArguments(deepspeed=...)), ZeRO-1/2/3, accumulation 2, clipping;
    resumed from a checkpoint bit-identical to the run not stopped (in the same spawn: start-up dominates)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    case = functools.partial(deepspeed_cases.trainer_case, output_dir=str(tmp_path / "out"))
    cases.spawn(case, tmp_path, timeout=300)


def test_accelerate_deepspeed_config_example_is_valid():
    """examples/accelerate/zero{2,3}.yaml: Accelerate reads them as ZeRO-2/3 without offload."""
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    for stage in (2, 3):
        config = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "accelerate" / f"zero{stage}.yaml"))
        assert config.distributed_type == DistributedType.DEEPSPEED
        plugin_keys = {"zero_stage", "gradient_accumulation_steps", "gradient_clipping"}
        plugin_keys |= {"offload_optimizer_device", "offload_param_device", "zero3_init_flag"}
        plugin = DeepSpeedPlugin(**{k: v for k, v in config.deepspeed_config.items() if k in plugin_keys})
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage"] == stage
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
