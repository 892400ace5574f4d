"""``gradsynth audit`` (and ``unlearn --audit``): how deep the forgetting of a run is.

The audit of `gradsynth.unlearning.audit` on the world split's forget facts against fresh-name
twins (`gradsynth.world.never_learned`), beside the world model that never learned the forget
facts (or ``--reference-model``): MIA AUCs, truth ratios, the KS forget quality, relearning.
With ``--forget FILE --non-members FILE`` it audits any model on those files instead
(`gradsynth.cli.user_audit`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gradsynth.cli.compare_results import cell, summary
from gradsynth.cli.errors import CliError
from gradsynth.cli.output_folder import check_output_folder, run_inputs, staged_output
from gradsynth.cli.parser import parse_list
from gradsynth.cli.tables import markdown_table
from gradsynth.cli.user_audit import load_reference, user_audit
from gradsynth.unlearning.audit import RECALLS, RelearnSettings, audit_model
from gradsynth.world.never_learned import (
    forget_facts,
    load_never_learned_model,
    non_member_twins,
    relation_values,
    retain_facts,
)

MIA_NAMES = {"loss": "LOSS", "zlib": "zlib", "min_k": "Min-K%", "min_k_pp": "Min-K%++"}


def world_audit(
    model: Any,
    tokenizer: Any,
    size_name: str,
    split_seed: int,
    *,
    reference: Any = "never-learned",
    relearn: RelearnSettings | None = None,
    recall: str = "exact",
    log: Any = print,
) -> dict[str, Any]:
    """The audit of ``model`` on the world split; ``reference="never-learned"`` trains (once) and uses
    the world model pretrained without the split's forget facts, ``None`` audits the model alone.
    ``recall``: the run's measure of forget recall (`gradsynth.unlearning.audit.forget_recall`)."""
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
        recall=recall,
    )
    return {"world": size_name, "split_seed": split_seed, **result}


def recall_name(result: dict[str, Any]) -> str:
    """How the audit read forget recall, in words (audits from before the choice read ``exact``)."""
    if result.get("recall", "exact") == "contains":
        return "answer in the greedy generation"
    return "answer and end teacher-forced"


def audit_table(result: dict[str, Any]) -> str:
    """The audit as a Markdown table: a row per model, then the relearning curves."""
    names = [n for n in ("model", "reference") if n in result]
    head = [
        "",
        *(f"MIA AUC {MIA_NAMES[m]}" for m in MIA_NAMES),
        "mean log truth ratio",
        "true ranks last",
        f"forget recall ({recall_name(result)})",
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
            f"\n\nRelearning: held-out forget recall ({recall_name(result)}) after k steps of NLL on "
            "a forget fold (or on retain facts)\n\n"
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
        for task in relearned:  # held-out forget recall after the attack's last step
            found = [100 * a[who]["relearning"][task][-1] for a in audits]
            cells.append(cell(summary(found), 1.0, 0, median=False))
        return [label, *cells]

    # The relearning columns, where every audit ran the attack (the last k is the same in all).
    relearned = [
        task
        for task in ("forget", "retain")
        if all(task in r["audit"]["model"].get("relearning", {}) for r in audited)
    ]
    last_k = audited[0]["audit"].get("relearn_steps", [0])[-1]

    head = [
        "objective+rule",
        "MIA AUC LOSS",
        "MIA AUC Min-K%++",
        "mean log truth ratio",
        "true ranks last %",
        "forget recall %",
        "forget quality p",
        *(f"relearned % (k={last_k}, {task})" for task in relearned),
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in audited:
        groups.setdefault((r["objective"], r["rule"]), []).append(r["audit"])
    rows = [row(f"{o}+{rule}", audits, "model") for (o, rule), audits in groups.items()]
    by_seed = {r["seed"]: r["audit"] for r in audited if "reference" in r["audit"]}
    if by_seed:
        rows.append(row("never-learned reference", list(by_seed.values()), "reference"))
    files = any(r["audit"].get("source") == "files" for r in audited)
    against = "the non-member facts" if files else "fresh-name twins"
    intro = (
        f"Audit of the forgetting (forget facts against {against}), mean ± standard deviation "
        f"over {len({r['seed'] for r in audited})} seed(s); an AUC of 0.5 and the reference's truth "
        "ratio are where a model that never learned the facts sits; forget quality: the KS test of "
        f"each run's truth ratios against the reference's; recall: {recall_name(audited[0]['audit'])}."
    )
    if relearned:
        intro += (
            f" relearned: held-out forget recall after {last_k} steps of NLL fine-tuning on a fold of the "
            "forget facts (forget) or on as many retain facts (retain)."
        )
    return "\n".join([intro, "", markdown_table(head, rows)]) + "\n"


def relearn_settings(args: argparse.Namespace) -> RelearnSettings | None:
    if getattr(args, "no_relearn", False):
        return None
    # RelearnSettings checks these too; here the refusal names the flag.
    steps = parse_list(args.relearn_steps, int, "--relearn-steps")
    if min(steps) < 1:
        raise CliError(f"--relearn-steps {args.relearn_steps!r}: steps must be at least 1")
    if args.relearn_folds < 2:
        raise CliError(
            f"--relearn-folds {args.relearn_folds}: needs at least 2 (one fold to train, the rest held out)"
        )
    try:
        return RelearnSettings(folds=args.relearn_folds, steps=tuple(steps), lr=args.relearn_lr)
    except ValueError as err:
        raise CliError(f"--relearn-lr: {err}") from err


def _recorded_settings(model: str) -> dict[str, Any]:
    """The settings a saved run recorded in its report.json ({} when ``model`` is not a run folder)."""
    from pathlib import Path

    try:
        settings = json.loads((Path(model) / "report.json").read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _recorded_recall(model: str) -> str | None:
    """The recall a saved run was stopped and scored by, if it recorded one."""
    task = _recorded_settings(model).get("task")
    recall = task.get("recall") if isinstance(task, dict) else None
    return recall if recall in RECALLS else None


def _world_run(args: argparse.Namespace) -> None:
    """Take ``--world``/``--seed`` from a saved run's report.json where not given, and refuse ones
    that contradict it: the never-learned reference and twins of another split would make every
    number wrong (absent both: the default world, seed 0)."""
    recorded_world, recorded_seed = None, None
    settings = _recorded_settings(args.model)  # {} outside a run folder: nothing to check against
    task = settings.get("task")
    source = task.get("source") if isinstance(task, dict) else None
    seed = settings.get("seed")
    if isinstance(source, str):
        if not source.startswith("embedded world ("):
            raise CliError(
                f"{args.model} was unlearned on files, not the embedded world (report.json); audit it "
                "with --forget FILE --non-members FILE"
            )
        recorded_world = source.removeprefix("embedded world (").rstrip(")")
        recorded_seed = seed if isinstance(seed, int) else None
    if recorded_world is not None and args.world not in (None, recorded_world):
        raise CliError(
            f"{args.model} was unlearned on the '{recorded_world}' world (report.json); pass --world "
            f"{recorded_world}"
        )
    if recorded_seed is not None and args.seed not in (None, recorded_seed):
        raise CliError(
            f"{args.model} was unlearned with --seed {recorded_seed} (report.json), not {args.seed}: the "
            f"reference of another seed never learned other facts; pass --seed {recorded_seed}"
        )
    args.world = args.world or recorded_world or "default"
    args.seed = args.seed if args.seed is not None else (recorded_seed or 0)


def _user_files(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of a user's audit: --forget and --non-members together, no world flags."""
    if args.forget is None or args.non_members is None:
        given, missing = ("--forget", "--non-members") if args.forget else ("--non-members", "--forget")
        raise CliError(
            f"{given} needs {missing} FILE too: the audit tells the forget facts from non-members "
            "(facts the model never learned, of the same forms)"
        )
    if args.world is not None or args.seed is not None:
        flag = "--world" if args.world is not None else "--seed"
        raise CliError(f"{flag} goes with the embedded world's runs; with --forget/--non-members drop it")
    if args.no_reference:
        raise CliError("--no-reference: a user's model is audited alone unless --reference-model is given")
    files = [("--forget", args.forget), ("--non-members", args.non_members)]
    return dict(files + ([("--retain", args.retain)] if args.retain else []))


def _run_on_files(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from gradsynth.cli.sources import _load_model, formatted, read_splits

    splits = read_splits(list(_user_files(args).items()))
    model, tokenizer = _load_model(args.model, "float32")
    splits, _ = formatted(splits, tokenizer, args)
    reference = load_reference(args, model, tokenizer, device)
    model.to(device)
    return user_audit(
        model,
        tokenizer,
        splits["--forget"],
        splits["--non-members"],
        splits.get("--retain", []),
        reference=reference,
        relearn=relearn_settings(args),
        max_length=args.max_length or 256,
        recall=args.recall or "contains",
    )


def run(args: argparse.Namespace) -> int:
    from gradsynth.cli.sources import _load_model, require_lm_extra
    from gradsynth.cli.unlearn_command import resolve_device

    on_files = args.forget is not None or args.non_members is not None
    if args.recall is None:  # read forget recall as the run did
        args.recall = _recorded_recall(args.model)
    if on_files:
        _user_files(args)  # refuse a wrong combination before reading anything
    else:
        for flag, value in (
            ("--retain", args.retain),
            ("--prompt-format", args.prompt_format),
            ("--max-length", args.max_length),
        ):
            if value is not None:
                raise CliError(f"{flag} goes with --forget and --non-members (the world has its own)")
        _world_run(args)
    if args.out is not None:
        check_output_folder(args.out, args.overwrite, run_inputs(args))
    require_lm_extra()
    device = resolve_device(args.device)
    if on_files:
        result = _run_on_files(args, device)
    else:
        model, tokenizer = _load_model(args.model, "float32")
        reference: Any = "never-learned"
        if args.reference_model is not None:
            reference = load_reference(args, model, tokenizer, device)
        elif args.no_reference:
            reference = None
        model.to(device)
        try:
            result = world_audit(
                model,
                tokenizer,
                args.world,
                args.seed,
                reference=reference,
                relearn=relearn_settings(args),
                recall=args.recall or "exact",
            )
        except ValueError as err:
            raise CliError(str(err)) from err
    print(audit_table(result))
    if args.out is not None:
        with staged_output(args.out, args.overwrite) as staging:
            (staging / "audit.json").write_text(json.dumps({"model": args.model, **result}, indent=2))
        print(f"Wrote {args.out}/audit.json")
    return 0
