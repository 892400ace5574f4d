"""Run a script launched on CPU processes with two CPU-only gates lifted.

``accelerate launch --config_file examples/accelerate/fsdp2.yaml tests/cpu_launch.py SCRIPT ARGS...``:
the launcher, the config file and the script are the user's. In each process:

- FSDP: Accelerate's FSDP path is allowed on CPUs (see `fsdp_cases.allow_fsdp_on_cpu`);
- DeepSpeed: the g++ build of DeepSpeed's shared-memory all-reduce for its CPU backend (~80 s on
  a fresh machine, then cached) is skipped; gloo does every collective without it.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fsdp_cases import allow_fsdp_on_cpu

if __name__ == "__main__":
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        allow_fsdp_on_cpu()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
