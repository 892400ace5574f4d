"""The audit of a user's model (``--model``): its forget file against a ``--non-members`` file.

The embedded world brings its own non-members (fresh-name twins) and never-learned reference; a
user's model brings them as files and folders:

- ``--non-members FILE``: facts the model never learned, of the same forms as the forget facts
  (``question`` and ``answer`` columns, read as ``--forget`` is, in the same prompt format), the
  membership attacks' negatives;
- ``--reference-model DIR`` (optional): a model that never learned the forget facts (TOFU's
  retain model), with the model's vocabulary and architecture; without it the model is audited
  alone (no forget quality, no curves beside a reference's).

The truth ratio's perturbations of a fact are the other answers of the forget and non-member
files (at most `PERTURBATIONS` of them, drawn once per fact with a fixed seed), since a file has
no relations.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from typing import Any

from gradsynth.cli.errors import CliError
from gradsynth.unlearning.audit import AuditFact, RelearnSettings, audit_model
from gradsynth.unlearning.encoding import Example, question_of

#: Perturbed answers per fact for the truth ratio of a user's files (each is one more scoring).
PERTURBATIONS = 19


def audit_facts(examples: list[Example], flag: str) -> list[AuditFact]:
    """Question/answer examples (as the task formatted them) as audit facts; text rows are refused:
    the audit scores an answer given a question."""
    if not examples:
        raise CliError(f"{flag}: no examples; give question/answer rows")
    if any(e.answer is None for e in examples):
        raise CliError(
            f"{flag}: has 'text' rows, the audit scores answers: give 'question' and 'answer' columns "
            "(the forms of the forget facts)"
        )
    return [
        AuditFact(question_of(e.prompt), e.answer or "", prompt=e.prompt, separator=e.separator)
        for e in examples
    ]


def with_labels(facts: list[AuditFact], trained: list[Example]) -> list[AuditFact]:
    """``facts`` with the answers of ``trained`` (the same questions, in order) as relearning labels."""
    if len(trained) != len(facts) or any(
        t.prompt != f.example().prompt for t, f in zip(trained, facts, strict=False)
    ):
        raise ValueError("the training examples are not the scored forget facts in the same order")
    return [dataclasses.replace(f, label=t.answer) for f, t in zip(facts, trained, strict=True)]


def perturbation_values(
    facts: list[AuditFact], answers: list[str], per_fact: int = PERTURBATIONS
) -> tuple[list[AuditFact], dict[str, list[str]]]:
    """Each fact in a group of its own whose values are its answer and up to ``per_fact`` other
    distinct ``answers`` (drawn with a fixed seed), for `audit_model`'s ``values``."""
    distinct = sorted(set(answers))
    pick = random.Random("perturbations")
    grouped, values = [], {}
    for i, fact in enumerate(facts):
        others = [a for a in distinct if a != fact.answer]
        if len(others) > per_fact:
            others = pick.sample(others, per_fact)
        group = f"#{i}"
        grouped.append(dataclasses.replace(fact, group=group))
        values[group] = [fact.answer, *others]
    return grouped, values


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


def read_non_members(args: argparse.Namespace) -> list[Example] | None:
    """``--non-members`` as read from the file (plain format), before any model is loaded."""
    if getattr(args, "non_members", None) is None:
        return None
    from gradsynth.cli.sources import read_splits

    examples = read_splits([("--non-members", args.non_members)])["--non-members"]
    audit_facts(examples, f"--non-members {args.non_members}")  # text rows: refused before the run
    return examples


def audit_non_members(
    args: argparse.Namespace, from_file: list[Example] | None, task: Any, relearn: RelearnSettings | None
) -> list[Example] | None:
    """The audit's non-members for ``task``: ``--non-members`` put in its prompt format, else (with
    ``--audit``) those its source brings (``--facts real``), else None; with any, the forget set is
    checked to be auditable before the run."""
    if from_file is not None:
        chosen = in_task_format(from_file, task.tokenizer, args)
    else:
        chosen = task.non_members if getattr(args, "audit", False) else None
        if chosen == []:
            raise CliError(
                "--audit: the model knows every shipped fact, so --facts real has no non-members to "
                "audit against; give --non-members FILE (facts it does not know, of the same forms)"
            )
    if chosen is not None:
        check_user_audit(task.forget, relearn)
    elif getattr(args, "audit", False):  # the world's own facts: only the folds can fail
        check_folds(len(task.forget), relearn, "the forget set")
    return chosen


def non_members_name(args: argparse.Namespace) -> str:
    """What the audit's non-members were, for its printed heading."""
    if getattr(args, "non_members", None) is not None:
        return f"--non-members {args.non_members}"
    return "the shipped facts the model does not know"


def in_task_format(examples: list[Example], tokenizer: Any, args: argparse.Namespace) -> list[Example]:
    """``examples`` in the prompt format the task's files were put in (`gradsynth.cli.sources.formatted`)."""
    from gradsynth.cli.sources import formatted

    return formatted({"--non-members": examples}, tokenizer, args)[0]["--non-members"]


def load_reference(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> Any:
    """``--reference-model``, checked against the audited model and moved to ``device`` (or None)."""
    path = getattr(args, "reference_model", None)
    if path is None:
        return None
    from gradsynth.cli.sources import _load_model

    try:
        reference, reference_tokenizer = _load_model(path, getattr(args, "dtype", None) or "float32")
    except CliError as err:  # its message names --model: say which model it was
        raise CliError(str(err).replace(f"--model {path}", f"--reference-model {path}", 1)) from err
    check_same_vocabulary(model, tokenizer, reference, reference_tokenizer, f"--reference-model {path}")
    return reference.to(device)


def task_audit(
    model: Any,
    task: Any,
    non_members: list[Example],
    reference: Any = None,
    relearn: RelearnSettings | None = None,
) -> dict[str, Any]:
    """The audit of a run's unlearned ``model`` on its task (``unlearn``/``compare --audit``): the
    forget split as scored (gold answers, the non-members' form), relearning on what the run trained
    on, forget recall read by the run's own measure."""
    return user_audit(
        model,
        task.tokenizer,
        task.splits.get("forget", task.forget),
        non_members,
        task.retain,
        reference=reference,
        relearn=relearn,
        max_length=task.max_length,
        recall=task.recall,
        trained=task.forget,
    )


def check_user_audit(forget: list[Example], relearn: RelearnSettings | None) -> None:
    """Refuse, before any unlearning, a forget set the audit cannot score or split into folds."""
    audit_facts(forget, "--forget")
    check_folds(len(forget), relearn, "--forget")


def check_folds(facts: int, relearn: RelearnSettings | None, name: str) -> None:
    """Refuse a relearning attack with more folds than forget facts (before any unlearning)."""
    if relearn is not None and facts < relearn.folds:
        raise CliError(
            f"{name}: {facts} facts cannot make the relearning attack's {relearn.folds} folds; "
            "give more forget facts, fewer --relearn-folds, or pass --no-relearn"
        )


def user_audit(
    model: Any,
    tokenizer: Any,
    forget: list[Example],
    non_members: list[Example],
    retain: list[Example],
    *,
    reference: Any = None,
    relearn: RelearnSettings | None = None,
    max_length: int = 256,
    recall: str = "contains",
    trained: list[Example] | None = None,
) -> dict[str, Any]:
    """`audit_model` on a user's files (already in the model's prompt format); ``recall``: the run's
    measure of forget recall (a model's default: the answer inside the greedy generation).

    ``forget`` is scored in the form of ``non_members`` (question and gold answer). ``trained``: the
    run's training examples of the same facts in the same order, where they differ (``--facts
    real`` trains on the model's own answer sentences): the relearning attack fine-tunes on them.
    """
    members = audit_facts(forget, "--forget")
    if trained is not None:
        members = with_labels(members, trained)
    others = audit_facts(non_members, "--non-members")
    if len({f.answer for f in (*members, *others)}) < 2:
        raise CliError(
            "--forget/--non-members: every fact has the same answer, so the truth ratio has no "
            "perturbed answer; give facts with different answers"
        )
    members, values = perturbation_values(members, [f.answer for f in (*members, *others)])
    # Relearning on retain facts needs answers to train on; a text retain file gives no such curve.
    retain_facts = audit_facts(retain, "--retain") if retain and all(e.answer for e in retain) else []
    try:
        result = audit_model(
            model,
            tokenizer,
            members,
            others,
            retain=retain_facts,
            reference=reference,
            values=values,
            relearn=relearn,
            max_length=max_length,
            recall=recall,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    return {"source": "files", **result}
