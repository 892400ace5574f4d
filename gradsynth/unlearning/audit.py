r"""The audit of an unlearned model: is the knowledge gone, or only hidden, or over-forgotten?

On the forget facts (members) against non-member facts of the same forms, for the model and,
when given, for a reference that never learned the forget facts (TOFU's retain model):

- **membership inference**: the AUCs of LOSS, zlib, Min-K% and Min-K%++
  (`gradsynth.unlearning.audit_metrics`); 0.5 is where the never-learned model should sit;
- **truth ratios**: each forget fact's true answer against the other answers of its relation,
  the share of facts whose true answer ranks last, and the forget quality, the p-value of the
  KS test between the model's truth ratios and the reference's;
- **relearning**: the model fine-tuned with plain answer NLL (AdamW) on one fold of the forget
  facts (on their ``label``, what the run trained on, where it is not the answer), and separately
  on as many retain facts, for ``max(steps)`` steps from one copy of its
  weights (restored between folds); the recall of the held-out forget facts after each of
  ``steps``, averaged over the folds, and minus the reference's curve when one is given.

Forget recall (before the attack and along its curves) is read as the run read it: ``exact``, the
answer and end-of-sequence arg-max under teacher forcing (the world's), or ``contains``, the
normalised answer inside a greedy generation (`gradsynth.unlearning.answers`; an instruct model's
default, whose sentence answers never match ``exact``).

Everything else is scored on the answer tokens, with the prompts the model was unlearned with. Rows
that share a chat template's turns run packed behind one copy of them, in scoring and in the
relearning steps alike (`gradsynth.unlearning.shared_prefix`): the same numbers up to rounding,
at about 1.6 x less compute on an instruct model's short questions.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradsynth.unlearning.answers import answer_scores
from gradsynth.unlearning.audit_metrics import (
    TokenStats,
    ks_pvalue,
    log_truth_ratio,
    mia_aucs,
    mia_scores,
    ranks_last,
    token_stats,
)
from gradsynth.unlearning.encoding import Example, make_batches, prompt_of
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.objectives import nll_loss
from gradsynth.unlearning.task_losses import batch_logits

RELEARN_STEPS = (1, 2, 5, 10, 20)
MAX_LENGTH = 64
RECALLS = ("contains", "exact")  # how forget recall is read: `forget_recall`


@dataclass(frozen=True)
class AuditFact:
    """A question, its answer and the group (relation) whose other answers are its perturbations.

    ``prompt``: the text the model is scored on before the answer, when it is not
    ``prompt_of(question)`` (e.g. a chat template's turn, with ``separator=""``). ``label``: what
    the relearning attack fine-tunes on, when the run trained on something other than the answer
    (an instruct model's own answer sentence); the answer is what every score reads."""

    question: str
    answer: str
    group: str = ""
    prompt: str | None = None
    separator: str = " "
    label: str | None = None

    def example(self, answer: str | None = None) -> Example:
        """This fact (or its question with another ``answer``) as an answer-only example."""
        prompt = self.prompt if self.prompt is not None else prompt_of(self.question)
        return Example(prompt, self.answer if answer is None else answer, separator=self.separator)


@dataclass(frozen=True)
class RelearnSettings:
    """The relearning attack: folds of the forget set, steps at which recall is read, AdamW's rate."""

    folds: int = 3
    steps: tuple[int, ...] = RELEARN_STEPS
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(
                f"relearning needs at least 2 folds (one to train, one held out); got {self.folds}"
            )
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"relearning steps must be >= 1; got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"the relearning rate must be > 0; got {self.lr}")
        object.__setattr__(self, "steps", tuple(sorted(set(self.steps))))


def _batches(
    tokenizer: Any, examples: Sequence[Example], batch_size: int = 64, max_length: int = MAX_LENGTH
) -> list[dict]:
    """Answer-only examples encoded in batches."""
    return make_batches(tokenizer, list(examples), batch_size, max_length)


def _examples(facts: Sequence[AuditFact]) -> list[Example]:
    return [f.example() for f in facts]


def _trained_examples(facts: Sequence[AuditFact]) -> list[Example]:
    return [f.example(f.label) for f in facts]


@torch.no_grad()
def answer_stats(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_length: int = MAX_LENGTH
) -> list[TokenStats]:
    """The answer tokens' stats of answer-only ``examples`` under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[TokenStats] = []
    try:
        for batch in _batches(tokenizer, examples, max_length=max_length):
            batch = {k: v.to(device) for k, v in batch.items()}
            out.extend(token_stats(*batch_logits(model, batch, share_prefix=True)))
    finally:
        model.train(was_training)
    return out


def _values_by_group(facts: Sequence[AuditFact]) -> dict[str, list[str]]:
    values: dict[str, set[str]] = {}
    for fact in facts:
        values.setdefault(fact.group, set()).add(fact.answer)
    return {group: sorted(v) for group, v in values.items()}


def truth_ratios(
    model: Any,
    tokenizer: Any,
    facts: Sequence[AuditFact],
    values: Mapping[str, Sequence[str]],
    max_length: int = MAX_LENGTH,
) -> tuple[list[float], float]:
    """Each fact's log truth ratio (perturbations: the other ``values`` of its group) and the share
    of facts whose true answer ranks last."""
    pairs, spans = [], []
    for fact in facts:
        others = [v for v in values.get(fact.group, ()) if v != fact.answer]
        if not others:
            raise ValueError(
                f"no perturbed answer for {fact.question!r}: group {fact.group!r} has no other value; "
                "give the facts a group (relation) with at least two answers"
            )
        spans.append((len(pairs), len(others)))
        pairs.append(fact.example())
        pairs.extend(fact.example(other) for other in others)
    nll = [s.mean_nll for s in answer_stats(model, tokenizer, pairs, max_length)]
    ratios, last = [], 0
    for start, count in spans:
        true, perturbed = nll[start], nll[start + 1 : start + 1 + count]
        ratios.append(log_truth_ratio(true, perturbed))
        last += ranks_last(true, perturbed)
    return ratios, last / max(len(facts), 1)


def _mia(
    model: Any,
    tokenizer: Any,
    members: Sequence[AuditFact],
    others: Sequence[AuditFact],
    max_length: int = MAX_LENGTH,
) -> dict:
    def scores(facts: Sequence[AuditFact]) -> dict[str, list[float]]:
        stats = answer_stats(model, tokenizer, _examples(facts), max_length)
        return mia_scores(stats, [f.answer for f in facts])

    return mia_aucs(scores(members), scores(others))


def forget_recall(
    model: Any,
    tokenizer: Any,
    facts: Sequence[AuditFact],
    max_length: int = MAX_LENGTH,
    recall: str = "exact",
) -> float:
    """The share of ``facts`` recalled: ``exact`` (answer and end-of-sequence arg-max, teacher-forced)
    or ``contains`` (the normalised answer inside the greedy generation)."""
    if recall == "contains":
        return answer_scores(model, tokenizer, _examples(facts), max_length)["recall"] or 0.0
    if recall != "exact":
        raise ValueError(f"recall must be one of {RECALLS}; got {recall!r}")
    return split_metrics(model, _batches(tokenizer, _examples(facts), max_length=max_length))["recall"]


def _fine_tune_curve(
    model: Any,
    tokenizer: Any,
    train: Sequence[AuditFact],
    held_out: Sequence[AuditFact],
    settings: RelearnSettings,
    max_length: int = MAX_LENGTH,
    recall: str = "exact",
) -> list[float]:
    """Recall of ``held_out`` after each of ``settings.steps`` steps of NLL on ``train`` (a copy)."""
    student = copy.deepcopy(model)
    student.train()
    device = next(student.parameters()).device
    (batch,) = _batches(tokenizer, _trained_examples(train), len(train), max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    params = list(student.parameters())
    # torch's fused AdamW: the same update up to rounding, ~6 x faster than its default on the CPU
    # (0.04 s against 0.25 s a step for 53M float32 parameters, one thread).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, fused=fused)
    curve = []
    for step in range(1, max(settings.steps) + 1):
        logits, labels = batch_logits(student, batch, share_prefix=True)
        optimizer.zero_grad()
        nll_loss(logits, labels).backward()
        optimizer.step()
        if step in settings.steps:
            curve.append(forget_recall(student, tokenizer, held_out, max_length, recall))
    return curve


def relearning(
    model: Any,
    tokenizer: Any,
    forget: Sequence[AuditFact],
    retain: Sequence[AuditFact],
    settings: RelearnSettings,
    max_length: int = MAX_LENGTH,
    recall: str = "exact",
) -> dict[str, list[float]]:
    """``{"forget": curve, "retain": curve}``: held-out forget recall after each step count, averaged
    over folds, fine-tuning on a forget fold or on as many retain facts."""
    order = list(range(len(forget)))
    random.Random(f"relearn-{settings.seed}").shuffle(order)
    folds = [[forget[i] for i in order[k :: settings.folds]] for k in range(settings.folds)]
    if any(not fold for fold in folds):
        raise ValueError(f"{len(forget)} forget facts cannot make {settings.folds} folds; use fewer folds")
    pick = random.Random(f"relearn-retain-{settings.seed}")
    curves: dict[str, list[list[float]]] = {"forget": [], "retain": []}
    for k, fold in enumerate(folds):
        held_out = [f for j, other in enumerate(folds) if j != k for f in other]
        curves["forget"].append(
            _fine_tune_curve(model, tokenizer, fold, held_out, settings, max_length, recall)
        )
        if retain:
            sample = pick.sample(list(retain), min(len(fold), len(retain)))
            curves["retain"].append(
                _fine_tune_curve(model, tokenizer, sample, held_out, settings, max_length, recall)
            )
    return {
        name: [sum(c) / len(c) for c in zip(*found, strict=True)] for name, found in curves.items() if found
    }


def audit_model(
    model: Any,
    tokenizer: Any,
    forget: Sequence[AuditFact],
    non_members: Sequence[AuditFact],
    *,
    retain: Sequence[AuditFact] = (),
    reference: Any = None,
    values: Mapping[str, Sequence[str]] | None = None,
    relearn: RelearnSettings | None = None,
    max_length: int = MAX_LENGTH,
    recall: str = "exact",
) -> dict[str, Any]:
    """The audit of ``model`` (and of ``reference``, beside it) as a JSON-ready dict.

    ``values``: the answers each group's perturbations are drawn from (default: the answers of
    the forget and non-member facts of that group). ``relearn=None`` skips the relearning attack.
    ``max_length``: tokens per scored example (prompt and answer). ``recall``: how forget recall
    is read, before and during the relearning attack (`forget_recall`); the run's own measure.
    """
    if not forget or not non_members:
        raise ValueError("the audit needs forget facts (members) and non-member facts")
    if recall not in RECALLS:
        raise ValueError(f"recall must be one of {RECALLS}; got {recall!r}")
    values = values if values is not None else _values_by_group([*forget, *non_members])
    result: dict[str, Any] = {"forget": len(forget), "non_members": len(non_members), "recall": recall}
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    ratios = {}
    for name, m in models.items():
        ratios[name], last = truth_ratios(m, tokenizer, forget, values, max_length)
        result[name] = {
            "mia": _mia(m, tokenizer, forget, non_members, max_length),
            "mean_log_truth_ratio": sum(ratios[name]) / len(ratios[name]),
            "ranks_last": last,
            "forget_recall": forget_recall(m, tokenizer, forget, max_length, recall),
        }
        if relearn is not None:
            result[name]["relearning"] = relearning(m, tokenizer, forget, retain, relearn, max_length, recall)
    if reference is not None:
        result["forget_quality"] = ks_pvalue(ratios["model"], ratios["reference"])
        if relearn is not None:
            result["relearning_minus_reference"] = {
                task: [a - b for a, b in zip(curve, result["reference"]["relearning"][task], strict=True)]
                for task, curve in result["model"]["relearning"].items()
            }
    if relearn is not None:
        result["relearn_steps"] = list(relearn.steps)
    return result
