"""``--forget-target`` (comparable forgetting), the objective matrix and RMU through the command line,
on the CI world with a handful of steps; every bad combination is one line and exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from helpers import without_progress

from gradsynth.cli import main
from gradsynth.cli.parser import build_parser
from gradsynth.cli.unlearn_command import settings_for


def _one_line_error(capsys, part: str) -> None:
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: ") and part in err, err


def test_unlearn_stops_at_the_forget_target_and_reports_it(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--forget-target", "0.25", "--steps", "40", "--lr", "2e-3"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    protocol, steps = report["settings"]["protocol"], report["steps"]
    assert protocol["reached"] and protocol["forget_target"] == 0.25 and protocol["step_cap"] == 40
    assert protocol["steps_taken"] == len(steps) < 40 and protocol["lr_used"] == 2e-3
    recalls = [s["forget_recall"] for s in steps]
    assert recalls[-1] <= 0.25 and all(r > 0.25 for r in recalls[:-1])  # the first step at/below it
    assert report["metrics"]["after"]["forget"]["recall"] == recalls[-1]  # the check is the real recall
    cos = [s["cos_fr"] for s in steps if s["cos_fr"] is not None]
    assert report["geometry_mean"]["cos_fr"] == pytest.approx(sum(cos) / len(cos))  # over steps taken
    assert f"Forget target 25% reached at step {len(steps)} with lr 0.002" in printed


def test_unlearn_climbs_the_ladder_when_the_cap_is_too_short(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--forget-target", "0", "--steps", "2", "--lr", "1e-5"]
    argv += ["--ladder-factor", "3", "--ladder-rungs", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    protocol = json.loads((out / "report.json").read_text())["settings"]["protocol"]
    assert [(r["lr"], r["steps"], r["reached"]) for r in protocol["rungs"]] == [
        (1e-5, 2, False),
        (pytest.approx(3e-5), 2, False),
    ]
    assert not protocol["reached"] and protocol["lr_used"] == pytest.approx(3e-5)
    assert "Forget target 0% not reached within 2 steps at any of lr 1e-05, 3e-05" in capsys.readouterr().out


def test_unlearn_descends_the_ladder_when_the_target_comes_too_soon(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--forget-target", "0.25", "--steps", "40", "--lr", "0.05"]
    argv += ["--min-steps", "3", "--ladder-rungs", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    protocol = report["settings"]["protocol"]
    rungs = protocol["rungs"]
    assert rungs[0]["lr"] == 0.05 and rungs[0]["reached"] and rungs[0]["steps"] < 3  # too soon
    assert [r["lr"] for r in rungs] == pytest.approx([0.05 / 2**k for k in range(len(rungs))])
    assert 2 <= len(rungs) <= 4  # at most --ladder-rungs descents
    # Every rung but the last reached the target too soon; the result is the last that reached it.
    assert all(r["reached"] and r["steps"] < 3 for r in rungs[:-1])
    result = rungs[-1] if rungs[-1]["reached"] else rungs[-2]
    assert protocol["reached"] and protocol["lr_used"] == pytest.approx(result["lr"])
    assert protocol["steps_taken"] == result["steps"] == len(report["steps"])
    assert "(descended from lr 0.05, which reached it at step" in capsys.readouterr().out


def test_min_steps_needs_a_target(tmp_path, capsys):
    assert main(["unlearn", "--min-steps", "3", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--min-steps needs --forget-target")


def test_compare_runs_the_objective_matrix_to_the_target(cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--world", "ci", "--rules", "sum,sago", "--forget-loss", "simnpo,rmu"]
    argv += ["--forget-target", "0.5", "--steps", "3", "--ladder-rungs", "2", "--seeds", "0,1"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs, table, splits = results["runs"], results["aggregate"], results["splits"]
    assert splits == list(results["before"]) and "forget" in splits  # whatever splits the world has
    assert len(runs) == 2 * 2 * 2 and len(table) == 2 * 2
    for run in runs:
        assert 1 <= run["steps"] <= 3
        assert run["lr"] == 1e-3 and run["lr_used"] == run["rungs"][-1]["lr"]
        assert run["reached"] == run["rungs"][-1]["reached"] and len(run["rungs"]) <= 2
        assert run["forget_target"] == 0.5 and run["step_cap"] == 3
    simnpo = next(r for r in runs if r["objective"] == "simnpo")["weights"]
    assert (simnpo["alpha"], simnpo["gamma"], simnpo["beta"], simnpo["delta"]) == (0.1, 1.0, 0.1, 0.1)
    rmu = next(r for r in runs if r["objective"] == "rmu")["weights"]
    assert rmu["retain"] == "activation"
    entry = table[0]
    assert {"objective", "rule", "lr", "seeds", "steps", "lr_used", "reached", *splits} <= set(entry)
    assert set(entry["forget"]) == {"mean", "std", "median", "min", "max"}
    assert entry["reached"] == sum(r["reached"] for r in runs[:1] + runs[4:5])  # seeds 0, 1 of simnpo+sum
    assert entry["steps"]["max"] == max(r["steps"] for r in runs[:1] + runs[4:5])
    assert set(results["settings"]["weights"]) == {"simnpo", "rmu"}
    markdown = (out / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| objective | rule |"))
    assert "| reached | steps | lr used |" in header and all(f"| {s} " in header for s in splits)
    assert "| rmu | sago | 0.001 |" in markdown and "rmu+sago" in markdown
    assert "At comparable forgetting" not in markdown  # every row already is


def test_unlearn_with_rmu_trains_only_the_chosen_weights(cache, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--forget-loss", "rmu", "--steps", "2", "--lr", "1e-2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["losses"]["forget"] == "rmu"
    assert report["settings"]["losses"]["retain"] == "activation"
    before = load_file(next(cache.iterdir()) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {name for name in before if not (before[name] == after[name]).all()}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}  # 2 layers: layer 2 // 4 = 0


def test_paper_weights_are_the_defaults_and_flags_override_them():
    parse = build_parser().parse_args
    simnpo = settings_for(parse(["unlearn", "--forget-loss", "simnpo"]), "sago", 1e-3, 0, 10)
    assert (simnpo.alpha, simnpo.gamma, simnpo.losses.beta, simnpo.losses.delta) == (0.1, 1.0, 0.1, 0.1)
    npo = settings_for(parse(["unlearn", "--forget-loss", "npo"]), "sago", 1e-3, 0, 10)
    assert (npo.alpha, npo.losses.beta) == (1.0, 1e-3)
    given = settings_for(
        parse(["unlearn", "--forget-loss", "simnpo", "--alpha", "1", "--beta", "2"]), "sum", 1, 0, 1
    )
    assert (given.alpha, given.gamma, given.losses.beta, given.losses.delta) == (1.0, 1.0, 2.0, 0.1)


BAD = {
    "ladder without target": (["--ladder-rungs", "3"], "--ladder-rungs needs --forget-target"),
    "factor without target": (["--ladder-factor", "3"], "--ladder-factor needs --forget-target"),
    "target 1": (["--forget-target", "1"], "--forget-target: must be a recall in [0, 1)"),
    "target nan": (["--forget-target", "nan"], "--forget-target: must be a finite number"),
    "factor 1": (["--forget-target", "0.1", "--ladder-factor", "1"], "--ladder-factor: must be > 1"),
    "rungs 0": (["--forget-target", "0.1", "--ladder-rungs", "0"], "--ladder-rungs: must be at least 1"),
    "rmu with nll": (["--forget-loss", "rmu", "--retain-loss", "nll"], "drop --retain-loss nll"),
    "activation with ga": (["--retain-loss", "activation"], "goes with --forget-loss rmu only"),
    "rmu layer": (
        ["--forget-loss", "rmu", "--rmu-layer", "7"],
        "--forget-loss rmu: RMU layer 7 is out of range",
    ),
    "steering": (["--forget-loss", "rmu", "--rmu-steering", "inf"], "--rmu-steering: must be a finite"),
    "compare bad objective": (
        ["compare", "--forget-loss", "ga,gd"],
        "--forget-loss: unknown forget loss 'gd'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_protocol_and_objective_flags_are_one_line(cache, tmp_path, capsys, case):
    args, message = BAD[case]
    argv = ["compare", *args[1:]] if args[0] == "compare" else ["unlearn", *args]
    assert main([*argv, "--world", "ci", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "o").exists()


def test_a_forget_target_on_plain_text_forget_data_is_one_line(cache, tmp_path, capsys):
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("some text to forget\n")
    retain.write_text("some text to keep\n")
    model = str(next(cache.iterdir()))
    argv = ["unlearn", "--model", model, "--forget", str(forget), "--retain", str(retain)]
    assert main([*argv, "--forget-target", "0.1", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--forget-target needs question/answer forget data")
    assert not (tmp_path / "o").exists()


def test_the_documented_one_command_run_is_what_reproduce_runs():
    import importlib.util
    import shlex

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("reproduce", root / "benchmarks" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    argv = reproduce.compare_argv("default", 10, Path("runs/reproduce"), 1)
    args = build_parser().parse_args(argv)  # the flags exist and parse
    assert args.forget_target == 0.1 and args.forget_loss == "ga,npo,simnpo,rmu"
    assert args.seeds == ",".join(str(s) for s in range(10))
    docs = (root / "docs" / "reproducing.md").read_text().replace("\\\n", " ")
    assert " ".join(("gradsynth " + shlex.join(argv)).split()) in " ".join(docs.split())


# The check an installation can run (docs/reproducing.md, "Checking an installation"): its command
# and results.md are pasted there between these markers. The digits came from one host; on any host
# (another processor kind rounds torch's float32 kernels differently, and a change to how a sum is
# taken moves a last digit) the same text must come back with every number within DIGITS_OFF units
# of its last printed digit. Bit-for-bit reproducibility is checked where it is promised: the same
# processor kind and thread count (tests/test_world_reproducible.py).
CHECK_BEGIN, CHECK_END = "<!-- installation-check:begin -->", "<!-- installation-check:end -->"
# Measured on an Intel AVX-512 host: two cosines of the geometry table moved by one unit of the third
# decimal (-0.250 -> -0.251, 0.305 -> 0.304), everything else identical. A changed fact count moves a
# recall cell by 2.6 points or more, i.e. 26 units of its last digit: that is not rounding.
DIGITS_OFF = 2
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def numbers_agree(expected: str, actual: str, units: int) -> list[str]:
    """Where ``actual`` differs from ``expected`` by more than ``units`` of each number's last printed
    digit, or in any text between the numbers; an empty list when they agree."""
    if _NUMBER.split(expected) != _NUMBER.split(actual):
        return ["the text around the numbers differs (another table, column or row)"]
    found = []
    for want, got in zip(_NUMBER.findall(expected), _NUMBER.findall(actual), strict=True):
        decimals = len(want.split(".")[1]) if "." in want else 0
        if abs(float(want) - float(got)) > units * 10.0**-decimals + 1e-12:
            found.append(f"{got} where the docs say {want}")
    return found


def test_numbers_agree_compares_each_number_in_units_of_its_last_digit():
    assert numbers_agree("| a | -0.250 | 96.2 ± 1.8 (13) |", "| a | -0.251 | 96.2 ± 1.8 (13) |", 2) == []
    assert numbers_agree("x -0.250", "x -0.253", 2) == ["-0.253 where the docs say -0.250"]
    assert numbers_agree("retain 96.2", "retain 93.6", 2) == ["93.6 where the docs say 96.2"]
    assert numbers_agree("steps 13", "steps 14", 2) == []  # integers: 2 units is 2
    assert numbers_agree("steps 13", "steps 16", 2) == ["16 where the docs say 13"]
    assert numbers_agree("| sago | 1 |", "| pcgrad | 1 |", 2) != []
    assert numbers_agree("a 1 b", "a 1 b 2", 2) != []  # a number more


def test_the_documented_installation_check_regenerates(tmp_path, monkeypatch, capsys):
    import shlex

    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "reproducing.md").read_text()
    block = docs[docs.index(CHECK_BEGIN) + len(CHECK_BEGIN) : docs.index(CHECK_END)]
    command, expected = block.split("```text\n")[0], block.split("```text\n")[1].split("```")[0]
    argv = shlex.split(command.split("```bash\n")[1].split("```")[0].replace("\\\n", " "))
    assert argv[0] == "gradsynth" and "--out" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "check")
    # The shipped model, as on a fresh install: the same weights on every processor kind.
    monkeypatch.setenv("GRADSYNTH_SHIPPED_WORLD", "1")
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    assert main([*argv[1:], "--no-progress"]) == 0
    capsys.readouterr()
    actual = (tmp_path / "check" / "results.md").read_text().strip()
    assert numbers_agree(expected.strip(), actual, DIGITS_OFF) == []


def test_the_documented_audit_runs_are_the_comparison_with_audit_under_both_targets():
    import shlex

    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "reproducing.md").read_text()
    section = docs[docs.index("## How deep is the forgetting: the audit") :]
    block = section.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    targets = []
    for argv in commands:
        assert argv[0] == "gradsynth"
        args = build_parser().parse_args(argv[1:])  # the flags exist and parse
        assert args.audit and args.seeds == "0,1,2,3,4" and args.forget_loss == "ga,npo,simnpo"
        assert args.rules == "sum,pcgrad,sago,sago_prefer_retain" and args.steps == 60
        targets.append(args.forget_target)
    assert targets == [0.1, "reference"]
