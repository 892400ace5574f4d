"""DDP and FSDP2 on two CPU processes (gloo): equal to one process on the whole batch.

One spawn per engine runs every rule and setup (process start-up dominates the cost); the
checks themselves live in ``distributed_cases.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import distributed_cases as cases
import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def test_ddp_matches_one_process(tmp_path):
    """sago, pcgrad, pcgrad_global; bucket views or not; accumulation with and without no_sync."""
    cases.spawn(cases.ddp_case, tmp_path)


def test_fsdp2_matches_one_process(tmp_path):
    """Sharded DTensor gradients: global projections and geometry, SAGO with no communication."""
    cases.spawn(cases.fsdp2_case, tmp_path)


def test_example_under_torchrun():
    """examples/distributed_unlearn.py --quick, both engines, launched as its docs say."""
    example = ROOT / "examples" / "distributed_unlearn.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [*command, str(example), "--quick", "--engine", "ddp", "fsdp2"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=True,
    ).stdout
    assert out.count("parameters bit-identical on all ranks: yes") == 2, out
    accuracies = {
        when: [float(x) for x in re.findall(rf"{when}:\s+forget\s+([\d.]+)%", out)]
        for when in ("before", "after")
    }
    assert len(accuracies["after"]) == 2, out
    pairs = zip(accuracies["after"], accuracies["before"], strict=True)
    assert all(float(after) < float(before) for after, before in pairs), out
