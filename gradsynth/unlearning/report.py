"""What an unlearning run writes: ``report.json`` and a PNG of the loss and cosine curves."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gradsynth.unlearning.loop import StepRecord


def mean_geometry(records: list[StepRecord]) -> dict[str, float | None]:
    """Mean over steps of cos(f,r), cos(g,r), cos(g,f) and the conflict fraction (finite values only)."""
    out: dict[str, float | None] = {}
    for key in ("cos_fr", "cos_gr", "cos_gf", "conflict_fraction"):
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dump_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as RFC 8259 JSON: non-finite numbers become ``null``, never bare NaN."""
    path.write_text(json.dumps(finite_json(payload), indent=2, allow_nan=False))


def write_report(
    path: Path, settings: dict[str, Any], before: dict, after: dict, records: list[StepRecord]
) -> None:
    """``report.json``: settings, metrics before and after, per-step losses and geometry, their means."""
    report = {
        "settings": settings,
        "metrics": {"before": before, "after": after},
        "geometry_mean": mean_geometry(records),
        "steps": [asdict(r) for r in records],
    }
    dump_json(path, report)


def plot_curves(path: Path, records: list[StepRecord], title: str) -> None:
    """Two panels: forget and retain loss per step; cos(f,r), cos(g,r), cos(g,f) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, (losses, cosines) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses.plot(steps, [r.forget_loss for r in records], label="forget loss")
    losses.plot(steps, [r.retain_loss for r in records], label="retain loss")
    losses.set_xlabel("step")
    losses.legend()
    for key, label in (("cos_fr", "cos(f,r)"), ("cos_gr", "cos(g,r)"), ("cos_gf", "cos(g,f)")):
        values = [getattr(r, key) if getattr(r, key) is not None else float("nan") for r in records]
        cosines.plot(steps, values, label=label)
    cosines.axhline(0.0, color="grey", linewidth=0.5)
    cosines.set_xlabel("step")
    cosines.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
