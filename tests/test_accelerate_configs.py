"""The Accelerate config files in examples/accelerate/, launched as their comments say (quick mode).

``accelerate launch --config_file FILE examples/accelerate_loop.py --quick`` on 2 CPU processes.
Accelerate takes its FSDP path only on accelerators, so the FSDP2 launch goes through
``tests/cpu_fsdp_launch.py``, which lifts that one gate in each process and runs the example.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent


def _launch(config: str, *script: str) -> str:
    example = str(ROOT / "examples" / "accelerate_loop.py")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "examples" / "accelerate" / config),
        "--num_cpu_threads_per_process", "1", *script, example, "--quick",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(
    ("config", "shim", "engine"),
    [("ddp.yaml", (), "MULTI_CPU"), ("fsdp2.yaml", (str(ROOT / "tests" / "cpu_fsdp_launch.py"),), "FSDP")],
    ids=["ddp", "fsdp2"],
)
def test_config_file_launches_the_example(config, shim, engine):
    out = _launch(config, *shim)
    assert f"engine: {engine}, 2 process(es)" in out, out
    assert "after 2 optimizer steps" in out and "rule sago" in out, out
