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
    entries = list(cache.glob("world-*"))  # (the C kernels may have been built into cache/native too)
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    _no_strays(tmp_path)


# ----- plausible input that crashed, exhausted memory or hung (issue 20, items 3 and 4) ----------


def _gradsynth_child(args: list[str], tmp_path: Path, address_space: int | None = None, timeout: int = 300):
    """``gradsynth ARGS`` in a child process (a crash there is a return code, not a dead pytest),
    under ``prlimit --as`` when ``address_space`` is given (whatever it allocates is bounded)."""
    command = [sys.executable, "-m", "gradsynth.cli", *args]
    if address_space is not None:
        if shutil.which("prlimit") is None:
            pytest.skip("prlimit is not installed")
        command = ["prlimit", f"--as={address_space}", *command]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child_error(run: subprocess.CompletedProcess, *parts: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradsynth: error: "), run.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def _requirements_closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, transitively, with the extras they name."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    names: set[str] = set()
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ["", *requirement.extras]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            names.add(name)
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            todo += [(Requirement(r), wanted) for r in requires]
    return names


def test_the_eval_extra_installs_everything_lm_evals_hf_model_imports():
    import ast
    import importlib.metadata as metadata

    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(items: list[str]) -> list[str]:  # gradsynth[lm] -> the lm extra's requirements
        out = []
        for item in items:
            if item.startswith("gradsynth["):
                for extra in item[len("gradsynth[") : -1].split(","):
                    out += expand(extras[extra])
            else:
                out.append(item)
        return out

    installed = _requirements_closure(project["dependencies"] + expand(extras["eval"]))
    tree = ast.parse(Path(huggingface.__file__).read_text())
    roots = {
        alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    }
    roots |= {
        node.module.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    providers = metadata.packages_distributions()
    missing = sorted(
        root
        for root in roots - set(sys.stdlib_module_names) - {"lm_eval", "__future__"}
        if not {canonicalize_name(d) for d in providers.get(root, [root])} & installed
    )
    assert missing == [], (
        f"the eval extra does not install {missing}, which lm_eval.models.huggingface imports"
    )


def test_a_data_file_name_is_the_file_not_a_pattern(tmp_path, capsys):
    from gradsynth.unlearning.data import load_examples

    def rows(name: str, answer: str) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"question": "Q?", "answer": answer}) + "\n")
        return path

    rows("forget1.jsonl", "decoy")  # what the pattern forget[1].jsonl matches
    assert [e.answer for e in load_examples(rows("forget[1].jsonl", "literal"))] == ["literal"]
    (tmp_path / "fa.jsonl").write_bytes(b'{"question": "Q?", "answer": "M\xe9"}\n')  # not UTF-8
    assert [e.answer for e in load_examples(rows("f*.jsonl", "star"))] == ["star"]
    (tmp_path / "c1.csv").write_text("text\ndecoy\n")
    (tmp_path / "c[1].csv").write_text("text\nliteral csv\n")
    assert [e.prompt for e in load_examples(tmp_path / "c[1].csv")] == ["literal csv"]
    argv = ["unlearn", "--model", str(tmp_path), "--forget", str(tmp_path / "g[1].jsonl")]
    assert main([*argv, "--retain", str(tmp_path / "fa.jsonl"), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "g[1].jsonl: no such file")


def test_a_deeply_nested_json_line_is_one_line_naming_the_line(tmp_path):
    data = tmp_path / "nested.jsonl"
    data.write_text('{"question": "q?", "answer": "a"}\n{"text": ' + "[" * 20000 + "]" * 20000 + "}\n")
    run = _gradsynth_child(
        ["unlearn", "--model", str(tmp_path), "--forget", str(data), "--retain", str(data)], tmp_path
    )
    _child_error(run, f"--forget {data}:2: nested more than")


def test_a_30_mb_line_is_cut_before_it_is_tokenized(cache, tmp_path):
    data = tmp_path / "huge.jsonl"
    data.write_text(json.dumps({"text": "word " * 6_000_000}) + "\n")  # 30 MB on one line
    qa = _qa(tmp_path)
    argv = ["unlearn", "--model", str(next(cache.iterdir())), "--forget", str(data), "--retain", str(qa)]
    run = _gradsynth_child(
        [*argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")], tmp_path, 8 << 30
    )
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])  # it aborted in the tokenizer
    assert "report.json" in _model_files(tmp_path / "o")


def test_a_windowed_tokenization_keeps_the_tokens_of_the_whole_text(cache):
    from transformers import AutoTokenizer

    from gradsynth.unlearning.encoding import Example, encode, token_ids

    tokenizer = AutoTokenizer.from_pretrained(next(cache.iterdir()))
    text = " ".join(f"Velmora{i} lives in Orsk, a city of {i * 7} souls." for i in range(400))
    whole = tokenizer(text)["input_ids"]
    for limit in (1, 16, 64, 300):
        assert token_ids(tokenizer, text, limit)[:limit] == whole[:limit]
        assert token_ids(tokenizer, text, limit, from_end=True)[-limit:] == whole[-limit:]
    ids, labels = encode(tokenizer, Example(text + " Answer:", "Orsk"), 48)
    prompt = tokenizer(text + " Answer:")["input_ids"]
    answer = tokenizer(" Orsk", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt[-(48 - len(answer)) :] + answer and labels[-len(answer) :] == answer


def test_greedy_answers_see_at_most_max_length_prompt_tokens(cache, monkeypatch):
    from gradsynth.cli.run_one import evaluate, evaluation_batches
    from gradsynth.cli.sources import Task
    from gradsynth.unlearning import generation
    from gradsynth.world import load_world_model

    model, tokenizer, *_ = load_world_model("ci", log=lambda _: None)
    widths = []

    def greedy_tokens(model, rows, *args):
        widths.append(max(len(row) for row in rows))
        return [[] for _ in rows]  # no new tokens: the prompts' width is what is checked

    monkeypatch.setattr(generation, "greedy_tokens", greedy_tokens)
    from gradsynth.unlearning.encoding import Example, prompt_of

    examples = [Example(prompt_of("Where? " * 3000), "Orsk"), Example(prompt_of("Who?"), "Velmora")]
    task = Task(model, tokenizer, examples, examples, {"forget": examples}, 48, generate_eval=True)
    evaluate(model, evaluation_batches(task), task)
    assert widths and max(widths) <= 48


def test_a_model_too_large_for_the_memory_here_is_refused_before_loading(cache, tmp_path):
    model = _saved_model(cache, tmp_path)
    import torch
    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, model / "model.safetensors")  # every weight would be allocated
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=53248, num_hidden_layers=2, num_attention_heads=128)
    config.update(num_key_value_heads=8, vocab_size=128256, head_dim=128)
    (model / "config.json").write_text(json.dumps(config))  # 8.5B parameters: 34 GB in float32
    data = _qa(tmp_path)
    argv = ["unlearn", "--model", str(model), "--forget", str(data), "--retain", str(data), "--steps", "1"]
    run = _gradsynth_child([*argv, "--no-progress", "--out", str(tmp_path / "o")], tmp_path, 16 << 30)
    _child_error(run, "its config describes 8.", "B parameters", "GB in float32", "is available here")
    assert not (tmp_path / "o").exists()


def test_a_batch_size_whose_logits_cannot_fit_is_one_line(cache, tmp_path):
    run = _gradsynth_child(
        ["unlearn", *FAST, "--batch-size", "5000000", "--out", str(tmp_path / "o")], tmp_path, 8 << 30
    )
    _child_error(run, "--batch-size 5000000: a micro-batch needs at least", "use --batch-size")


@pytest.mark.parametrize("command", ["unlearn", "compare"])
def test_a_seed_beyond_64_bits_is_one_line(cache, tmp_path, capsys, command):
    flag = ["--seed", str(2**64)] if command == "unlearn" else ["--quick", "--seeds", f"0,{2**64}"]
    assert main([command, *flag, *FAST, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "must be a 64-bit integer")


def test_each_example_is_tokenized_once_and_long_phases_show_progress(cache, tmp_path, capsys, monkeypatch):
    import transformers

    import gradsynth.cli.run_one as run_one

    monkeypatch.setattr(run_one, "LONG_PHASE", 2)  # every phase counts as long here
    texts: list[str] = []
    real_call = transformers.PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):
        texts.append(text)
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", counting)
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"question": f"R{i}?", "answer": f"B{i}"}) + "\n" for i in range(6)))
    argv = [
        "unlearn",
        "--model",
        str(next(cache.iterdir())),
        "--forget",
        str(_qa(tmp_path)),
        "--retain",
        str(retain),
    ]
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    questions = [t for t in texts if isinstance(t, str) and t.startswith("R") and t.endswith("Answer:")]
    generated = 6  # ROUGE-L generates from each retain question, before and after: 2 per question
    assert len(questions) == 6 + 2 * generated, questions  # encoded once (it was twice) + generation
    err = capsys.readouterr().err
    assert "encoding the retain split" in err and "scoring retain" in err


def test_one_diverging_cell_of_compare_keeps_every_finished_cell(cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--quick", "--rules", "sum,sago", "--lrs", "1e-3,1e30", "--steps", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["rule"], r["lr"]) for r in results["runs"]) == [("sago", 1e-3), ("sum", 1e-3)]
    assert sorted((d["rule"], d["lr"]) for d in results["diverged"]) == [("sago", 1e30), ("sum", 1e30)]
    assert all("diverged" in d["error"] for d in results["diverged"])
    assert "## Diverged runs" in (out / "results.md").read_text()
    assert "2 of 4 runs diverged" in capsys.readouterr().out
    argv = ["compare", "--quick", "--rules", "sum", "--lrs", "1e30", "--steps", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "all")]) == 2
    _one_line_error(capsys, "every run diverged")
    assert not (tmp_path / "all").exists()


def test_an_lm_eval_failure_inside_a_task_is_one_line(cache, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    missing = json.dumps(str(tmp_path / "absent.jsonl"))
    (tasks / "broken.yaml").write_text(
        f"task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: options\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    model = next(cache.iterdir())
    assert main(["eval", str(model), "--tasks", "broken", "--include-path", str(tasks)]) == 2
    _one_line_error(capsys, "--tasks: lm-eval failed on broken")


def test_dtype_is_honoured_for_the_world(cache, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    assert main(["unlearn", *FAST, "--dtype", "bfloat16", "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((out / "report.json").read_text())["settings"]["task"]["dtype"] == "bfloat16"


@pytest.mark.parametrize(("name", "content"), [("bad.parquet", b"garbage"), ("bad.csv", b'a,b\n1,2,3,4\n"x')])
def test_a_file_datasets_cannot_read_is_one_line_with_no_log_line(tmp_path, name, content):
    # In a child: in-process, pytest's log capture would swallow the line datasets logs.
    data = tmp_path / name
    data.write_bytes(content)
    argv = ["unlearn", "--model", str(tmp_path), "--forget", str(data), "--retain", str(data)]
    run = _gradsynth_child([*argv, "--out", str(tmp_path / "o")], tmp_path)
    _child_error(run, f"--forget {data}: could not be read as")
