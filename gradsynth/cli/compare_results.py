"""Aggregating `gradsynth compare` runs over seeds, and the tables and Pareto plot made from them.

A run's score on a split is its greedy recall (or its NLL for plain-text data, which has no
answers). Per (rule, lr) the mean and the sample standard deviation over seeds are reported.
"At comparable forgetting" picks, per rule, the learning rate whose mean forget recall is at
most the threshold and whose mean recall over the kept splits is highest.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gradsynth.cli.tables import markdown_table, num

FORGET_THRESHOLD = 0.1
GEOMETRY = ("cos_fr", "cos_gr", "cos_gf", "conflict_fraction")


def score(metrics: dict[str, Any]) -> float:
    return metrics["recall"] if metrics["recall"] is not None else metrics["nll"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]], splits: list[str]) -> list[dict[str, Any]]:
    """One entry per (rule, lr), in the order first seen: mean/std of each split and of the geometry."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["rule"], run["lr"]), []).append(run)
    table = []
    for (rule, lr), group in groups.items():
        entry: dict[str, Any] = {"rule": rule, "lr": lr, "seeds": [g["seed"] for g in group]}
        for split in splits:
            entry[split] = _mean_std([score(g["after"][split]) for g in group])
        for key in GEOMETRY:
            values = [g["geometry"][key] for g in group if g["geometry"][key] is not None]
            entry[key] = statistics.fmean(values) if values else None
        table.append(entry)
    return table


def kept(entry: dict[str, Any], splits: list[str]) -> float:
    return statistics.fmean(entry[s][0] for s in splits if s != "forget")


def at_comparable_forgetting(table: list[dict[str, Any]], splits: list[str]) -> dict[str, dict | None]:
    best: dict[str, dict | None] = {}
    for entry in table:
        best.setdefault(entry["rule"], None)
        if entry["forget"][0] > FORGET_THRESHOLD:
            continue
        current = best[entry["rule"]]
        if current is None or kept(entry, splits) > kept(current, splits):
            best[entry["rule"]] = entry
    return best


def _cell(pair: tuple[float, float], as_pct: bool) -> str:
    mean, std = pair
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if as_pct else f"{mean:.3f} ± {std:.3f}"


def markdown_report(
    table: list[dict[str, Any]], splits: list[str], as_pct: bool, n_seeds: int, steps: int
) -> str:
    unit = "recall %" if as_pct else "NLL"
    arrows = {s: ("↓" if s == "forget" else "↑") if as_pct else "" for s in splits}
    head = (
        ["rule", "lr"] + [f"{s} {arrows[s]}".strip() for s in splits] + ["cos(f,r)", "cos(g,r)", "cos(g,f)"]
    )
    rows = [
        [e["rule"], f"{e['lr']:g}"]
        + [_cell(e[s], as_pct) for s in splits]
        + [num(e["cos_fr"], 2), num(e["cos_gr"], 2), num(e["cos_gf"], 2)]
        for e in table
    ]
    parts = [
        f"After {steps} steps, {unit} per split, mean ± standard deviation over {n_seeds} seed(s); "
        "cosines are means over steps and seeds.",
        "",
        markdown_table(head, rows),
    ]
    if as_pct:
        best = at_comparable_forgetting(table, splits)
        rows = [
            [rule, "-", "did not reach it"] + ["-"] * (len(splits) - 1)
            if entry is None
            else [rule, f"{entry['lr']:g}"] + [_cell(entry[s], True) for s in splits]
            for rule, entry in best.items()
        ]
        parts += [
            "",
            f"At comparable forgetting: per rule, the learning rate with mean forget recall ≤ "
            f"{100 * FORGET_THRESHOLD:g}% that keeps the most (mean of the other splits).",
            "",
            markdown_table(["rule", "lr", *[f"{s} {arrows[s]}" for s in splits]], rows),
        ]
    geometry_rows = []
    for rule in dict.fromkeys(e["rule"] for e in table):
        entries = [e for e in table if e["rule"] == rule]
        geometry_rows.append(
            [rule]
            + [
                num(statistics.fmean(e[k] for e in entries if e[k] is not None), 3)
                if any(e[k] is not None for e in entries)
                else "-"
                for k in GEOMETRY
            ]
        )
    parts += [
        "",
        "Gradient geometry, mean over steps, learning rates and seeds:",
        "",
        markdown_table(
            ["rule", "cos(f,r)", "cos(g,r)", "cos(g,f)", "conflicting coordinates"], geometry_rows
        ),
    ]
    return "\n".join(parts) + "\n"


def pareto_plot(path: Path, table: list[dict[str, Any]], splits: list[str], as_pct: bool) -> None:
    """Forget score (x) against each kept split (y), one line per rule through its learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept_splits = [s for s in splits if s != "forget"]
    fig, axes = plt.subplots(1, len(kept_splits), figsize=(4.2 * len(kept_splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], kept_splits, strict=True):
        for rule in dict.fromkeys(e["rule"] for e in table):
            entries = sorted((e for e in table if e["rule"] == rule), key=lambda e: e["lr"])
            ax.errorbar(
                [e["forget"][0] for e in entries],
                [e[split][0] for e in entries],
                xerr=[e["forget"][1] for e in entries],
                yerr=[e[split][1] for e in entries],
                marker="o",
                capsize=2,
                label=rule,
            )
        ax.set_xlabel("forget recall (lower is better)" if as_pct else "forget NLL (higher is better)")
        ax.set_ylabel(f"{split} recall" if as_pct else f"{split} NLL")
        ax.set_title(split)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
