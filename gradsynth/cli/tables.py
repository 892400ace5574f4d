"""Plain-text and Markdown tables of metrics."""

from __future__ import annotations

import math
from typing import Any

WANTED = {"forget": "↓", "retain": "↑", "neighbour": "↑", "general": "↑"}


def pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def before_after_table(before: dict[str, dict], after: dict[str, dict], sizes: dict[str, int]) -> str:
    """One row per split: recall, ROUGE-L recall and multiple-choice accuracy (each when measured)
    and NLL, before and after."""
    with_mc = any(m.get("mc_acc") is not None for m in before.values())
    with_rouge = any(m.get("rougeL_recall") is not None for m in before.values())
    mc_head = f"{'MC acc before':>15}{'MC acc after':>14}" if with_mc else ""
    rouge_head = f"{'ROUGE-L before':>16}{'ROUGE-L after':>15}" if with_rouge else ""
    header = (
        f"{'split':<16}{'examples':>9}{'recall before':>15}{'recall after':>14}{rouge_head}{mc_head}"
        f"{'NLL before':>12}{'NLL after':>11}"
    )
    lines = [header, "-" * len(header)]
    for name in before:
        label = f"{name} ({WANTED.get(name, '↑')})"
        mc = f"{pct(before[name].get('mc_acc')):>15}{pct(after[name].get('mc_acc')):>14}" if with_mc else ""
        rouge = (
            f"{pct(before[name].get('rougeL_recall')):>16}{pct(after[name].get('rougeL_recall')):>15}"
            if with_rouge
            else ""
        )
        lines.append(
            f"{label:<16}{sizes.get(name, 0):>9}"
            f"{pct(before[name]['recall']):>15}{pct(after[name]['recall']):>14}{rouge}{mc}"
            f"{num(before[name]['nll']):>12}{num(after[name]['nll']):>11}"
        )
    return "\n".join(lines)


def split_table(metrics: dict[str, dict], sizes: dict[str, int]) -> str:
    """One row per split: recall, ROUGE-L recall, multiple-choice accuracy (each when measured) and NLL."""
    columns = [("recall", "recall"), ("rougeL_recall", "ROUGE-L"), ("mc_acc", "MC acc")]
    shown = [(key, head) for key, head in columns if any(m.get(key) is not None for m in metrics.values())]
    header = f"{'split':<16}{'examples':>9}" + "".join(f"{head:>10}" for _, head in shown) + f"{'NLL':>9}"
    lines = [header, "-" * len(header)]
    for name, values in metrics.items():
        cells = "".join(f"{pct(values.get(key)):>10}" for key, _ in shown)
        lines.append(f"{name:<16}{sizes.get(name, 0):>9}{cells}{num(values['nll']):>9}")
    return "\n".join(lines)


def benchmark_table(columns: dict[str, dict[str, dict[str, float]]]) -> str:
    """lm-eval scores: one row per (task, metric), one column per entry of ``columns`` (e.g. before/after)."""
    names = list(columns)
    first = columns[names[0]]
    header = f"{'task':<28}{'metric':<16}" + "".join(f"{n:>12}" for n in names)
    lines = [header, "-" * len(header)]
    for task, metrics in first.items():
        for metric in metrics:
            cells = "".join(f"{num(columns[n].get(task, {}).get(metric), 4):>12}" for n in names)
            lines.append(f"{task:<28}{metric:<16}{cells}")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
