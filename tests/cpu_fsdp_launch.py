"""Run a script with Accelerate's FSDP path allowed on CPU processes (see `fsdp_cases.allow_fsdp_on_cpu`).

``accelerate launch --config_file examples/accelerate/fsdp2.yaml --cpu tests/cpu_fsdp_launch.py
SCRIPT ARGS...``: the launcher, the config file and the script are the user's; only the gate that
keeps FSDP off CPU-only machines is lifted in each process.
"""

from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fsdp_cases import allow_fsdp_on_cpu

if __name__ == "__main__":
    allow_fsdp_on_cpu()
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
