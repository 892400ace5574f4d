"""`gradsynth compare` by any evaluated metric, and the paper's picture: forget score against utility kept.

Every run's metrics after unlearning are flattened to ``NAME.METRIC`` keys: ``forget.mc_acc``,
``general.recall``, ``retain.nll`` for the splits, ``TASK.METRIC`` (``mmlu.acc``) for lm-eval
tasks. ``--rank-by KEY`` orders the (objective, rule, lr) entries by the mean over seeds: ascending for the
forget split's scores (less is more forgotten) and for NLL elsewhere, descending otherwise.

Utility kept is the share of the original score of the utility split kept: ``general`` when the
run has it (the paper's MMLU role), else the first split that is not ``forget``; the score is
multiple-choice accuracy when measured, else recall, else NLL (then ``before / after``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gradsynth.cli.compare_results import curve_styles, label, legend_below
from gradsynth.cli.errors import CliError
from gradsynth.cli.tables import markdown_table, num


def flat_metrics(run: dict[str, Any]) -> dict[str, float]:
    """``NAME.METRIC -> value`` for every numeric metric of the run after unlearning."""
    sources = [run["after"], run.get("benchmarks", {}).get("after", {})]
    return {
        f"{name}.{key}": float(value)
        for source in sources
        for name, metrics in source.items()
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _headline(metrics: dict[str, Any]) -> tuple[str, float]:
    for key in ("mc_acc", "recall"):
        if metrics.get(key) is not None:
            return key, metrics[key]
    return "nll", metrics["nll"]


def utility_kept(run: dict[str, Any]) -> float | None:
    """The share of the utility split's original score that the run kept."""
    names = list(run["before"])
    split = "general" if "general" in names else next((n for n in names if n != "forget"), None)
    if split is None:
        return None
    key, before = _headline(run["before"][split])
    after = run["after"][split][key]
    if key == "nll":
        return before / after if after else None
    return after / before if before else None


def forget_score(run: dict[str, Any]) -> tuple[str, float]:
    return _headline(run["after"]["forget"])


def lower_is_better(key: str) -> bool:
    name, _, metric = key.rpartition(".")
    return (name == "forget") != (metric == "nll")


def rank(runs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """(objective, rule, lr) entries with the mean and spread of ``key`` over seeds, best first."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for run in runs:
        metrics = flat_metrics(run)
        if key not in metrics:
            known = ", ".join(sorted(metrics))
            raise CliError(f"--rank-by {key!r}: not a metric of these runs; choose one of {known}")
        groups.setdefault((run.get("objective", ""), run["rule"], run["lr"]), []).append(metrics[key])
    entries = [
        {
            "objective": objective,
            "rule": rule,
            "lr": lr,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        for (objective, rule, lr), values in groups.items()
    ]
    return sorted(entries, key=lambda e: e["mean"], reverse=not lower_is_better(key))


def ranking_markdown(runs: list[dict[str, Any]], key: str) -> str:
    entries = rank(runs, key)
    direction = "lower" if lower_is_better(key) else "higher"
    rows = [
        [i + 1, e["objective"], e["rule"], f"{e['lr']:g}", f"{num(e['mean'], 4)} ± {num(e['std'], 4)}"]
        for i, e in enumerate(entries)
    ]
    return (
        f"Ranked by {key} ({direction} is better), mean ± standard deviation over seeds:\n\n"
        + markdown_table(["rank", "objective", "rule", "lr", key], rows)
        + "\n"
    )


def tradeoff_plot(path: Path, runs: list[dict[str, Any]]) -> None:
    """Forget score (x) against utility kept (y), one line per objective+rule through its learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    key = forget_score(runs[0])[0]
    names = list(dict.fromkeys(label(r) for r in runs))
    styles = curve_styles(names)
    for name in names:
        points: dict[float, list[tuple[float, float]]] = {}
        for run in runs:
            kept = utility_kept(run)
            if label(run) == name and kept is not None:
                points.setdefault(run["lr"], []).append((forget_score(run)[1], kept))
        lrs = sorted(points)
        xs = [statistics.fmean(p[0] for p in points[lr]) for lr in lrs]
        ys = [statistics.fmean(p[1] for p in points[lr]) for lr in lrs]
        ax.plot(xs, ys, label=name, **styles[name])
    ax.set_xlabel(f"forget {key} ({'higher' if key == 'nll' else 'lower'} is more forgotten)")
    ax.set_ylabel("utility kept (share of the original)")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    legend_below(fig, ax, names)
    fig.savefig(path, dpi=110)
    plt.close(fig)
