"""`gradsynth compare` tables for a task whose splits mix facts (recall, %) and plain prose (NLL):
the ``--facts real`` benchmark's ``prose`` split."""

from __future__ import annotations

from gradsynth.cli.compare_paired import paired, paired_markdown
from gradsynth.cli.compare_results import aggregate, higher_is_better, markdown_report, pct_splits

SPLITS = ["forget", "general", "prose"]


def _run(seed: int, rule: str, forget: float, general: float, prose_nll: float) -> dict:
    metrics = {
        "forget": {"recall": forget, "nll": 1.0},
        "general": {"recall": general, "nll": 1.0},
        "prose": {"recall": None, "nll": prose_nll},
    }
    return {
        "seed": seed, "objective": "ga", "rule": rule, "lr": 1e-5, "lr_used": 1e-5, "steps": 3,
        "reached": None, "before": metrics, "after": metrics,
        "geometry": {"cos_fr": None, "cos_gr": 0.5, "cos_gf": None, "conflict_fraction": None},
    }  # fmt: skip


def test_which_splits_are_percentages():
    before = _run(0, "sum", 1.0, 1.0, 3.0)["before"]
    assert pct_splits(before, SPLITS) == frozenset({"forget", "general"})
    assert pct_splits(before, ["forget", "general"]) is True
    assert pct_splits(before, ["prose"]) is False
    mixed = frozenset({"forget", "general"})
    # Recall: lower forget, higher kept; NLL (prose): lower is better when kept.
    assert [higher_is_better(s, mixed) for s in SPLITS] == [False, True, False]


def test_a_mixed_table_shows_recall_in_percent_and_prose_as_nll():
    runs = [_run(s, "sum", 0.1, 0.8, 3.25) for s in range(3)]
    table = aggregate(runs, SPLITS)
    text = markdown_report(table, SPLITS, pct_splits(runs[0]["before"], SPLITS), 3, 12)
    header = next(line for line in text.splitlines() if line.startswith("| objective"))
    assert "forget ↓" in header and "general ↑" in header and "prose ↓" in header
    row = next(line for line in text.splitlines() if line.startswith("| ga | sum"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["10.0 ± 0.0", "80.0 ± 0.0", "3.250 ± 0.000"]


def test_paired_comparisons_rank_prose_by_lower_nll():
    runs = [_run(s, "sum", 0.1, 0.8, 3.0 + 0.1 * s) for s in range(5)]
    runs += [_run(s, "sago", 0.1, 0.8, 2.0 + 0.1 * s) for s in range(5)]  # lower prose NLL
    entries = paired(runs, SPLITS, pct_splits(runs[0]["before"], SPLITS))
    (entry,) = [e for e in entries if e["metric"] == "prose" and (e["a"], e["b"]) == ("sago", "sum")]
    assert entry["difference"]["mean"] < 0  # sago's prose NLL minus the sum's
    assert (entry["ahead"], entry["behind"]) == (5, 0)  # lower NLL is ahead on a kept split
    row = next(line for line in paired_markdown(entries).splitlines() if "sago - sum" in line)
    assert "-1.000 ± 0.000 (5/0/0" in row  # NLL to 3 digits (one digit made -0.0 of small gaps)
