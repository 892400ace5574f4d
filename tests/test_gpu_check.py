"""benchmarks/gpu_check.py: its dry run writes every field, its verdicts and its test-report reading.

The whole dry run, the CUDA tests' collection in a child pytest included, runs in ``.ci/run``;
here the stages run in this process, the collection replaced by a stub (this suite collects
``tests/test_cuda.py`` itself), to stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the end-to-end stage's Llama

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def _collected(check):
    return {
        "mode": "collect",
        "command": "stub",
        "collected": 130,
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "errors": 0,
        "failures": [],
    }


def test_dry_run_writes_every_field(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "tests", _collected)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert result["targets"]["meaningful"] is False
    stages = result["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    for name, fields in gpu_check.SCHEMA.items():
        entry = stages[name]
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        missing = [f for f in (*gpu_check.STAGE_FIELDS, *fields) if f not in entry]
        assert not missing, (name, missing)
    rows = stages["synthesis"]["rows"]
    cases = {(r["rule"], r["layout"], r["dtype"]) for r in rows}
    rules = gpu_check.TARGETS["synthesis_ratio_to_add"]
    assert cases == {
        (rule, layout, dtype) for rule in rules for layout in ("flat", "llama") for dtype in ("fp32", "bf16")
    }
    assert all(set(gpu_check.ROW_FIELDS) <= row.keys() and row["ms"] > 0 for row in rows)
    memory = stages["memory"]["extra_sets"]
    assert len(memory) == len(gpu_check.MEMORY_CONFIGS)
    assert {"plain training", "sago streaming", "sago geometry", "sago streaming geometry"} <= memory.keys()
    variants = stages["end_to_end"]["variants"]
    assert set(variants) == {
        f"{rule}{' streaming' if streaming else ''}{' geometry' if geometry else ''}"
        for rule, streaming, _, geometry in gpu_check.E2E_VARIANTS
    }
    assert stages["end_to_end"]["config"]["dtype"] == "bfloat16"
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("## Synthesis", "## Peak memory", "## End-to-end step", "## Targets"):
        assert heading in summary


SIZES = {"flat": 1, "llama": 1, "llama_config": "1,1,1,1", "llama_tensors": 1}


def test_a_failing_stage_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    def broken(check):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(gpu_check, "tests", _collected)
    monkeypatch.setattr(gpu_check, "memory", broken)
    monkeypatch.setattr(
        gpu_check, "synthesis", lambda check: {"sizes": SIZES, "copy_gb_per_s": 1.0, "rows": []}
    )
    monkeypatch.setattr(
        gpu_check, "e2e", lambda check: {"params": 1, "config": {}, "naive_ms": 1.0, "variants": {}}
    )
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["memory"]["status"] == "error"
    assert stages["memory"]["error"] == "RuntimeError: out of memory, say"
    assert stages["end_to_end"]["status"] == "ok"
    assert "| memory | error |" in (tmp_path / "summary.md").read_text()


def test_a_fault_in_the_summary_still_leaves_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "summary", lambda result: 1 / 0)
    check = gpu_check.Check(tmp_path, dry_run=True, device="cpu", budget_s=10.0)
    check.stage("environment", lambda: {"torch": "x"})
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["environment"]["torch"] == "x"
    assert "ZeroDivisionError" in (tmp_path / "summary.md").read_text()


def test_a_spent_budget_skips_the_stage_and_says_so(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=False, device="cpu", budget_s=1.0)
    check.stage("synthesis", lambda: pytest.fail("the stage ran past the budget"))
    entry = check.result["stages"]["synthesis"]
    assert entry["status"] == "skipped" and "time budget" in entry["error"]


def test_targets_name_what_misses():
    stages = {
        "synthesis": {
            "rows": [
                {"rule": "sago", "layout": "flat", "dtype": "bf16", "ratio_to_add": 1.3},
                {"rule": "pcgrad", "layout": "flat", "dtype": "bf16", "ratio_to_add": 1.8},
            ]
        },
        "memory": {"extra_sets": {"plain training": 0.0, "sago": 1.0, "sago streaming": 0.2}},
        "end_to_end": {"variants": {"sago geometry": {"ratio": 1.04}}},
        "tests": {
            "status": "ok",
            "mode": "run",
            "collected": 10,
            "skipped": 0,
            "failed": 1,
            "errors": 0,
            "timed_out": False,
            "failures": ["test_synthesis_makes_no_host_sync_on_cuda[fp32-sago-False-plain-compiled]: boom"],
        },
    }
    got = gpu_check.targets(stages, dry_run=False)
    assert got["synthesis"] == {"met": False, "misses": {"sago flat bf16": {"value": 1.3, "target": 1.25}}}
    assert got["memory"]["met"] is False and list(got["memory"]["misses"]) == ["sago streaming"]
    assert got["end_to_end"] == {"met": True, "misses": {}}
    assert got["no_host_sync"]["met"] is False and got["cuda_tests"]["met"] is False


def test_junit_report_is_read(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase name="test_a"/><testcase name="test_b"><failure message="AssertionError: x&#10;more"/>'
        '</testcase><testcase name="test_c"><skipped/></testcase></testsuite></testsuites>'
    )
    got = gpu_check._junit(report)
    assert got == {
        "collected": 3,
        "passed": 1,
        "failed": 1,
        "skipped": 1,
        "errors": 0,
        "failures": ["test_b: AssertionError: x"],
    }


def test_a_cut_off_test_run_is_counted_from_its_verbose_lines():
    output = (
        "tests/test_cuda.py::test_a[fp32] PASSED [  1%]\n"
        "tests/test_cuda.py::test_b[bf16] FAILED [  2%]\n"
        "tests/test_cuda.py::test_c SKIPPED (needs bitsandbytes) [  3%]\n"
        "tests/test_cuda.py::test_d "
    )
    got = gpu_check._counts_from_output(output)
    assert (got["collected"], got["passed"], got["failed"], got["skipped"]) == (3, 1, 1, 1)
    assert got["failures"][1:] == ["tests/test_cuda.py::test_b[bf16]: FAILED"]


def test_only_some_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "tests", _collected)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "tests"]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert [stages[name]["status"] for name in gpu_check.STAGES] == [
        "ok",
        "ok",
        "skipped",
        "skipped",
        "skipped",
    ]
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "tests,gpu"]) == 2


def test_without_cuda_it_says_how_to_check_the_script(tmp_path, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dry-run" in err
