"""The paired-by-seed comparison of rules in `gradsynth compare` (gradsynth/cli/compare_paired.py),
and the plots' styles for a matrix of rules and objectives."""

from __future__ import annotations

import statistics

import pytest

from gradsynth.cli.compare_paired import paired, paired_markdown

SPLITS = ["forget", "retain", "general"]


def _run(
    rule, seed, retain, forget=0.0, general=0.5, steps=10, cos_gr=0.5, objective="ga", lr=1e-3, nll=False
):
    def metrics(recall):
        return (
            {"recall": None, "nll": recall, "mc_acc": None}
            if nll
            else {"recall": recall, "nll": 1.0, "mc_acc": None}
        )

    return {
        "objective": objective,
        "rule": rule,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "geometry": {"cos_gr": 0.5},
        "before": {"forget": metrics(1.0), "retain": metrics(1.0), "general": metrics(0.5)},
        "after": {"forget": metrics(forget), "retain": metrics(retain), "general": metrics(general)},
    }


def _entry(entries, a, b, metric, objective="ga"):
    (entry,) = [
        e for e in entries if (e["a"], e["b"], e["metric"], e["objective"]) == (a, b, metric, objective)
    ]
    return entry


def test_differences_are_taken_seed_by_seed_with_ahead_level_behind():
    sago = [0.9, 0.8, 0.7, 0.6]
    pcgrad = [0.8, 0.8, 0.75, 0.4]
    runs = [_run("sago", s, r, steps=20 + s) for s, r in enumerate(sago)]
    runs += [_run("pcgrad", s, r, steps=10) for s, r in enumerate(pcgrad)]
    entry = _entry(paired(runs, SPLITS, True), "sago", "pcgrad", "retain")
    diffs = [100 * (x - y) for x, y in zip(sago, pcgrad, strict=True)]
    assert entry["difference"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert entry["difference"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert (entry["ahead"], entry["level"], entry["behind"]) == (2, 1, 1)
    steps = _entry(paired(runs, SPLITS, True), "sago", "pcgrad", "steps")
    assert steps["difference"]["mean"] == pytest.approx(11.5) and steps["behind"] == 4  # more steps is behind


def test_forget_and_nll_count_lower_as_ahead():
    runs = [_run("sago", s, 0.5, forget=0.0) for s in range(3)] + [
        _run("sum", s, 0.5, forget=0.2) for s in range(3)
    ]
    assert _entry(paired(runs, SPLITS, True), "sago", "sum", "forget")["ahead"] == 3
    nll = [_run("sago", s, 0.2, nll=True) for s in range(2)] + [
        _run("sum", s, 0.4, nll=True) for s in range(2)
    ]
    retain = _entry(paired(nll, SPLITS, False), "sago", "sum", "retain")
    assert retain["ahead"] == 2 and retain["difference"]["mean"] == pytest.approx(-0.2)


def test_only_seeds_both_rules_ran_are_paired_and_one_seed_gives_no_table():
    runs = [_run("sago", 0, 0.9), _run("sago", 1, 0.9), _run("pcgrad", 1, 0.5), _run("pcgrad", 2, 0.5)]
    assert paired(runs, SPLITS, True) == []  # one common seed
    assert paired_markdown([]) == ""
    runs.append(_run("pcgrad", 0, 0.6))
    entry = _entry(paired(runs, SPLITS, True), "sago", "pcgrad", "retain")
    assert entry["difference"]["mean"] == pytest.approx(35.0) and entry["ahead"] == 2


def test_objectives_and_learning_rates_are_never_mixed():
    runs = [_run("sago", s, 0.9, objective="npo") for s in range(2)]
    runs += [_run("pcgrad", s, 0.1, objective="ga") for s in range(2)]
    runs += [_run("sago", s, 0.9, lr=2e-3) for s in range(2)] + [_run("pcgrad", s, 0.5) for s in range(2)]
    assert paired(runs, SPLITS, True) == []


def test_the_markdown_has_a_row_per_pair_and_a_column_per_metric():
    runs = [
        _run(rule, s, 0.5 + 0.1 * i) for i, rule in enumerate(["sum", "pcgrad", "sago"]) for s in range(3)
    ]
    text = paired_markdown(paired(runs, SPLITS, True))
    lines = [line for line in text.splitlines() if line.startswith("| ga")]
    assert [line.split(" | ")[1] for line in lines] == ["sago - pcgrad", "pcgrad - sum", "sago - sum"]
    assert "| objective | A - B | forget | retain | general | utility kept | cos(g,r) | steps |" in text
    # Three seeds all ahead: 2 of the 8 sign patterns are as extreme, p = 0.25 (the smallest with 3).
    assert "+10.0 ± 0.0 (3/0/0, p 0.25)" in lines[0] and "+20.0 ± 0.0 (3/0/0, p 0.25)" in lines[2]
    assert "with 3 seeds the smallest possible p is 0.25" in text
    two = [_run(rule, s, 0.5 + 0.1 * i) for i, rule in enumerate(["sum", "sago"]) for s in range(2)]
    assert ", p " not in paired_markdown(paired(two, SPLITS, True))  # 2 seeds: p >= 0.5 says nothing


def test_sign_flip_p_by_hand():
    from gradsynth.cli.compare_paired import sign_flip_p

    assert sign_flip_p([1.0] * 5) == 2 / 32  # the 0.0625 floor of 5 seeds
    # 1, 2, -0.5: sums of the 8 patterns are +-2.5, +-0.5, +-3.5, +-1.5; |sum| >= 2.5 for 4 of them.
    assert sign_flip_p([1.0, 2.0, -0.5]) == 4 / 8
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([3.0, 0.0, 0.0]) == 1.0  # one seed differs: no evidence
    with pytest.raises(ValueError):
        sign_flip_p([])


def test_plots_of_the_objective_matrix_give_every_curve_its_own_colour_and_marker():
    from gradsynth.cli.compare_results import curve_styles

    rules = ["sum", "pcgrad", "sago", "sago_prefer_retain", "blur"]
    objectives = ["ga", "npo", "simnpo", "rmu"]
    names = [f"{o}+{r}" for o in objectives for r in rules]
    styles = curve_styles(names)
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(names) == 20
    assert len({styles[f"{o}+sago"]["color"] for o in objectives}) == 1  # a rule keeps its colour
    assert len({styles[f"rmu+{r}"]["marker"] for r in rules}) == 1  # an objective keeps its marker


def _audited(run, gap, truth_ratio, quality, reference_ratio=0.5):
    run["audit"] = {
        "model": {"mia": {"loss": {"auc": 0.5 - gap, "gap": gap}}, "mean_log_truth_ratio": truth_ratio},
        "reference": {"mean_log_truth_ratio": reference_ratio},
        "forget_quality": quality,
    }
    return run


def test_audited_runs_are_paired_on_their_distance_from_the_never_learned_model():
    runs = [_audited(_run("sago", s, 0.9), 0.1, 1.0 + s, 0.6) for s in range(3)]
    runs += [_audited(_run("sum", s, 0.8), 0.3, 2.0 + s, 0.2) for s in range(3)]
    entries = paired(runs, SPLITS, True)
    gap = _entry(entries, "sago", "sum", "MIA AUC gap from 0.5 (LOSS)")
    assert gap["difference"]["mean"] == pytest.approx(-0.2) and gap["ahead"] == 3  # nearer 0.5
    ratio = _entry(entries, "sago", "sum", "log TR gap to reference")
    assert ratio["difference"]["mean"] == pytest.approx(-1.0) and ratio["ahead"] == 3
    quality = _entry(entries, "sago", "sum", "forget quality")
    assert quality["difference"]["mean"] == pytest.approx(0.4) and quality["ahead"] == 3
    text = paired_markdown(entries)
    assert "| MIA AUC gap from 0.5 (LOSS) |" in text and "-0.20 ± 0.00 (3/0/0, p 0.25)" in text
    # Runs without an audit pair on the usual metrics only.
    plain = [_run(rule, s, 0.5) for rule in ("sago", "sum") for s in range(2)]
    assert "forget quality" not in {e["metric"] for e in paired(plain, SPLITS, True)}
