"""The examples run: the custom-loop unlearning demo in its quick form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_custom_loop_example_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "unlearn_custom_loop.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["sum"], ["sago"])}
    assert set(rows) == {"sum", "sago"}, out
    assert "Verdict" in out
