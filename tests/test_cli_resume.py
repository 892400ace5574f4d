"""``gradsynth unlearn --save-every N`` / ``--resume FOLDER``: an interrupted run continued from its
checkpoint ends bit for bit where the uninterrupted run ends (same machine, one thread), and a
checkpoint that is missing, damaged or of other settings is refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_world_cache
from helpers import cache_env

from gradsynth.cli import main
from gradsynth.optim import SynthesizingOptimizer

pytest.importorskip("transformers")
from safetensors.torch import load_file

BASE = ["unlearn", "--world", "ci", "--no-progress", "--lr", "3e-3"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    with cache_env(cache):
        yield cache


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ra, rb = (json.loads((f / "report.json").read_text()) for f in (a, b))
    assert ra["steps"] == rb["steps"]
    assert ra["metrics"] == rb["metrics"]
    assert ra["settings"]["protocol"] == rb["settings"]["protocol"]  # the ladder climbed, rung by rung


def _interrupt_at_backward(monkeypatch, call: int) -> None:
    """A Ctrl-C inside the ``call``-th retain backward (in the middle of a step)."""
    original = SynthesizingOptimizer.backward_retain
    calls = [0]

    def backward_retain(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SynthesizingOptimizer, "backward_retain", backward_retain)


def test_an_interrupt_inside_a_step_resumes_to_the_uninterrupted_run(
    world_cache, tmp_path, monkeypatch, capsys
):
    flags = [*BASE, "--steps", "5", "--save-every", "3"]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole-checkpoint").exists()  # removed once the output was written

    with monkeypatch.context() as patch:
        _interrupt_at_backward(patch, 3)  # inside step 3: the checkpoint is the state after step 2
        assert main([*flags, "--out", str(tmp_path / "cut")]) == 130
    checkpoint = tmp_path / "cut-checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "cut").exists()
    assert f"--resume {checkpoint}" in capsys.readouterr().err

    assert main([*flags, "--out", str(tmp_path / "cut"), "--resume", str(checkpoint)]) == 0
    assert not checkpoint.exists()
    _same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_periodic_checkpoint_resumes_to_the_uninterrupted_run(world_cache, tmp_path, monkeypatch, lora):
    flags = [*BASE, "--steps", "4", "--save-every", "2", *(["--lora-rank", "2"] if lora else [])]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        # Killed hard during step 4 (no interrupt checkpoint): what is left is the step-2 one.
        original = SynthesizingOptimizer.backward_retain
        calls = [0]

        def killed(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 4:
                raise SystemExit(137)
            return original(self, *args, **kwargs)

        patch.setattr(SynthesizingOptimizer, "backward_retain", killed)
        with pytest.raises(SystemExit):
            main([*flags, "--out", str(tmp_path / "cut")])
    checkpoint = tmp_path / "cut-checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert main([*flags, "--out", str(tmp_path / "cut"), "--resume", str(checkpoint)]) == 0
    _same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_resumed_ladder_continues_at_the_rung_it_stopped_on(world_cache, tmp_path, monkeypatch):
    # Rung 1 (lr 1e-4, 2 steps) cannot reach 0% recall; the stop comes in rung 2's second step.
    flags = [*BASE, "--lr", "1e-4", "--steps", "2", "--forget-target", "0", "--ladder-factor", "10"]
    flags += ["--ladder-rungs", "3", "--save-every", "5"]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:
        _interrupt_at_backward(patch, 4)
        assert main([*flags, "--out", str(tmp_path / "cut")]) == 130
    state = json.loads((tmp_path / "cut-checkpoint" / "state.json").read_text())
    assert (state["rung"], state["step"], len(state["finished"])) == (1, 1, 1)
    assert main([*flags, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut-checkpoint")]) == 0
    _same_run(tmp_path / "whole", tmp_path / "cut")
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert [r["lr"] for r in report["settings"]["protocol"]["rungs"]][:2] == pytest.approx([1e-4, 1e-3])


def test_sigterm_writes_a_checkpoint_that_resumes(world_cache, tmp_path):
    """The real signal path: SIGTERM while the run is between steps (tests/cli_driver.py pauses there)."""
    flags = [*BASE, "--steps", "3", "--save-every", "10", "--out", str(tmp_path / "cut")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "cli_driver.py"), "unlearn", *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in child.stderr:
        if line.startswith("PAUSED unlearn"):
            break
    child.send_signal(signal.SIGTERM)
    err = child.stderr.read()
    assert child.wait(timeout=60) == 128 + signal.SIGTERM, err
    assert "checkpoint after step 1 written" in err
    assert (
        main(
            [
                *BASE,
                "--steps",
                "3",
                "--out",
                str(tmp_path / "cut"),
                "--resume",
                str(tmp_path / "cut-checkpoint"),
            ]
        )
        == 0
    )
    assert main([*BASE, "--steps", "3", "--out", str(tmp_path / "whole")]) == 0
    _same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.fixture(scope="module")
def checkpoint(world_cache, tmp_path_factory):
    """A checkpoint after step 1 of a 3-step run."""
    folder = tmp_path_factory.mktemp("resume")
    flags = [*BASE, "--steps", "3", "--save-every", "1", "--out", str(folder / "run")]
    original = SynthesizingOptimizer.backward_retain
    calls = [0]

    def backward_retain(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    SynthesizingOptimizer.backward_retain = backward_retain
    try:
        assert main(flags) == 130
    finally:
        SynthesizingOptimizer.backward_retain = original
    return folder / "run-checkpoint"


def _refused(capsys, argv: list[str], says: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


@pytest.mark.parametrize(
    "change, says",
    [
        (["--steps", "3", "--lr", "1e-3"], "a run with --lr 0.003, this one has 0.001"),
        (["--steps", "4"], "a run with --steps 3, this one has 4"),
        (["--steps", "3", "--rule", "pcgrad"], "a run with --rule sago, this one has pcgrad"),
        (["--steps", "3", "--lora-rank", "2"], "a run with --lora-rank (not given), this one has 2"),
    ],
    ids=["lr", "steps", "rule", "lora"],
)
def test_a_checkpoint_of_other_settings_is_refused_naming_the_setting(
    checkpoint, tmp_path, capsys, change, says
):
    argv = ["unlearn", "--world", "ci", "--no-progress", "--lr", "3e-3", *change]
    if "--lr" in change:
        argv = ["unlearn", "--world", "ci", "--no-progress", *change]
    _refused(capsys, [*argv, "--out", str(tmp_path / "out"), "--resume", str(checkpoint)], says)


def test_a_missing_or_damaged_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    argv = [*BASE, "--steps", "3", "--out", str(tmp_path / "out"), "--resume"]
    _refused(capsys, [*argv, str(tmp_path / "nowhere")], "no such folder")
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(checkpoint, damaged)
    weights = damaged / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _refused(capsys, [*argv, str(damaged)], "weights.safetensors cannot be read")
    (damaged / "state.json").write_text("{not json")
    _refused(capsys, [*argv, str(damaged)], "state.json cannot be read")
    (damaged / "optimizer.pt").unlink()
    _refused(capsys, [*argv, str(damaged)], "has no optimizer.pt")


def test_an_earlier_checkpoint_folder_is_not_overwritten_silently(checkpoint, tmp_path, capsys):
    out = checkpoint.parent / "run"
    _refused(capsys, [*BASE, "--steps", "3", "--save-every", "1", "--out", str(out)], "--resume")
