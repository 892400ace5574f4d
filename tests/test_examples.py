"""The examples run: the custom-loop unlearning demo in its quick form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def _run_example_in_process(name: str, capsys, monkeypatch) -> str:
    """Run ``examples/<name> --quick`` as ``__main__`` here: no second interpreter to start."""
    import runpy

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    script = ROOT / "examples" / name
    monkeypatch.setattr(sys, "argv", [str(script), "--quick"])
    monkeypatch.syspath_prepend(str(script.parent))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return capsys.readouterr().out


def test_hf_trainer_example_quick(capsys, monkeypatch):
    out = _run_example_in_process("hf_trainer_unlearn.py", capsys, monkeypatch)
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["sum"], ["sago"])
    }
    assert set(rows) == {"sum", "sago"}, out
    assert float(rows["sago"][5]) >= 0  # mean cos(g, r) of SAGO: never against retention
    assert "Verdict" in out


def test_accelerate_example_quick(capsys, monkeypatch):
    out = _run_example_in_process("accelerate_loop.py", capsys, monkeypatch)
    assert "after 3 optimizer steps (6 micro-batches)" in out, out
