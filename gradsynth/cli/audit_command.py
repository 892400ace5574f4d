"""``gradsynth audit`` (and ``unlearn --audit``): how deep the forgetting of an embedded-world run is.

The audit of `gradsynth.unlearning.audit` on the world split's forget facts against fresh-name
twins (`gradsynth.world.never_learned`), beside the world model that never learned the forget
facts (or ``--reference-model``): MIA AUCs, truth ratios, the KS forget quality, relearning.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradsynth.cli.compare_results import cell, summary
from gradsynth.cli.errors import CliError
from gradsynth.cli.output_folder import check_output_folder, run_inputs, staged_output
from gradsynth.cli.tables import markdown_table
from gradsynth.unlearning.audit import RelearnSettings, audit_model
from gradsynth.world.never_learned import (
    forget_facts,
    load_never_learned_model,
    non_member_twins,
    relation_values,
    retain_facts,
)

MIA_NAMES = {"loss": "LOSS", "zlib": "zlib", "min_k": "Min-K%", "min_k_pp": "Min-K%++"}


def check_same_vocabulary(
    model: Any, tokenizer: Any, reference: Any, reference_tokenizer: Any, where: str
) -> None:
    """Refuse a reference that cannot score the same tokens (another vocabulary or architecture)."""
    ours, theirs = getattr(model, "config", None), getattr(reference, "config", None)
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise CliError(
            f"{where}: its tokenizer is not the model's (another vocabulary); give a model of the same one"
        )
    if getattr(ours, "model_type", None) != getattr(theirs, "model_type", None):
        raise CliError(
            f"{where}: a {getattr(theirs, 'model_type', '?')} model, the audited one is "
            f"{getattr(ours, 'model_type', '?')}; give a reference of the same architecture"
        )


def world_audit(
    model: Any,
    tokenizer: Any,
    size_name: str,
    split_seed: int,
    *,
    reference: Any = "never-learned",
    relearn: RelearnSettings | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """The audit of ``model`` on the world split; ``reference="never-learned"`` trains (once) and uses
    the world model pretrained without the split's forget facts, ``None`` audits the model alone."""
    model_reference = None
    if reference == "never-learned":
        model_reference, *_ = load_never_learned_model(size_name, split_seed, log=log)
        model_reference.to(next(model.parameters()).device)
    elif reference is not None:
        model_reference = reference
    result = audit_model(
        model,
        tokenizer,
        forget_facts(size_name, split_seed),
        non_member_twins(size_name, split_seed),
        retain=retain_facts(size_name, split_seed),
        reference=model_reference,
        values=relation_values(),
        relearn=relearn,
    )
    return {"world": size_name, "split_seed": split_seed, **result}


def audit_table(result: dict[str, Any]) -> str:
    """The audit as a Markdown table: a row per model, then the relearning curves."""
    names = [n for n in ("model", "reference") if n in result]
    head = [
        "",
        *(f"MIA AUC {MIA_NAMES[m]}" for m in MIA_NAMES),
        "mean log truth ratio",
        "true ranks last",
        "forget recall",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        row = result[name]
        cells = [f"{row['mia'][m]['auc']:.2f}" for m in MIA_NAMES]
        cells += [
            f"{row['mean_log_truth_ratio']:+.2f}",
            f"{100 * row['ranks_last']:.0f}%",
            f"{100 * row['forget_recall']:.0f}%",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if "forget_quality" in result:
        quality = result["forget_quality"]
        text += f"\n\nForget quality (KS test of truth ratios against the reference): p = {quality:.3g}"
    if "relearn_steps" in result:
        steps = result["relearn_steps"]
        text += (
            "\n\nRelearning: held-out forget recall after k steps of NLL on a forget fold "
            "(or on retain facts)\n\n"
        )
        text += "| model | fine-tuned on | " + " | ".join(f"k={k}" for k in steps) + " |\n"
        text += "|" + "---|" * (len(steps) + 2)
        for name in names:
            for task, curve in result[name]["relearning"].items():
                text += f"\n| {name} | {task} | " + " | ".join(f"{100 * v:.0f}%" for v in curve) + " |"
    return text


def audit_markdown(runs: list[dict[str, Any]]) -> str:
    """``compare --audit``: per objective and rule, the audit's numbers over the seeds (mean ± sd),
    the never-learned reference's beside them (the same model for every rule of a seed)."""
    audited = [r for r in runs if "audit" in r]
    if not audited:
        return ""

    def row(label: str, audits: list[dict[str, Any]], who: str) -> list[str]:
        values = {
            "loss": [a[who]["mia"]["loss"]["auc"] for a in audits],
            "min_k_pp": [a[who]["mia"]["min_k_pp"]["auc"] for a in audits],
            "tr": [a[who]["mean_log_truth_ratio"] for a in audits],
            "last": [100 * a[who]["ranks_last"] for a in audits],
            "recall": [100 * a[who]["forget_recall"] for a in audits],
        }
        cells = [cell(summary(values[k]), 1.0, 2, median=False) for k in ("loss", "min_k_pp", "tr")]
        cells += [cell(summary(values[k]), 1.0, 0, median=False) for k in ("last", "recall")]
        quality = [a["forget_quality"] for a in audits if "forget_quality" in a and who == "model"]
        cells.append(cell(summary(quality), 1.0, 3, median=False) if quality else "-")
        return [label, *cells]

    head = [
        "objective+rule",
        "MIA AUC LOSS",
        "MIA AUC Min-K%++",
        "mean log truth ratio",
        "true ranks last %",
        "forget recall %",
        "forget quality p",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in audited:
        groups.setdefault((r["objective"], r["rule"]), []).append(r["audit"])
    rows = [row(f"{o}+{rule}", audits, "model") for (o, rule), audits in groups.items()]
    by_seed = {r["seed"]: r["audit"] for r in audited if "reference" in r["audit"]}
    if by_seed:
        rows.append(row("never-learned reference", list(by_seed.values()), "reference"))
    intro = (
        f"Audit of the forgetting (forget facts against fresh-name twins), mean ± standard deviation "
        f"over {len({r['seed'] for r in audited})} seed(s); an AUC of 0.5 and the reference's truth "
        "ratio are where a model that never learned the facts sits; forget quality: the KS test of "
        "each run's truth ratios against the reference's."
    )
    return "\n".join([intro, "", markdown_table(head, rows)]) + "\n"


def relearn_settings(args: argparse.Namespace) -> RelearnSettings | None:
    if getattr(args, "no_relearn", False):
        return None
    try:
        return RelearnSettings(lr=args.relearn_lr)
    except ValueError as err:
        raise CliError(f"--relearn-lr: {err}") from err


def run(args: argparse.Namespace) -> int:
    from gradsynth.cli.sources import _load_model, require_lm_extra
    from gradsynth.cli.unlearn_command import resolve_device

    if args.out is not None:
        check_output_folder(args.out, args.overwrite, run_inputs(args))
    require_lm_extra()
    device = resolve_device(args.device)
    model, tokenizer = _load_model(args.model, "float32")
    reference: Any = "never-learned"
    if args.reference_model is not None:
        reference, reference_tokenizer = _load_model(args.reference_model, "float32")
        check_same_vocabulary(
            model, tokenizer, reference, reference_tokenizer, f"--reference-model {args.reference_model}"
        )
        reference.to(device)
    elif args.no_reference:
        reference = None
    model.to(device)
    try:
        result = world_audit(
            model, tokenizer, args.world, args.seed, reference=reference, relearn=relearn_settings(args)
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    print(audit_table(result))
    if args.out is not None:
        with staged_output(args.out, args.overwrite) as staging:
            (staging / "audit.json").write_text(json.dumps({"model": args.model, **result}, indent=2))
        print(f"Wrote {args.out}/audit.json")
    return 0
