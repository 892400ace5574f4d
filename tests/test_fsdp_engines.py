"""FSDP2 through the Hugging Face Trainer and Accelerate on two CPU processes (gloo); FSDP1 refused.

Each 2-process test is one spawn (start-up dominates); the per-rank checks live in
``fsdp_cases.py``.
"""

from __future__ import annotations

import distributed_cases
import fsdp_cases
import pytest
import torch.distributed as dist
from hf_helpers import fresh_accelerate_state

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]
_ = fresh_accelerate_state


def test_trainer_fsdp2_matches_one_process_and_resumes_exactly(tmp_path, monkeypatch):
    """Every rule, accumulation 2, clipping: equal to one process on the whole batch, ranks identical."""
    monkeypatch.setenv("GRADSYNTH_FSDP_CASE_DIR", str(tmp_path))
    fsdp_cases.trainer_references(tmp_path)
    distributed_cases.spawn(fsdp_cases.trainer_fsdp2_case, tmp_path, timeout=300)
