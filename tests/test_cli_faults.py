"""Fault injection for the command line: every failure is exit 2 with one line (or 128+signal),
never a traceback, a NaN model saved as a success, a user's output lost or hidden, or a stray
folder.

To add a case: take the ``cache`` fixture (a private copy of the trained CI world cache), run
`gradsynth.cli.main` in-process, or a child with `_child` (which can pause at a named point of
the run, see tests/cli_driver.py, and be signalled there), then assert with `_one_line_error`
and `_no_strays`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from helpers import without_progress

from gradsynth.cli import main

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "cli_driver.py"
FAST = ["--world", "ci", "--steps", "2", "--no-progress"]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (``mount(options)``), skipped where mounting is not allowed."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def _one_line_error(capsys, *parts: str) -> str:
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: "), err
    for part in parts:
        assert part in err, err
    return err


def _no_strays(folder: Path) -> None:
    strays = [
        p.name for p in folder.rglob("*") if ".partial-" in p.name or ".old-" in p.name or ".tmp-" in p.name
    ]
    assert strays == []


def _model_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----- the world cache through the command line (items 1-4) ------------------------------------


@pytest.fixture
def quick_pretrain(monkeypatch):
    """The world model is not trained (these tests check files and exit codes, not recall)."""
    import gradsynth.world.cache as cache_module

    monkeypatch.setattr(cache_module, "pretrain", lambda *a, **k: {"recall": 1.0, "steps": 0})


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "pretrain.json"])
def test_a_damaged_cache_is_rebuilt_and_the_run_succeeds(cache, tmp_path, capsys, quick_pretrain, name):
    damaged = next(cache.iterdir()) / name
    damaged.write_bytes(damaged.read_bytes()[:10])
    assert main(["unlearn", *FAST, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    lines = [line for line in printed.out.splitlines() if line.startswith("The cached world model")]
    assert len(lines) == 1 and f"is damaged ({name} has 10 bytes" in lines[0] and "rebuilding it" in lines[0]
    assert (damaged.parent / "manifest.json").is_file() and damaged.stat().st_size > 10  # repaired
    _no_strays(tmp_path)


def test_a_read_only_cache_warns_and_the_run_succeeds(tmpfs, tmp_path, monkeypatch, capsys, quick_pretrain):
    mount = tmpfs("size=4m,ro")
    monkeypatch.setenv("GRADSYNTH_CACHE", str(mount / "cache"))
    assert main(["unlearn", *FAST, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "Warning: could not write the world model cache" in printed and "Read-only file system" in printed
    assert "report.json" in _model_files(tmp_path / "run")
    assert list(mount.iterdir()) == []


# ----- output folders (items 5-8) ------------------------------------------------------------


def test_out_that_appeared_meanwhile_is_refused_and_both_results_kept(cache, tmp_path, monkeypatch, capsys):
    import gradsynth.cli.unlearn_command as command

    out = tmp_path / "run"
    real_plot = command.plot_curves

    def other_run_finishes_first(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("first run")
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(command, "plot_curves", other_run_finishes_first)
    assert main(["unlearn", *FAST, "--out", str(out)]) == 2
    err = _one_line_error(capsys, "appeared while this run was working")
    assert _model_files(out) == {"theirs.txt"}
    (kept,) = tmp_path.glob(f"run.kept-{os.getpid()}-*")  # a fresh name: nothing there is replaced
    assert str(kept) in err and {"report.json", "model.safetensors"} <= _model_files(kept)
    _no_strays(tmp_path)


def test_out_under_a_file_is_refused_before_the_work(cache, tmp_path, monkeypatch, capsys):
    import gradsynth.cli.unlearn_command as command

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(command, "load_task", lambda *a: pytest.fail("work started"))
    assert main(["unlearn", *FAST, "--out", str(tmp_path / "file" / "run")]) == 2
    _one_line_error(capsys, "is a file, not a folder")


def test_out_on_a_read_only_disk_is_refused_before_the_work(cache, tmpfs, monkeypatch, capsys):
    import gradsynth.cli.unlearn_command as command

    mount = tmpfs("size=1m,ro")
    monkeypatch.setattr(command, "load_task", lambda *a: pytest.fail("work started"))
    assert main(["unlearn", *FAST, "--out", str(mount / "run")]) == 2
    _one_line_error(capsys, "cannot write in", "Read-only file system")


def test_a_full_disk_at_save_time_is_one_line_and_leaves_nothing(cache, tmpfs, capsys):
    mount = tmpfs("size=256k")  # the CI model alone is 1.9 MB
    assert main(["unlearn", *FAST, "--out", str(mount / "run")]) == 2
    _one_line_error(capsys, "writing the result failed", "nothing was kept")
    assert list(mount.iterdir()) == []


@pytest.mark.parametrize("out", [".", "x/..", "x/../.."])
def test_out_that_is_or_contains_the_current_folder_is_refused(cache, tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work"
    (work / "x").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["unlearn", *FAST, "--overwrite", "--out", out]) == 2
    _one_line_error(capsys, "is the current folder or contains it")
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "x"]
    _no_strays(tmp_path)


def test_an_interrupt_between_the_overwrite_renames_keeps_the_new_output(
    cache, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        result = real_rename(self, target)
        if ".old-" in str(target):  # the old folder is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Path, "rename", rename)
    assert main(["unlearn", *FAST, "--overwrite", "--out", str(out)]) == 130
    assert f"the output folder {out} is complete" in capsys.readouterr().err
    assert "report.json" in _model_files(out) and "old.txt" not in _model_files(out)
    _no_strays(tmp_path)


# ----- non-finite runs, report JSON and parser bounds (items 9-10) ----------------------------


def test_a_diverging_run_stops_with_exit_2_and_saves_no_model(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["unlearn", *FAST[:2], "--steps", "4", "--lr", "1e30", "--no-progress", "--out", str(out)]) == 2
    )
    _one_line_error(capsys, "diverged")
    assert not out.exists()
    _no_strays(tmp_path)


def test_a_diverging_float16_model_stops_with_exit_2(cache, tmp_path, capsys):
    entry = next(cache.iterdir())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(4)))
    args = ["unlearn", "--model", str(entry), "--forget", str(data), "--retain", str(data)]
    args += [
        "--dtype",
        "float16",
        "--lr",
        "1e4",
        "--steps",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    _one_line_error(capsys, "diverged")
    assert not (tmp_path / "run").exists()


def test_reports_are_valid_json_without_nan(tmp_path):
    from gradsynth.unlearning.loop import StepRecord
    from gradsynth.unlearning.report import write_report

    nan, inf = float("nan"), float("inf")
    records = [StepRecord(1, nan, inf, None, None, None, None)]
    write_report(tmp_path / "r.json", {"beta": inf}, {"f": {"nll": nan}}, {"f": {"nll": -inf}}, records)

    def refuse(token):
        raise ValueError(f"bare {token} is not JSON")

    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert report["steps"][0]["forget_loss"] is None and report["settings"]["beta"] is None


BAD_SETTINGS = {
    "alpha inf": (["--alpha", "inf"], "--alpha: must be a finite number"),
    "gamma inf": (["--gamma", "inf"], "--gamma: must be a finite number"),
    "epochs inf": (["--epochs", "inf"], "--epochs: must be a finite number"),
    "lr inf": (["--lr", "inf"], "--lr: must be a finite number"),
    "lr nan": (["--lr", "nan"], "--lr: must be a finite number"),
    "beta inf": (["--beta", "inf"], "--beta: must be a finite number"),
    "delta nan": (["--delta", "nan"], "--delta: must be a finite number"),
    "device meta": (["--device", "meta"], "--device meta: not available here"),
    "threads too many": (["--threads", "100000"], "--threads: must be at most"),
    "max-length 1": (["--max-length", "1"], "--max-length 1:"),
    "compare lrs nan": (["compare", "--lrs", "1e-3,nan"], "nan is not a finite number > 0"),
    "compare lrs inf": (["compare", "--lrs", "inf"], "inf is not a finite number > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_settings_that_would_crash_later_are_refused(cache, tmp_path, capsys, case):
    args, message = BAD_SETTINGS[case]
    argv = ["compare", "--quick", *args[1:]] if args[0] == "compare" else ["unlearn", *args]
    assert main([*argv, "--world", "ci", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "o").exists()


def test_an_unknown_backend_in_the_environment_is_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "gradsynth.cli", "unlearn", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        env={**os.environ, "GRADSYNTH_BACKEND": "bogus", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "gradsynth: error: GRADSYNTH_BACKEND='bogus' is not a synthesis backend; set one of auto, "
        "compiled, eager or unset it"
    ]


# ----- data files and models (items 11-12) ------------------------------------------------------

BAD_DATA = {
    "non-UTF-8 bytes": (
        b'{"question": "Who?", "answer": "M\xe9"}\n',
        "not UTF-8 text (byte 0xe9 at offset 33)",
    ),
    "null answer": (
        b'{"question": "A?", "answer": "B"}\n{"question": "Q", "answer": null}\n',
        "row 2: 'answer' is missing",
    ),
    "missing answer": (
        b'{"question": "A?", "answer": "B"}\n{"question": "Q"}\n',
        "row 2: 'answer' is missing",
    ),
    "list as text": (b'{"text": ["a", "b"]}\n', "row 1: 'text' is a list, not a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_unusable_data_rows_are_one_line(tmp_path, capsys, case):
    content, message = BAD_DATA[case]
    data = tmp_path / "forget.jsonl"
    data.write_bytes(content)
    argv = ["unlearn", "--model", str(tmp_path), "--forget", str(data), "--retain", str(data)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, message)


def _saved_model(cache: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(next(cache.iterdir()), model)
    return model


def _qa(tmp_path: Path) -> Path:
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(4)))
    return data


def test_a_config_of_another_architecture_than_the_weights_is_refused(cache, tmp_path, capsys):
    model = _saved_model(cache, tmp_path)
    bert = {"model_type": "bert", "vocab_size": 384, "hidden_size": 128, "num_hidden_layers": 2}
    (model / "config.json").write_text(json.dumps({**bert, "num_attention_heads": 4, "is_decoder": True}))
    data = _qa(tmp_path)
    argv = ["unlearn", "--model", str(model), "--forget", str(data), "--retain", str(data)]
    assert main([*argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "its config does not match its weights", "weights missing, left random")
    assert not (tmp_path / "o").exists()


def test_a_model_folder_without_tokenizer_files_is_refused(cache, tmp_path, capsys):
    model = _saved_model(cache, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    data = _qa(tmp_path)
    argv = ["unlearn", "--model", str(model), "--forget", str(data), "--retain", str(data)]
    assert main([*argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "has no tokenizer files")


# ----- signals and concurrent runs, in child processes ------------------------------------------


def _child(point: str, args: list[str], cache_root: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), point, *args],
        cwd=ROOT,
        env={
            **os.environ,
            "GRADSYNTH_CACHE": str(cache_root),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_pause(child: subprocess.Popen, point: str) -> None:
    for line in child.stderr:
        if line.strip() == f"PAUSED {point}":
            return
    raise AssertionError(f"the child ended before reaching {point}: {child.wait()}")


@pytest.mark.parametrize(
    ("point", "sig"),
    [
        ("unlearn", signal.SIGTERM),
        ("unlearn", signal.SIGHUP),
        ("save", signal.SIGINT),
        ("pretrain", signal.SIGTERM),
        ("cache-save", signal.SIGTERM),
    ],
)
def test_a_signal_at_any_point_leaves_no_stray_folder(cache, tmp_path, point, sig):
    if point in ("pretrain", "cache-save"):
        shutil.rmtree(cache)  # a cold cache: the world model is trained (stubbed) and saved
    out = tmp_path / "out" / "run"
    child = _child(point, ["unlearn", *FAST, "--out", str(out)], cache, GS_FAST_PRETRAIN="1")
    _wait_for_pause(child, point)
    child.send_signal(sig)
    code = child.wait(timeout=60)
    rest = child.stderr.read()
    assert code == 128 + sig, rest
    assert rest.strip().splitlines()[-1].startswith(f"gradsynth: interrupted ({signal.Signals(sig).name})")
    assert "Traceback" not in rest
    assert not out.exists()
    _no_strays(tmp_path)


def test_two_concurrent_runs_on_one_out_keep_both_results(cache, tmp_path):
    out = tmp_path / "run"
    release = tmp_path / "go"
    children = [
        _child("save", ["unlearn", *FAST, "--out", str(out)], cache, GS_RELEASE=str(release))
        for _ in range(2)
    ]
    for child in children:
        _wait_for_pause(child, "save")
    release.touch()
    codes = sorted(child.wait(timeout=120) for child in children)
    errors = [child.stderr.read() for child in children]
    assert codes == [0, 2], errors
    assert "report.json" in _model_files(out)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.kept-")]
    assert len(kept) == 1 and "report.json" in _model_files(kept[0])
    assert any(str(kept[0]) in e for e in errors)
    _no_strays(tmp_path)


def test_two_concurrent_runs_on_one_cold_cache_train_once_and_both_succeed(cache, tmp_path):
    shutil.rmtree(cache)
    release = tmp_path / "go"

    def child(i: int) -> subprocess.Popen:
        out = str(tmp_path / f"run{i}")
        env = {"GS_FAST_PRETRAIN": "1", "GS_RELEASE": str(release), "PYTHONUNBUFFERED": "1"}
        return _child("cache-save", ["unlearn", *FAST, "--out", out], cache, **env)

    first = child(0)
    _wait_for_pause(first, "cache-save")  # it trained, holds the training lock, and waits to save
    second = child(1)
    for line in second.stdout:  # the second finds the cache cold too, and waits for the first
        if "Another run is training the 'ci' world model" in line:
            break
    else:
        raise AssertionError(f"the second run did not wait: {second.wait()} {second.stderr.read()}")
    release.touch()
    codes = [first.wait(timeout=120), second.wait(timeout=120)]
    assert codes == [0, 0], [c.stderr.read() for c in (first, second)]
    assert "Training the" not in second.stdout.read()  # it loaded what the first saved
    entries = [p for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    _no_strays(tmp_path)
