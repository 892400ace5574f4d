"""Rules compared seed by seed: the paired differences behind "rule A keeps more than rule B".

Within one seed every rule starts from the same model with the same targets and batches, so two
rules are compared pairwise: for an objective, a learning rate (the ladder's first rung) and a
metric, ``d_s = m(A, s) - m(B, s)`` per seed ``s``. The table gives the mean ± sample standard
deviation of ``d`` over the seeds and how many seeds A is ahead, level and behind — which says
more than two spreads that overlap, since most of the spread is shared by the two rules (a seed
with easy targets is easy for both).

The pairs are the paper's claims, where both rules ran: SAGO against PCGrad, PCGrad against the
sum, SAGO against the sum. The metrics: every split (recall, in points; NLL where the data has no
answers; on forget, less recall or more NLL is ahead: with a forget target, a rule that did not
reach it shows here), the utility kept (the share of the general split's
score, in points), the mean cos(g, r) over the steps taken, and the steps taken (fewer is ahead).

With at least `MIN_SEEDS_FOR_P` seeds each cell also gives ``p``, the two-sided sign-flip
(randomisation) test of the paired differences: under "A and B are exchangeable" every
difference is as likely negated, so ``p`` is the share of the ``2^n`` sign patterns whose mean
is at least as far from 0 as the observed mean (exact; zero differences flip to themselves).
The smallest possible ``p`` with ``n`` seeds is ``2 / 2^n``: 0.0625 with 5 seeds, 0.002 with 10;
with 2 seeds it is 0.5, which says nothing, so the column starts at 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradsynth.cli.compare_ranking import utility_kept
from gradsynth.cli.compare_results import higher_is_better, in_pct, score, summary
from gradsynth.cli.tables import markdown_table

PAIRS = (("sago", "pcgrad"), ("pcgrad", "sum"), ("sago", "sum"))
MIN_SEEDS = 2
MIN_SEEDS_FOR_P = 3


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip p-value of the mean of paired differences (see the module)."""
    if not diffs:
        raise ValueError("no paired differences")
    observed = abs(sum(diffs)) - 1e-12 * sum(abs(d) for d in diffs)  # ties count as "as extreme"
    hits = 0
    for pattern in range(2 ** len(diffs)):
        total = sum(-d if pattern >> i & 1 else d for i, d in enumerate(diffs))
        hits += abs(total) >= observed
    return hits / 2 ** len(diffs)


Metric = tuple[str, Callable[[dict], float | None], float, bool]


def _audit_value(path: tuple[str, ...]) -> Callable[[dict], float | None]:
    def value(run: dict) -> float | None:
        found: Any = run.get("audit")
        for key in path:
            if not isinstance(found, dict) or key not in found:
                return None
            found = found[key]
        return found

    return value


def _truth_ratio_gap(run: dict) -> float | None:
    audit = run.get("audit") or {}
    if "reference" not in audit:
        return None
    return abs(audit["model"]["mean_log_truth_ratio"] - audit["reference"]["mean_log_truth_ratio"])


#: With ``compare --audit``: how far from a never-learned model each run ends (nearer is ahead):
#: ``|AUC - 0.5|`` of the LOSS attack, ``|mean log TR - the reference's|``, the forget quality.
AUDIT_METRICS: list[Metric] = [
    ("MIA AUC gap from 0.5 (LOSS)", _audit_value(("model", "mia", "loss", "gap")), 1.0, False),
    ("log TR gap to reference", _truth_ratio_gap, 1.0, False),
    ("forget quality", _audit_value(("forget_quality",)), 1.0, True),
]


def _metrics(splits: list[str], as_pct: bool | frozenset[str]) -> list[Metric]:
    """(name, value of a run, scale, higher is ahead) for every compared metric (the audit's are
    compared only where the runs were audited: elsewhere they have no value)."""
    metrics = [
        (
            s,
            lambda run, s=s: score(run["after"][s]),
            100.0 if in_pct(as_pct, s) else 1.0,
            higher_is_better(s, as_pct),
        )
        for s in splits
    ]
    return [
        *metrics,
        ("utility kept", utility_kept, 100.0, True),
        ("cos(g,r)", lambda run: run["geometry"]["cos_gr"], 1.0, True),
        ("steps", lambda run: run["steps"], 1.0, False),
        *AUDIT_METRICS,
    ]


def paired(
    runs: list[dict[str, Any]], splits: list[str], as_pct: bool | frozenset[str]
) -> list[dict[str, Any]]:
    """One entry per (objective, lr, pair, metric) with at least `MIN_SEEDS` seeds run by both rules."""
    index = {(r["objective"], r["rule"], r["lr"], r["seed"]): r for r in runs}
    entries = []
    for objective, lr in dict.fromkeys((r["objective"], r["lr"]) for r in runs):
        for a, b in PAIRS:
            seeds = sorted(
                s
                for (o, rule, rate, s) in index
                if (o, rule, rate) == (objective, a, lr) and (o, b, rate, s) in index
            )
            both = [(index[(objective, a, lr, s)], index[(objective, b, lr, s)]) for s in seeds]
            for name, value, scale, higher in _metrics(splits, as_pct):
                pairs = [(value(x), value(y)) for x, y in both]
                diffs = [scale * (x - y) for x, y in pairs if x is not None and y is not None]
                if len(diffs) < MIN_SEEDS:
                    continue
                ahead = [d if higher else -d for d in diffs]
                entries.append(
                    {
                        "objective": objective,
                        "lr": lr,
                        "a": a,
                        "b": b,
                        "metric": name,
                        "nll": name in splits and not in_pct(as_pct, name),  # shown to 3 digits
                        "difference": summary(diffs),
                        "ahead": sum(1 for d in ahead if d > 0),
                        "level": sum(1 for d in ahead if d == 0),
                        "behind": sum(1 for d in ahead if d < 0),
                        "p": sign_flip_p(diffs) if len(diffs) >= MIN_SEEDS_FOR_P else None,
                    }
                )
    return entries


def _cell(entry: dict[str, Any]) -> str:
    precise = entry["metric"] == "cos(g,r)" or entry["metric"] in {m[0] for m in AUDIT_METRICS}
    d, digits = entry["difference"], 3 if entry.get("nll") else 2 if precise else 1
    counts = f"{entry['ahead']}/{entry['level']}/{entry['behind']}"
    if entry.get("p") is not None:
        counts += f", p {entry['p']:.2g}"
    return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f} ({counts})"


def paired_markdown(entries: list[dict[str, Any]]) -> str:
    """The paired table: a row per (objective, lr, A - B), a column per metric; empty without entries."""
    if not entries:
        return ""
    metrics = list(dict.fromkeys(e["metric"] for e in entries))
    rows: dict[tuple[str, float, str, str], dict[str, str]] = {}
    for e in entries:
        rows.setdefault((e["objective"], e["lr"], e["a"], e["b"]), {})[e["metric"]] = _cell(e)
    several_lrs = len({(o, lr) for o, lr, _, _ in rows}) > len({o for o, *_ in rows})
    head = ["objective", *(["lr"] if several_lrs else []), "A - B", *metrics]
    table = [
        [o, *([f"{lr:g}"] if several_lrs else []), f"{a} - {b}", *(cells.get(m, "-") for m in metrics)]
        for (o, lr, a, b), cells in rows.items()
    ]
    n = max(e["ahead"] + e["level"] + e["behind"] for e in entries)
    intro = (
        f"Paired by seed (up to {n} seeds): the difference A - B of each metric, mean ± standard deviation "
        "over the seeds both rules ran, with the seeds where A is ahead / level / behind in parentheses "
        "(recall and utility kept in points; ahead on forget and steps is lower)."
    )
    if any(e.get("p") is not None for e in entries):
        intro += (
            f" p: the two-sided sign-flip test of the paired differences (exact); with {n} seeds the "
            f"smallest possible p is {2 / 2**n:.2g}."
        )
    return "\n".join([intro, "", markdown_table(head, table)]) + "\n"
