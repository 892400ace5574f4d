"""The Accelerate config files in examples/accelerate/, launched as their comments say (quick mode).

``accelerate launch --config_file FILE examples/accelerate_loop.py --quick`` on 2 CPU processes:
the engine Accelerate reports, the run's end, and every process's digest of the whole parameters
(gathered where sharded) the same. The FSDP2 and DeepSpeed launches go through
``tests/cpu_launch.py``, which lifts two CPU-only gates in each process (Accelerate's FSDP path is
for accelerators only; DeepSpeed's CPU backend compiles a shared-memory all-reduce with g++).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
SHIM = (str(ROOT / "tests" / "cpu_launch.py"),)


def _free_port() -> int:
    # The config files leave the port to Accelerate's default (29500), which a second suite on
    # this machine, or a launch still closing, may hold.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, *script: str, extra: tuple[str, ...] = (), ok: bool = True) -> str:
    example = str(ROOT / "examples" / "accelerate_loop.py")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "examples" / "accelerate" / config),
        "--main_process_port", str(_free_port()),
        "--num_cpu_threads_per_process", "1", *script, example, "--quick", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout if ok else done.stderr


@pytest.mark.parametrize(
    ("config", "shim", "engine"),
    [
        ("ddp.yaml", (), "MULTI_CPU"),
        ("fsdp2.yaml", SHIM, "FSDP"),
        ("zero2.yaml", SHIM, "DEEPSPEED"),
        ("zero3.yaml", SHIM, "DEEPSPEED"),
    ],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_config_file_launches_the_example(config, shim, engine):
    if engine == "DEEPSPEED":
        pytest.importorskip("deepspeed")
    out = _launch(config, *shim)
    assert f"engine: {engine}, 2 process(es)" in out, out
    assert "after 2 optimizer steps" in out and "rule sago" in out, out
    digests = dict(re.findall(r"process (\d): parameters ([0-9a-f]{16})", out))
    assert sorted(digests) == ["0", "1"], out
    assert digests["0"] == digests["1"], f"the processes end with different parameters: {digests}"


@pytest.mark.parametrize(
    ("config", "extra", "names"),
    [
        # use_cpu: false on a machine without GPUs: each process counts itself alone.
        (
            "fsdp2.yaml",
            ("--no-cpu",),
            "started 2 processes (WORLD_SIZE=2) but Accelerate runs each as 1 of 1",
        ),
        # distributed_type: FSDP on CPUs: Accelerate runs plain data parallelism instead.
        ("fsdp2.yaml", (), "names distributed_type: FSDP but Accelerate runs MULTI_CPU"),
    ],
    ids=["lone-processes", "fsdp-as-ddp"],
)
def test_a_launch_accelerate_would_run_as_something_else_is_refused(config, extra, names):
    if __import__("torch").cuda.is_available():
        pytest.skip("the mismatch is that of a machine without GPUs")
    err = _launch(config, extra=extra, ok=False)
    assert "LaunchMismatchError: the " in err and names in err, err[-3000:]
