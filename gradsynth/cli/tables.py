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
    """One row per split: recall and NLL before and after, with the wanted direction."""
    header = (
        f"{'split':<16}{'examples':>9}{'recall before':>15}{'recall after':>14}"
        f"{'NLL before':>12}{'NLL after':>11}"
    )
    lines = [header, "-" * len(header)]
    for name in before:
        label = f"{name} ({WANTED.get(name, '↑')})"
        lines.append(
            f"{label:<16}{sizes.get(name, 0):>9}"
            f"{pct(before[name]['recall']):>15}{pct(after[name]['recall']):>14}"
            f"{num(before[name]['nll']):>12}{num(after[name]['nll']):>11}"
        )
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
