"""DeepSpeed ZeRO-1/2/3 on two CPU processes (DeepSpeed's CPU accelerator, gloo).

One spawn per case runs every stage and rule (process and engine start-up dominate the cost);
the checks live in ``deepspeed_cases.py``.
"""

from __future__ import annotations

import distributed_cases as cases
import pytest
import torch.distributed as dist

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

import deepspeed_cases  # noqa: E402  (imports nothing from deepspeed at module level)


def test_zero_stages_match_one_process(tmp_path):
    """ZeRO-1/2/3 x sago, pcgrad, pcgrad_global, accumulation 2: parameters and geometry."""
    cases.spawn(deepspeed_cases.zero_case, tmp_path, timeout=300)
