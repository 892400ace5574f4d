"""``gradsynth compare --jobs N``: worker processes claim cells; one merged result, as one process's."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import copy_world_cache
from helpers import cache_env, one_line

from gradsynth.cli import main
from gradsynth.cli.compare_jobs import claimer, worker_argv

GRID = ["compare", "--world", "ci", "--rules", "sum,sago", "--lrs", "1e-3", "--steps", "3", "--seeds", "0,1"]


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    with cache_env(cache):
        yield cache


def _without_time(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if " runs in " not in line)


def test_two_workers_write_what_one_process_writes(world_cache, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*GRID, "--no-progress", "--out", str(one)]) == 0
    assert main([*GRID, "--jobs", "2", "--out", str(two)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs in 2 worker processes" in printed
    alone, merged = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert [r["cell"] for r in merged["runs"]] == [0, 1, 2, 3]
    for run in alone["runs"] + merged["runs"]:
        run.pop("seconds")
    # Each worker runs its cells as one process would (same model, batches, thread count).
    assert merged["runs"] == alone["runs"]
    assert merged["aggregate"] == alone["aggregate"] and merged["paired"] == alone["paired"]
    assert merged["settings"].pop("jobs") == 2 and merged["settings"] == alone["settings"]
    assert _without_time((two / "results.md").read_text()) == _without_time((one / "results.md").read_text())
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    logs = printed.split("logs in ")[1].split(")")[0]
    assert not Path(logs).exists()  # the workers' folder is removed once merged


def test_a_failing_worker_ends_the_comparison_in_one_line(world_cache, tmp_path, capsys):
    data = tmp_path / "f.jsonl"
    data.write_text(json.dumps({"question": "Where?", "answer": "Orsk"}) + "\n")
    out = tmp_path / "out"
    argv = ["compare", "--model", str(tmp_path / "no-such-model"), "--forget", str(data)]
    argv += ["--retain", str(data), "--rules", "sum,sago", "--steps", "1", "--jobs", "2", "--out", str(out)]
    assert main(argv) == 2
    line = one_line(capsys, "compare --jobs: worker", "failed: gradsynth: error:", "no-such-model")
    assert "every worker's log is in" in line
    assert not out.exists()


def test_worker_argv_drops_what_only_the_parent_takes():
    argv = ["compare", "--jobs", "2", "--out", "x", "--rules=sum", "--overwrite", "--jobs=3", "--no-progress"]
    assert worker_argv([*argv, "--out=y", "--seeds", "0,1"]) == ["compare", "--rules=sum", "--seeds", "0,1"]


def test_every_cell_is_claimed_exactly_once(tmp_path):
    claims = [claimer(tmp_path) for _ in range(4)]  # four workers racing for the same 200 cells
    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(lambda claim: [c for c in range(200) if claim(c)], claims))
    assert sorted(c for cells in won for c in cells) == list(range(200))
    assert all(claimer(None)(c) for c in range(3))  # no queue: every cell is this process's
