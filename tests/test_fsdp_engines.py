"""FSDP2 through the Hugging Face Trainer and Accelerate on two CPU processes (gloo); FSDP1 refused.

Each 2-process test is one spawn (start-up dominates); the per-rank checks live in
``fsdp_cases.py``.
"""

from __future__ import annotations

import distributed_cases
import fsdp_cases
import pytest
import torch
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


def test_trainer_and_accelerate_fsdp2_match_one_process(tmp_path, monkeypatch):
    """Trainer: every rule, accumulation 2, clipping, then a resume identical to the run not
    stopped; a hand-written Accelerate loop likewise; both equal to one process on the whole
    batch and identical across ranks."""
    monkeypatch.setenv("GRADSYNTH_FSDP_CASE_DIR", str(tmp_path))
    fsdp_cases.trainer_references(tmp_path)
    fsdp_cases.accelerate_references(tmp_path)
    distributed_cases.spawn(fsdp_cases.fsdp2_engines_case, tmp_path, timeout=400)


def _foreign(module: str, class_name: str, **attributes):
    """An instance of a class that claims to come from ``module`` (no import of it needed)."""
    return type(class_name, (), {"__module__": module, **attributes})()


def test_fsdp1_setups_are_refused_with_the_fix():
    """An Accelerator or Trainer on FSDP1 and FSDP1's flat parameters; FSDP2 and DDP pass."""
    from gradsynth.integrations.distributed import UnsupportedEngineError, check_engine, refuse_fsdp1

    fsdp = _foreign("accelerate.utils", "DistributedType", name="FSDP")
    fsdp1_accelerator = _foreign("accelerate", "Accelerator", distributed_type=fsdp, is_fsdp2=False)
    trainer = _foreign("transformers.trainer", "Trainer", is_fsdp_enabled=True, accelerator=fsdp1_accelerator)
    flat = torch.nn.Parameter(torch.zeros(3))
    flat._fsdp_flattened = True  # what FSDP1 sets on the parameters it flattens
    for obj, found in [
        (fsdp1_accelerator, "Accelerator with FSDP1"),
        (trainer, "Trainer with FSDP1"),
        (torch.optim.SGD([flat], lr=0.1), "FSDP1 flat parameters"),
    ]:
        for check in (refuse_fsdp1, check_engine):
            with pytest.raises(UnsupportedEngineError, match=f"{found}.*fsdp_version: 2"):
                check(obj)
    fsdp2_accelerator = _foreign("accelerate", "Accelerator", distributed_type=fsdp, is_fsdp2=True)
    model = torch.nn.Linear(3, 2)
    refuse_fsdp1(fsdp2_accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_real_fsdp1_module_is_refused(tmp_path):
    """``FullyShardedDataParallel`` itself, on a one-process gloo group, also with use_orig_params=True."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from gradsynth import SynthesizingOptimizer
    from gradsynth.integrations.distributed import UnsupportedEngineError, check_engine

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for orig in (False, True):
            model = FullyShardedDataParallel(
                torch.nn.Linear(4, 2), device_id=torch.device("cpu"), use_orig_params=orig
            )
            opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
            with pytest.raises(UnsupportedEngineError, match=r"FullyShardedDataParallel.*fsdp_version: 2"):
                check_engine(model)
            with pytest.raises(UnsupportedEngineError, match=r"FSDP1 flat parameters.*fsdp_version: 2"):
                check_engine(opt)
    finally:
        dist.destroy_process_group()
