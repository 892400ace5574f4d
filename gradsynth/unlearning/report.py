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


def kept_shares(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per split (or task) and score, the share of the original kept: ``after / before``.

    Scores where higher is better only (accuracies, recall, ROUGE-L), not NLL."""
    from gradsynth.unlearning.benchmarks import utility_kept

    return {
        name: {
            key: utility_kept(value, after.get(name, {}).get(key))
            for key, value in metrics.items()
            if key != "nll" and isinstance(value, (int, float))
        }
        for name, metrics in before.items()
    }


def general_kept(before: dict[str, dict], after: dict[str, dict]) -> float | None:
    """The paper's headline: the share of the original general score kept (MC accuracy, else recall)."""
    shares = kept_shares(before, after).get("general", {})
    return shares.get("mc_acc", shares.get("recall"))


def write_report(
    path: Path,
    settings: dict[str, Any],
    before: dict,
    after: dict,
    records: list[StepRecord],
    benchmarks: dict[str, dict] | None = None,
    curve: list[dict[str, Any]] | None = None,
    audit: dict[str, Any] | None = None,
) -> None:
    """``report.json``: settings, metrics before and after, the share of each score kept (and of the
    general score, ``general_score_kept``), lm-eval scores, per-step losses and geometry, their means,
    and with ``--eval-every`` every split's metrics over steps (``eval_curve``)."""
    benchmarks = benchmarks or {}
    report = {
        "settings": settings,
        "metrics": {"before": before, "after": after},
        "general_score_kept": general_kept(before, after),
        "kept": kept_shares(before, after),
        "benchmarks": benchmarks,
        "benchmarks_kept": kept_shares(benchmarks["before"], benchmarks["after"]) if benchmarks else {},
        "geometry_mean": mean_geometry(records),
        "steps": [asdict(r) for r in records],
        "eval_curve": curve or [],
    }
    if audit is not None:
        report["audit"] = audit
    dump_json(path, report)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to ``window`` finite values (NaN where none yet)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_curves(path: Path, records: list[StepRecord], title: str, curve: list[dict] | None = None) -> None:
    """Panels: forget and retain loss per step; cos(f,r), cos(g,r), cos(g,f) per step (faint) with
    their moving average; and, with an evaluation curve, every split's score over steps
    (multiple-choice accuracy solid, recall dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    losses, cosines = axes[0], axes[1]
    losses.plot(steps, [r.forget_loss for r in records], label="forget loss")
    losses.plot(steps, [r.retain_loss for r in records], label="retain loss")
    losses.set_xlabel("step")
    losses.legend()
    window = max(1, len(records) // 10)
    for key, label in (("cos_fr", "cos(f,r)"), ("cos_gr", "cos(g,r)"), ("cos_gf", "cos(g,f)")):
        values = [getattr(r, key) if getattr(r, key) is not None else float("nan") for r in records]
        (line,) = cosines.plot(steps, values, alpha=0.25, linewidth=0.8)
        cosines.plot(
            steps, smooth(values, window), color=line.get_color(), label=f"{label} (mean of {window})"
        )
    cosines.axhline(0.0, color="grey", linewidth=0.5)
    cosines.set_xlabel("step")
    cosines.legend(fontsize=8)
    if curve:
        scores = axes[2]
        points = [c["step"] for c in curve]
        for split in curve[0]["splits"]:
            for key, style in (("mc_acc", "-"), ("recall", "--")):
                values = [c["splits"][split].get(key) for c in curve]
                if all(v is not None for v in values):
                    scores.plot(points, values, style, marker=".", label=f"{split} {key}")
        scores.set_ylim(-0.03, 1.03)
        scores.set_xlabel("step")
        scores.set_title("forgotten and kept", fontsize=10)
        scores.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
