"""Aggregating `gradsynth compare` runs over seeds, and the tables and Pareto plot made from them.

A run's score on a split is its greedy recall (or its NLL for plain-text data, which has no
answers). Runs are grouped by (objective, rule, learning rate) — with a forget target the rate
is the ladder's first rung — and every number is summarised over seeds as mean, sample standard
deviation, median, minimum and maximum. The splits are whatever the task has (the embedded
world's, or a user's forget and retain sets): tables and JSON list them by name.

Without a forget target, "at comparable forgetting" picks, per (objective, rule), the learning
rate whose mean forget recall is at most 10% and whose mean score over the kept splits is
highest. With one, every run already stopped at comparable forgetting, and the table reports how
many seeds reached the target, the steps taken and the learning rate used.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from gradsynth.cli.tables import markdown_table, num

FORGET_THRESHOLD = 0.1
GEOMETRY = ("cos_fr", "cos_gr", "cos_gf", "conflict_fraction")


def score(metrics: dict[str, Any]) -> float:
    return metrics["recall"] if metrics["recall"] is not None else metrics["nll"]


def in_pct(as_pct: bool | frozenset[str], split: str) -> bool:
    """Whether ``split`` is scored by recall (shown in %) rather than NLL. ``as_pct`` is one answer for
    every split, or the set of the splits with answers (a task mixing facts and plain prose)."""
    return as_pct if isinstance(as_pct, bool) else split in as_pct


def pct_splits(before: dict[str, dict[str, Any]], splits: list[str]) -> bool | frozenset[str]:
    """``as_pct`` of a comparison: True when every split has answers, False when none has, else the
    splits that have."""
    with_answers = frozenset(s for s in splits if before[s]["recall"] is not None)
    return True if len(with_answers) == len(splits) else (bool(with_answers) and with_answers)


def higher_is_better(split: str, as_pct: bool | frozenset[str]) -> bool:
    """Recall is better higher on a kept split and lower on the forget one; NLL the other way round."""
    return (split == "forget") != in_pct(as_pct, split)


def summary(values: list[float]) -> dict[str, float] | None:
    """Mean, sample standard deviation (0 for one value), median, min and max; None without values."""
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def label(entry: dict[str, Any]) -> str:
    """``objective+rule`` (``ga+sago``), the name of a curve or row."""
    return f"{entry['objective']}+{entry['rule']}"


def aggregate(runs: list[dict[str, Any]], splits: list[str]) -> list[dict[str, Any]]:
    """One entry per (objective, rule, lr), in the order first seen: a `summary` of each split's
    score, of the steps taken, of the learning rate used and of each geometry mean."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["objective"], run["rule"], run["lr"]), []).append(run)
    table = []
    for (objective, rule, lr), group in groups.items():
        entry: dict[str, Any] = {
            "objective": objective,
            "rule": rule,
            "lr": lr,
            "seeds": [g["seed"] for g in group],
            "steps": summary([g["steps"] for g in group]),
            "lr_used": summary([g["lr_used"] for g in group]),
            "lrs_used": sorted(Counter(g["lr_used"] for g in group).items()),
            "reached": None if group[0]["reached"] is None else sum(1 for g in group if g["reached"]),
        }
        for split in splits:
            entry[split] = summary([score(g["after"][split]) for g in group])
        for key in GEOMETRY:
            entry[key] = summary([g["geometry"][key] for g in group if g["geometry"][key] is not None])
        table.append(entry)
    return table


def kept(entry: dict[str, Any], splits: list[str]) -> float:
    """The mean recall over the kept splits (the ones other than forget)."""
    return statistics.fmean(entry[s]["mean"] for s in splits if s != "forget")


def at_comparable_forgetting(table: list[dict[str, Any]], splits: list[str]) -> dict[str, dict | None]:
    """Per ``objective+rule``, the entry with mean forget recall <= 10% that keeps the most (or None)."""
    best: dict[str, dict | None] = {}
    for entry in table:
        best.setdefault(label(entry), None)
        if entry["forget"]["mean"] > FORGET_THRESHOLD:
            continue
        current = best[label(entry)]
        if current is None or kept(entry, splits) > kept(current, splits):
            best[label(entry)] = entry
    return best


def cell(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 1, median: bool = True) -> str:
    """``mean ± std (median)`` scaled (100 for percentages); without the median for one seed."""
    if stats is None:
        return "-"
    text = f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"
    if median and stats["std"] > 0:
        text += f" ({scale * stats['median']:.{digits}f})"
    return text


def _lrs_cell(entry: dict[str, Any]) -> str:
    used = entry["lrs_used"]
    if len(used) == 1:
        return f"{used[0][0]:g}"
    return ", ".join(f"{lr:g} (x{count})" for lr, count in used)


def _split_cells(entry: dict[str, Any], splits: list[str], as_pct: bool | frozenset[str]) -> list[str]:
    return [cell(entry[s], 100.0, 1) if in_pct(as_pct, s) else cell(entry[s], 1.0, 3) for s in splits]


def _geometry_cells(entry: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [cell(entry[k], 1.0, 2, median=False) for k in keys]


def markdown_report(
    table: list[dict[str, Any]],
    splits: list[str],
    as_pct: bool | frozenset[str],
    n_seeds: int,
    steps: int,
    protocol: dict[str, Any] | None = None,
) -> str:
    """results.md: the main table, "at comparable forgetting" (grid runs only) and the geometry table."""
    unit = "recall %" if as_pct is True else "NLL" if as_pct is False else "recall % (NLL for plain text)"
    arrows = {s: ("↑" if higher_is_better(s, as_pct) else "↓") if as_pct is not False else "" for s in splits}
    split_head = [f"{s} {arrows[s]}".strip() for s in splits]
    cos_head = ["cos(f,r)", "cos(g,r)", "cos(g,f)"]
    spread = (
        f"mean ± standard deviation (median) over {n_seeds} seeds"
        if n_seeds > 1
        else "one seed (no spread: pass --seeds with 5 or more)"
    )
    if protocol is None:
        intro = (
            f"After {steps} steps, {unit} per split, {spread}; cosines are means over the steps, "
            "then over seeds."
        )
        head = ["objective", "rule", "lr", *split_head, *cos_head]
        rows = [
            [
                e["objective"],
                e["rule"],
                f"{e['lr']:g}",
                *_split_cells(e, splits, as_pct),
                *_geometry_cells(e, GEOMETRY[:3]),
            ]
            for e in table
        ]
    else:
        target = (
            f"{100 * protocol['forget_target']:g}%"
            if protocol["forget_target"] != "reference"
            else (
                f"the recall of the same facts by {protocol.get('reference', 'the world model')} that "
                "never learned them ("
                + ", ".join(f"seed {s}: {100 * t:.1f}%" for s, t in protocol["targets"].items())
                + ")"
            )
        )
        intro = (
            f"Comparable forgetting: each run stopped after the first step with forget recall ≤ "
            f"{target} (checked every step), cap {steps} steps; a run that did "
            f"not get there restarted from the original model at {protocol['ladder_factor']:g} times the "
            f"learning rate, at most {protocol['ladder_rungs']} rates from the one in the lr column. "
            f"{unit} per split, {spread}; cosines are means over the steps taken, then over seeds."
        )
        head = ["objective", "rule", "lr", "reached", "steps", "lr used", *split_head, *cos_head]
        rows = [
            [
                e["objective"],
                e["rule"],
                f"{e['lr']:g}",
                f"{e['reached']}/{len(e['seeds'])}",
                cell(e["steps"], 1.0, 0),
                _lrs_cell(e),
                *_split_cells(e, splits, as_pct),
                *_geometry_cells(e, GEOMETRY[:3]),
            ]
            for e in table
        ]
    parts = [intro, "", markdown_table(head, rows)]
    if as_pct and protocol is None:
        best = at_comparable_forgetting(table, [s for s in splits if in_pct(as_pct, s)])
        rows = [
            [name, "-", "did not reach it"] + ["-"] * (len(splits) - 1)
            if entry is None
            else [name, f"{entry['lr']:g}", *_split_cells(entry, splits, as_pct)]
            for name, entry in best.items()
        ]
        parts += [
            "",
            f"At comparable forgetting: per objective and rule, the learning rate with mean forget "
            f"recall ≤ {100 * FORGET_THRESHOLD:g}% that keeps the most (mean of the other splits).",
            "",
            markdown_table(["objective+rule", "lr", *split_head], rows),
        ]
    geometry_rows = []
    for name in dict.fromkeys(label(e) for e in table):
        entries = [e for e in table if label(e) == name]
        geometry_rows.append(
            [name]
            + [
                num(statistics.fmean(e[k]["mean"] for e in entries if e[k] is not None), 3)
                if any(e[k] is not None for e in entries)
                else "-"
                for k in GEOMETRY
            ]
        )
    taken = "steps taken" if protocol is not None else "steps"
    parts += [
        "",
        f"Gradient geometry, mean over the {taken}, learning rates and seeds:",
        "",
        markdown_table(
            ["objective+rule", "cos(f,r)", "cos(g,r)", "cos(g,f)", "conflicting coordinates"], geometry_rows
        ),
    ]
    return "\n".join(parts) + "\n"


MARKERS = "os^Dv<>pP*X"


def curve_styles(names: list[str]) -> dict[str, dict[str, str]]:
    """Per ``objective+rule``: a colour per rule and a marker per objective. The default colour
    cycle repeats after ten curves, which made a matrix of 5 rules x 4 objectives unreadable."""
    pairs = [name.split("+", 1) for name in names]
    rules = list(dict.fromkeys(r for _, r in pairs))
    objectives = list(dict.fromkeys(o for o, _ in pairs))
    colour = {r: f"C{i % 10}" for i, r in enumerate(rules)}
    marker = {o: MARKERS[i % len(MARKERS)] for i, o in enumerate(objectives)}
    return {f"{o}+{r}": {"color": colour[r], "marker": marker[o]} for o, r in pairs}


def legend_below(fig: Any, ax: Any, names: list[str]) -> None:
    """One legend under the panels: a column per rule, a row per objective."""
    handles, labels = ax.get_legend_handles_labels()
    by_label = dict(zip(labels, handles, strict=True))
    rules = list(dict.fromkeys(n.split("+", 1)[1] for n in names))
    ordered = sorted(names, key=lambda n: rules.index(n.split("+", 1)[1]))  # legends fill by column
    rows = -(-len(names) // len(rules))
    room = 0.22 * rows + 0.2  # inches for the legend
    fig.set_figheight(fig.get_figheight() + room)
    fig.set_figwidth(max(fig.get_figwidth(), 2.3 * len(rules)))  # a column per rule must fit
    handles = [by_label[n] for n in ordered]
    fig.legend(handles, ordered, loc="lower center", ncol=len(rules), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, room / fig.get_figheight(), 1, 1))


def pareto_plot(
    path: Path, table: list[dict[str, Any]], splits: list[str], as_pct: bool | frozenset[str]
) -> None:
    """Forget score (x) against each kept split (y), one line per objective+rule through its rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept_splits = [s for s in splits if s != "forget"]
    names = list(dict.fromkeys(label(e) for e in table))
    styles = curve_styles(names)
    fig, axes = plt.subplots(1, len(kept_splits), figsize=(4.2 * len(kept_splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], kept_splits, strict=True):
        for name in names:
            entries = sorted((e for e in table if label(e) == name), key=lambda e: e["lr"])
            ax.errorbar(
                [e["forget"]["mean"] for e in entries],
                [e[split]["mean"] for e in entries],
                xerr=[e["forget"]["std"] for e in entries],
                yerr=[e[split]["std"] for e in entries],
                capsize=2,
                label=name,
                **styles[name],
            )
        by_recall = in_pct(as_pct, "forget")
        ax.set_xlabel("forget recall (lower is better)" if by_recall else "forget NLL (higher is better)")
        ax.set_ylabel(f"{split} recall" if in_pct(as_pct, split) else f"{split} NLL")
        ax.set_title(split)
    legend_below(fig, axes[0][0], names)
    fig.savefig(path, dpi=110)
    plt.close(fig)
