"""DDP and FSDP2 on two CPU processes (gloo): equal to one process on the whole batch.

One spawn per engine runs every rule and setup (process start-up dominates the cost); the
checks themselves live in ``distributed_cases.py``.
"""

from __future__ import annotations

import distributed_cases as cases
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def test_ddp_matches_one_process(tmp_path):
    """sago, pcgrad, pcgrad_global; bucket views or not; accumulation with and without no_sync."""
    cases.spawn(cases.ddp_case, tmp_path)


def test_fsdp2_matches_one_process(tmp_path):
    """Sharded DTensor gradients: global projections and geometry, SAGO with no communication."""
    cases.spawn(cases.fsdp2_case, tmp_path)
