"""The GPU check: every number gradsynth needs from a GPU, in one run of at most 8 minutes.

On one CUDA device (an H100/H200 is what the sizes are chosen for), it writes ``gpu_check.json``
and ``summary.md`` under ``--out`` after every stage, so a run cut short keeps what it measured:

1. ``environment``: the card, its memory, the driver, CUDA, torch and Triton versions, the
   bandwidth of a device-to-device copy and of ``torch.add``;
2. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (every rule fused and eager against the
   float64 oracle in fp32/bf16/fp16, non-finite values, the fp16 ``GradScaler`` skip, no host
   sync in the synthesis under ``torch.cuda.set_sync_debug_mode("error")``, streaming,
   bitsandbytes' 8-bit AdamW), with the failures' names and first lines;
3. ``synthesis``: ``benchmarks/run.py``'s speed table on the device: every rule x a flat tensor
   of 2^30 elements and a Llama-shaped list of 1.04B elements x float32/bfloat16, as a ratio to
   ``torch.add`` on the same tensors, with the achieved GB/s as a share of the copy bandwidth;
4. ``memory``: extra gradient sets of a step above plain training per rule, streaming and
   geometry included (``benchmarks/memory_peak.py`` with ``torch.cuda.max_memory_allocated``);
5. ``end_to_end``: the step of a 0.94B-parameter Llama (random init, bfloat16, AdamW) as a ratio
   to the plain summed-loss step, for sum, pcgrad, sago and sago streaming, with and without
   geometry (``benchmarks/end_to_end.py``).

Each stage is guarded: one that fails records its error and the next still runs. A global
budget (``--budget-s``, default 480) skips what would not fit, recording that it did. The
``targets`` entry compares the results with gradsynth's targets (SAGO and sum <= 1.25x
``torch.add``, PCGrad <= 1.9x, no host sync, <= 1.05 extra gradient sets with <= 0.15 streaming,
end to end <= 1.05x the plain step).

``--dry-run`` runs every stage on the CPU at tiny sizes in well under a minute, collecting the
CUDA tests instead of running them: the JSON has every field (CI runs it, so the script cannot
rot; its numbers mean nothing).

Usage::

    python benchmarks/gpu_check.py --out /tmp/gpu          # on a CUDA machine, <= 8 minutes
    python benchmarks/gpu_check.py --out /tmp/gpu2 --only tests,memory --budget-s 240  # redo two
    python benchmarks/gpu_check.py --dry-run --out /tmp/x  # anywhere, tiny sizes, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The checkout's gradsynth, for this process and the tests' (no installation needed on a lent GPU).
sys.path[:0] = [str(HERE), str(REPO)]

import end_to_end  # noqa: E402
import run  # noqa: E402

STAGES = ("environment", "tests", "synthesis", "memory", "end_to_end")
#: Fields every stage's entry holds besides its status (the dry run checks them all).
SCHEMA: dict[str, tuple[str, ...]] = {
    "environment": (
        "device",
        "torch",
        "python",
        "cpu",
        "add_gb_per_s",
        "copy_gb_per_s",
        "gpu",
        "gpu_memory_gib",
        "gpu_capability",
        "driver",
        "cuda",
        "triton",
    ),
    "tests": ("mode", "command", "collected", "passed", "failed", "skipped", "errors", "failures"),
    "synthesis": ("sizes", "copy_gb_per_s", "rows"),
    "memory": ("layers", "width", "grad_set_mib", "extra_sets"),
    "end_to_end": ("params", "config", "naive_ms", "variants"),
}
ROW_FIELDS = (
    "rule",
    "layout",
    "dtype",
    "ms",
    "ratio_to_add",
    "gb_per_s",
    "share_of_copy",
    "eager_ratio_to_add",
)
STAGE_FIELDS = ("status", "seconds", "error")

#: (rule, memory_peak.py mode) for the memory stage.
MEMORY_CONFIGS = [
    ("sago", "plain"),
    *[(rule, "loss") for rule in run.RULES],
    ("sago", "streaming"),
    ("pcgrad", "streaming"),
    ("sago", "loss+geometry"),
    ("pcgrad", "loss+geometry"),
    ("sago", "streaming+geometry"),
]
#: (rule, streaming, backend, track_geometry) for the end-to-end stage.
E2E_VARIANTS = [
    (rule, streaming, "auto", geometry)
    for geometry in (False, True)
    for rule, streaming in (("sum", False), ("pcgrad", False), ("sago", False), ("sago", True))
]
TARGETS = {
    "synthesis_ratio_to_add": {
        "sago": 1.25,
        "sago_prefer_retain": 1.25,
        "sum": 1.25,
        "pcgrad": 1.9,
        "pcgrad_global": 1.9,
    },
    "extra_gradient_sets": 1.05,
    "extra_gradient_sets_streaming": 0.15,
    "end_to_end_ratio": 1.05,
}

# Sizes: (real run, dry run).
SIZES = {
    "flat_numel": (1 << 30, 1 << 12),
    "llama": ("2048,18,5504,32000", "32,1,64,128"),  # hidden,layers,intermediate,vocab: 1.04B / 21k
    "reps": (5, 3),
    "ref_reps": (1, 1),
    "memory": ((32, 4096), (2, 64)),  # layers x width x width: 537M fp32 parameters / 8k
    "e2e": (
        dict(hidden=2048, layers=16, vocab=32000, batch=4, seq=512, reps=10),  # 0.94B parameters
        dict(hidden=32, layers=1, vocab=128, batch=2, seq=16, reps=2),
    ),
    "bandwidth_numel": (1 << 28, 1 << 16),
}
#: Seconds a stage needs at least to be started (real run); the tests get at most `TESTS_MAX_S`.
STAGE_MIN_S = {"environment": 5, "tests": 60, "synthesis": 60, "memory": 20, "end_to_end": 60}
TESTS_MAX_S = 210
#: Seconds kept for each later stage when the tests' time limit is set (what they took, estimated).
RESERVE_AFTER_TESTS_S = {"synthesis": 90, "memory": 40, "end_to_end": 70}


class Check:
    """One run of the check: the result dictionary, the clock, and the writing of the files."""

    def __init__(self, out: Path, dry_run: bool, device: str, budget_s: float) -> None:
        self.out = out
        self.dry_run = dry_run
        self.device = device
        self.budget_s = budget_s
        self.planned: tuple[str, ...] = STAGES  # the stages this run will try (`--only`)
        self.start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.result: dict[str, Any] = {
            "dry_run": dry_run,
            "device": device,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "total_s": 0.0,
            "stages": {},
            "targets": {},
        }

    def size(self, name: str) -> Any:
        return SIZES[name][1 if self.dry_run else 0]

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, body: Callable[[], dict]) -> None:
        """Run one stage, recording its fields, or its error, or that the budget skipped it."""
        need = 0 if self.dry_run else STAGE_MIN_S[name]
        entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "error": None}
        if self.remaining() < need:
            entry["error"] = f"time budget: {self.remaining():.0f} s left, the stage needs {need} s"
        else:
            started = time.monotonic()
            try:
                entry.update(body())
                entry["status"] = "ok"
            except Exception as error:  # a stage's failure must not stop the others
                entry["status"] = "error"
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc().splitlines()[-12:]
            entry["seconds"] = time.monotonic() - started
        print(
            f"[gpu_check] {name}: {entry['status']} ({entry['seconds']:.1f} s){_error_line(entry)}",
            flush=True,
        )
        self.result["stages"][name] = entry
        _free(self.device)
        self.write()

    def write(self) -> None:
        """Write the JSON and the summary; a fault in the verdicts or the summary is recorded, not raised."""
        self.result["total_s"] = time.monotonic() - self.start
        try:
            self.result["targets"] = targets(self.result["stages"], self.dry_run)
        except Exception as error:
            self.result["targets"] = {"meaningful": False, "error": f"{type(error).__name__}: {error}"}
        try:
            text = summary(self.result)
        except Exception as error:
            failed = f"{type(error).__name__}: {error}"
            text = f"# gradsynth GPU check\n\nThe summary failed ({failed}); see gpu_check.json.\n"
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2, default=str))
        (self.out / "summary.md").write_text(text)


def _error_line(entry: dict) -> str:
    return f": {entry['error']}" if entry.get("error") else ""


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----- the stages ---------------------------------------------------------------------------------


def environment(check: Check) -> dict:
    where = run.machine(torch.get_num_threads(), check.size("bandwidth_numel"), check.device)
    for key in SCHEMA["environment"]:
        where.setdefault(key, None)  # the GPU fields stay None on the CPU
    return where


def tests(check: Check) -> dict:
    """``pytest -m cuda tests/test_cuda.py``: run on a GPU, collected only in the dry run."""
    report = check.out / "cuda-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_cuda.py",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
    ]
    # -v: one line per test, so that a run cut off at its limit still tells what passed.
    command += ["--collect-only", "-q"] if check.dry_run else ["-v", "-rf", f"--junitxml={report}"]
    reserve = sum(RESERVE_AFTER_TESTS_S.get(name, 0) for name in check.planned)
    limit = 120 if check.dry_run else max(30, min(TESTS_MAX_S, check.remaining() - reserve))
    entry: dict[str, Any] = {"mode": "collect" if check.dry_run else "run", "command": " ".join(command[1:])}
    entry["time_limit_s"] = limit
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit, check=False
        )
        output, returncode, timed_out = done.stdout + done.stderr, done.returncode, False
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr)
        returncode, timed_out = None, True
    (check.out / "cuda-tests.log").write_text(output)
    entry.update(returncode=returncode, timed_out=timed_out)
    if check.dry_run:
        match = re.search(r"(\d+) tests? collected", output)
        collected = int(match.group(1)) if match else 0
        entry.update(collected=collected, passed=0, failed=0, skipped=0, errors=0, failures=[])
        if returncode != 0 or collected == 0:
            raise RuntimeError(f"collecting the CUDA tests failed (exit {returncode}): {output[-500:]}")
        return entry
    entry.update(_junit(report) if report.exists() else _counts_from_output(output))
    if timed_out:
        entry["failures"].append(f"the tests ran past their {limit:.0f} s limit (see cuda-tests.log)")
    return entry


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total = int(suite.get("tests", 0))
    failed, errors, skipped = (int(suite.get(key, 0)) for key in ("failures", "errors", "skipped"))
    failures = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                first = (node.get("message") or "").strip().splitlines()[:1]
                failures.append(f"{case.get('name')}: {first[0] if first else kind}"[:400])
    return {
        "collected": total,
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "skipped": skipped,
        "errors": errors,
        "failures": failures,
    }


_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.MULTILINE)


def _counts_from_output(output: str) -> dict:
    """The counts from ``pytest -v`` lines, for a run cut off before it wrote its junit report."""
    outcomes = dict(_VERBOSE_LINE.findall(output))  # a test's last line wins (ERROR at teardown)
    kinds = list(outcomes.values())
    return {
        "collected": len(outcomes),
        "passed": kinds.count("PASSED") + kinds.count("XFAIL") + kinds.count("XPASS"),
        "failed": kinds.count("FAILED"),
        "skipped": kinds.count("SKIPPED"),
        "errors": kinds.count("ERROR"),
        "failures": [
            "no junit report was written (cut off?): counts are of the tests that finished",
            *[f"{name}: {kind}" for name, kind in outcomes.items() if kind in ("FAILED", "ERROR")],
        ],
    }


def synthesis(check: Check) -> dict:
    """`run.py`'s speed table on the device, one (layout, dtype) case at a time under the budget."""
    hidden, layers, intermediate, vocab = (int(x) for x in check.size("llama").split(","))
    layouts = {
        "flat": [(check.size("flat_numel"),)],
        "llama": run.llama_shapes(hidden, layers, intermediate, vocab),
    }
    copy = check.result["stages"].get("environment", {}).get("copy_gb_per_s")
    if copy is None:
        copy = run.copy_bandwidth(check.size("bandwidth_numel"), device=check.device)
    rows, skipped = [], []
    for layout, shapes in layouts.items():
        for dtype_name in run.DTYPES:
            # Each case takes seconds; the later stages keep the time they need to start.
            later = sum(STAGE_MIN_S[name] for name in ("memory", "end_to_end") if name in check.planned)
            if not check.dry_run and check.remaining() < later + 20:
                skipped.append(f"{layout} {dtype_name}")
                continue
            for row in run._rows_for(
                layout, dtype_name, shapes, check.size("reps"), check.size("ref_reps"), check.device
            ):
                row["share_of_copy"] = row["gb_per_s"] / copy
                rows.append(row)
            _free(check.device)
    return {
        "sizes": {
            "flat": check.size("flat_numel"),
            "llama": sum(torch.Size(s).numel() for s in layouts["llama"]),
            "llama_config": check.size("llama"),
            "llama_tensors": len(layouts["llama"]),
        },
        "copy_gb_per_s": copy,
        "rows": rows,
        "skipped_for_time": skipped,
    }


def memory(check: Check) -> dict:
    """Extra gradient sets per configuration: in this process (the CPU's resident set in the dry run)."""
    import memory_peak

    layers, width = check.size("memory")
    extra, grad_set_mib = {}, None
    for rule, mode in MEMORY_CONFIGS:
        measured = memory_peak.measure(rule, mode, 1, layers, width, check.device)
        extra[run.memory_name(rule, mode)] = measured["extra_sets"]
        grad_set_mib = measured["grad_set_mib"]
        _free(check.device)
    return {"layers": layers, "width": width, "grad_set_mib": grad_set_mib, "extra_sets": extra}


def e2e(check: Check) -> dict:
    return end_to_end.measure(
        **check.size("e2e"), device=check.device, dtype=torch.bfloat16, variants=E2E_VARIANTS
    )


# ----- targets and the summary ------------------------------------------------------------------


def targets(stages: dict, dry_run: bool) -> dict:
    """Each target with the measured values it covers and whether they meet it (None: not measured)."""
    out: dict[str, Any] = {"meaningful": not dry_run}
    rows = stages.get("synthesis", {}).get("rows") or []
    limits = TARGETS["synthesis_ratio_to_add"]
    cases = {f"{r['rule']} {r['layout']} {r['dtype']}": (r["ratio_to_add"], limits[r["rule"]]) for r in rows}
    out["synthesis"] = _verdict(cases)
    tests_entry = stages.get("tests", {})
    if tests_entry.get("status") == "ok" and tests_entry.get("mode") == "run":
        bad = [f for f in tests_entry.get("failures", []) if "no_host_sync" in f]
        ran = tests_entry["collected"] - tests_entry["skipped"]
        out["no_host_sync"] = {"met": not bad and ran > 0, "failures": bad}
        out["cuda_tests"] = {
            "met": ran > 0
            and tests_entry["failed"] == tests_entry["errors"] == 0
            and not tests_entry["timed_out"]
        }
    else:
        out["no_host_sync"] = out["cuda_tests"] = {"met": None}
    sets = stages.get("memory", {}).get("extra_sets") or {}
    cases = {
        name: (
            value,
            TARGETS["extra_gradient_sets_streaming" if "streaming" in name else "extra_gradient_sets"],
        )
        for name, value in sets.items()
        if name != "plain training"
    }
    out["memory"] = _verdict(cases)
    variants = stages.get("end_to_end", {}).get("variants") or {}
    out["end_to_end"] = _verdict(
        {name: (v["ratio"], TARGETS["end_to_end_ratio"]) for name, v in variants.items()}
    )
    return out


def _verdict(cases: dict[str, tuple[float, float]]) -> dict:
    if not cases:
        return {"met": None, "misses": {}}
    misses = {
        name: {"value": value, "target": limit} for name, (value, limit) in cases.items() if value > limit
    }
    return {"met": not misses, "misses": misses}


def summary(result: dict) -> str:
    """The Markdown summary: one section per stage; a section that cannot be written says why."""
    stages = result["stages"]
    lines = [
        "# gradsynth GPU check"
        + (" (dry run on the CPU: the numbers mean nothing)" if result["dry_run"] else ""),
        "",
    ]
    env = stages.get("environment", {})
    lines += [
        f"Started {result['started']}, {result['total_s']:.0f} s of a {result['budget_s']:.0f} s budget, "
        f"device `{result['device']}`.",
        "",
    ]
    if env.get("status") == "ok":
        lines += [
            f"- card: {env['gpu']} ({_fmt(env['gpu_memory_gib'], 0)} GiB, "
            f"capability {env['gpu_capability']}), driver {env['driver']}, CUDA {env['cuda']}",
            f"- torch {env['torch']}, Triton {env['triton']}, Python {env['python']}, host CPU {env['cpu']}",
            f"- copy {_fmt(env['copy_gb_per_s'], 0)} GB/s, "
            f"torch.add {_fmt(env['add_gb_per_s'], 0)} GB/s (float32)",
            "",
        ]
    lines += ["| stage | status | seconds | error |", "|---|---|---|---|"]
    for name in STAGES:
        entry = stages.get(name, {"status": "not run", "seconds": 0.0, "error": None})
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry.get('error') or ''} |")
    lines.append("")
    for section in (_tests_md, _synthesis_md, _memory_md, _e2e_md, _targets_md):
        try:
            lines += section(result)
        except Exception as error:  # one bad field must not cost the rest of the summary
            lines += [f"({section.__name__.strip('_')}: {type(error).__name__}: {error})", ""]
    return "\n".join(lines) + "\n"


def _tests_md(result: dict) -> list[str]:
    stages = result["stages"]
    lines: list[str] = []
    t = stages.get("tests", {})
    if t.get("status") == "ok":
        lines += [
            f"## CUDA tests ({t['mode']})",
            "",
            f"{t['collected']} collected, {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped.",
            "",
            *[f"- {failure}" for failure in t["failures"]],
            "",
        ]
    return lines


def _synthesis_md(result: dict) -> list[str]:
    stages = result["stages"]
    lines: list[str] = []
    s = stages.get("synthesis", {})
    if s.get("status") == "ok":
        sizes = s["sizes"]
        lines += [
            "## Synthesis against torch.add",
            "",
            f"Flat tensor {sizes['flat']:,} elements; Llama list {sizes['llama']:,} elements in "
            f"{sizes['llama_tensors']} tensors; copy bandwidth {_fmt(s['copy_gb_per_s'], 0)} GB/s.",
            "",
            "| rule | layout | dtype | ms | x add | GB/s | share of copy | eager x add | warm-up s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            lines.append(
                f"| {r['rule']} | {r['layout']} | {r['dtype']} | {r['ms']:.2f} | {r['ratio_to_add']:.2f} | "
                f"{r['gb_per_s']:.0f} | {r['share_of_copy']:.2f} | {r['eager_ratio_to_add']:.2f} | "
                f"{r['warmup_s']:.1f} |"
            )
        lines.append("")
    return lines


def _memory_md(result: dict) -> list[str]:
    stages = result["stages"]
    lines: list[str] = []
    m = stages.get("memory", {})
    if m.get("status") == "ok":
        lines += [
            f"## Peak memory ({m['layers']} x {m['width']}^2 parameters, "
            f"one set {_fmt(m['grad_set_mib'], 0)} MiB)",
            "",
            "| configuration | extra gradient sets |",
            "|---|---|",
            *[f"| {name} | {value:.3f} |" for name, value in m["extra_sets"].items()],
            "",
        ]
    return lines


def _e2e_md(result: dict) -> list[str]:
    stages = result["stages"]
    lines: list[str] = []
    e = stages.get("end_to_end", {})
    if e.get("status") == "ok":
        lines += [
            f"## End-to-end step, {e['params'] / 1e6:.0f}M-parameter Llama, {e['config']['dtype']}, AdamW",
            "",
            f"Plain summed-loss step {e['naive_ms']:.1f} ms.",
            "",
            "| variant | ms | x plain | first step s |",
            "|---|---|---|---|",
            *[
                f"| {name} | {v['ms']:.1f} | {v['ratio']:.3f} | {v['first_step_s']:.1f} |"
                for name, v in e["variants"].items()
            ],
            "",
        ]
    return lines


def _targets_md(result: dict) -> list[str]:
    lines = ["## Targets", ""]
    for name, verdict in result["targets"].items():
        if not isinstance(verdict, dict):
            lines.append(f"- {name}: {verdict}")
            continue
        met = {True: "met", False: "MISSED", None: "not measured"}[verdict["met"]]
        misses = [f"{case} {v['value']:.3g} > {v['target']}" for case, v in verdict.get("misses", {}).items()]
        misses += verdict.get("failures", [])
        lines.append(f"- {name}: {met}{': ' + '; '.join(misses) if misses else ''}")
    return lines


def _fmt(value: float | None, digits: int) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, summary.md and the test log")
    parser.add_argument(
        "--dry-run", action="store_true", help="the CPU at tiny sizes; CUDA tests collected only"
    )
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--budget-s", type=float, default=None, help="default 480 (120 with --dry-run)")
    parser.add_argument(
        "--only",
        default=",".join(STAGES),
        help=f"comma-separated stages to run, to redo some (default: all of {','.join(STAGES)})",
    )
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available here; run it on a GPU machine, or pass --dry-run "
            "to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in STAGES]
    if unknown or not only:
        print(f"gpu_check: --only takes stages among {','.join(STAGES)}; got {args.only!r}", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (120.0 if args.dry_run else 480.0)
    check = Check(Path(args.out), args.dry_run, device, budget)
    check.planned = tuple(name for name in STAGES if name in only)
    if args.dry_run:
        torch.set_num_threads(1)
    bodies = {"environment": environment, "tests": tests, "synthesis": synthesis, "memory": memory}
    bodies["end_to_end"] = e2e
    for name in STAGES:
        if name in only or name == "environment":  # the environment: cheap, and every report needs it
            check.stage(name, lambda body=bodies[name]: body(check))
        else:
            check.result["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": "not in --only"}
    check.write()
    print(
        f"[gpu_check] wrote {check.out / 'gpu_check.json'} and {check.out / 'summary.md'} "
        f"in {check.result['total_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
