"""The ``gradsynth`` command line end to end on the CI-sized world, and every bad input it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from conftest import copy_world_cache
from helpers import cache_env, without_progress

from gradsynth.cli import main
from gradsynth.world.splits import SPLIT_NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    """A private cache with a copy of the session's CI world model."""
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    with cache_env(cache):
        yield cache / Path(ci_world_master).name


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_unlearn_writes_model_report_and_plot_and_forgets(world_cache, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["unlearn", "--world", "ci", "--steps", "30", "--lr", "1e-3", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "forget (↓)" in printed and "neighbour (↑)" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json", "curves.png"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["rule"] == "sago" and report["settings"]["steps"] == 30
    assert len(report["steps"]) == 30
    assert all(-1 <= s["cos_gr"] <= 1 for s in report["steps"] if s["cos_gr"] is not None)
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert list(before) == list(SPLIT_NAMES)
    assert report["settings"]["task"]["loss_scope"] == "full"  # the world's default
    assert before["forget"]["recall"] == 1.0
    assert after["forget"]["recall"] <= 0.25  # forgetting happened
    assert after["forget"]["nll"] > 10 * before["forget"]["nll"]
    assert after["retain"]["recall"] >= 0.8  # and the retain set was kept
    assert _leftovers(tmp_path) == []

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == report["settings"]["task"]["model_parameters"]


def test_world_model_is_loaded_from_the_cache_the_second_time(world_cache):
    from gradsynth.world.cache import load_world_model

    *_, info = load_world_model("ci", log=lambda _: None)
    assert info["cached"] and Path(info["path"]) == world_cache


def test_compare_writes_tables_and_pareto_plot(world_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--rules", "sum,sago", "--lrs", "1e-3", "--seeds", "0,1", "--steps", "8"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"results.md", "results.json", "pareto.png", "tradeoff.png"}
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4
    assert {(r["rule"], r["seed"]) for r in results["runs"]} == {
        ("sum", 0),
        ("sum", 1),
        ("sago", 0),
        ("sago", 1),
    }
    assert [e["seeds"] for e in results["aggregate"]] == [[0, 1], [0, 1]]
    markdown = (out / "results.md").read_text()
    assert "| ga | sago | 0.001 |" in markdown and "cos(g,r)" in markdown
    assert "At comparable forgetting" in markdown
    assert markdown in capsys.readouterr().out


@pytest.mark.parametrize("stop_at", [1, 3])
def test_an_interrupted_compare_keeps_its_finished_runs(world_cache, tmp_path, capsys, monkeypatch, stop_at):
    import signal

    from gradsynth.cli import compare_command
    from gradsynth.cli.signals import Interrupted

    calls = []
    real = compare_command.run_unlearning

    def stopped_at_a_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise Interrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_command, "run_unlearning", stopped_at_a_run)
    out = tmp_path / "cmp"
    args = ["compare", "--quick", "--rules", "sum,sago", "--lrs", "1e-3", "--seeds", "0,1", "--steps", "3"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 128 + signal.SIGTERM
    last = without_progress(capsys.readouterr().err).strip().splitlines()[-1]
    if stop_at == 1:  # nothing finished: nothing written
        assert not out.exists() and last.endswith("no output folder was written"), last
        return
    assert last == f"gradsynth: interrupted (SIGTERM); the output folder {out} is complete"
    results = json.loads((out / "results.json").read_text())
    assert [(r["rule"], r["seed"]) for r in results["runs"]] == [("sum", 0), ("sago", 0)]
    assert results["interrupted"] == {"signal": "SIGTERM", "runs_finished": 2, "runs_planned": 4}
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("**Interrupted (SIGTERM) after 2 of 4 runs**")
    assert "| ga | sago | 0.001 |" in markdown


def test_unlearn_on_a_saved_model_with_jsonl_data(world_cache, tmp_path):
    from gradsynth.world import SIZES, build_world

    facts = build_world(SIZES["ci"], 0).people
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.csv"
    forget.write_text(
        "".join(json.dumps({"question": f.question, "answer": f.answer}) + "\n" for f in facts[:4])
    )
    retain.write_text("text\n" + "".join(f'"{f.question} Answer: {f.answer}"\n' for f in facts[8:20]))
    out = tmp_path / "run"
    args = ["unlearn", "--model", str(world_cache), "--forget", str(forget), "--retain", str(retain)]
    args += ["--rule", "pcgrad", "--forget-loss", "npo", "--retain-loss", "kl", "--beta", "0.5"]
    assert main([*args, "--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    after = report["metrics"]["after"]
    assert set(after) == {"forget", "retain"}
    assert after["forget"]["recall"] is not None and after["retain"]["recall"] is None  # text has no answers
    assert report["metrics"]["before"]["forget"]["rougeL_recall"] == 1.0  # the model knew these answers
    assert 0.0 <= after["forget"]["rougeL_recall"] <= 1.0 and "rougeL_recall" not in after["retain"]
    assert report["settings"]["losses"] == {
        "forget": "npo",
        "retain": "kl",
        "beta": 0.5,
        "delta": 0.0,
        "rmu_layer": None,
        "rmu_steering": 20.0,
    }
    assert (out / "model.safetensors").is_file()


@pytest.fixture
def data(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Who?", "answer": "Me"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("prompt,completion\na,b\n")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "vit"}')
    return {"good": good, "empty": empty, "wrong": wrong, "not_a_model": not_a_model}


BAD_INPUTS = {
    "missing forget file": (
        ["--model", "{not_a_model}", "--forget", "{tmp}/nope.jsonl", "--retain", "{good}"],
        "no such file",
    ),
    "empty forget set": (
        ["--model", "{not_a_model}", "--forget", "{empty}", "--retain", "{good}"],
        "no rows",
    ),
    "unknown columns": (
        ["--model", "{not_a_model}", "--forget", "{wrong}", "--retain", "{good}"],
        "'question' and 'answer'",
    ),
    "unsupported file type": (
        ["--model", "{not_a_model}", "--forget", "{tmp}/f.xlsx", "--retain", "{good}"],
        "unsupported",
    ),
    "unknown rule": (["--rule", "sagoo"], "unknown rule 'sagoo'"),
    "unknown forget loss": (["--forget-loss", "unlearn"], "invalid choice: 'unlearn'"),
    "unknown retain loss": (["--retain-loss", "ce"], "invalid choice: 'ce'"),
    "not a causal LM": (
        ["--model", "{not_a_model}", "--forget", "{good}", "--retain", "{good}"],
        "not a causal language model",
    ),
    "model without data": (["--model", "{not_a_model}"], "needs --forget FILE and --retain FILE"),
    "data without model": (["--forget", "{good}", "--retain", "{good}"], "go with --model"),
    "negative steps": (["--steps", "0"], "must be at least 1"),
    "non-empty out": (["--out", "{nonempty}"], "not empty; pass --overwrite"),
    "out is a file": (["--out", "{good}"], "is a file"),
    "unknown device": (["--device", "warp-drive"], "--device warp-drive: not available here"),
    "compare: bad learning rates": (
        ["compare", "--lrs", "1e-3,fast"],
        "--lrs '1e-3,fast': not a comma-separated",
    ),
    "compare: negative learning rate": (["compare", "--lrs=1e-3,-1e-3"], "learning rates must be > 0"),
    "compare: bad seeds": (["compare", "--seeds", "one"], "--seeds 'one'"),
}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions that bind")
def test_unreadable_file_is_reported(data, tmp_path, capsys):
    data["good"].chmod(0)
    try:
        argv = ["unlearn", "--model", "x", "--forget", str(data["good"]), "--retain", str(data["good"])]
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    finally:
        data["good"].chmod(0o644)
    assert "cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_a_non_zero_exit(case, data, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    fields = {**{k: str(v) for k, v in data.items()}, "tmp": str(tmp_path), "nonempty": str(nonempty)}
    argv = [a.format(**fields) for a in args]
    argv = argv if argv[0] == "compare" else ["unlearn", *argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: "), err
    assert message in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert (nonempty / "keep.txt").read_text() == "mine"


def test_a_failure_midway_leaves_no_output_folder(world_cache, tmp_path, monkeypatch):
    import gradsynth.cli.unlearn_command as command

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(command, "plot_curves", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["unlearn", "--world", "ci", "--steps", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    assert list(tmp_path.iterdir()) == []


def test_console_entry_point_reports_errors_in_a_subprocess(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradsynth.cli",
            "compare",
            "--rules",
            "sum,nope",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "gradsynth: error: --rules: unknown rule 'nope'; " + run.stderr.split("; ", 1)[1].strip()
    ]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module", ["gradsynth", "gradsynth.cli"])
def test_python_dash_m_runs_the_command_line(module, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", module, "unlearn", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--forget-target" in done.stdout
