"""Multiple-choice questions made from question/answer facts, scored the way lm-eval scores them.

Each fact becomes a question with up to ``n_options`` answers: the true one and distractors drawn
from the other values of the same relation (its "group"), so the options are all plausible.
The draw and the position of the true answer come from ``random.Random`` seeded with the
question itself: the same facts always give the same questions, whatever else is in the split.

Scoring is lm-eval's ``multiple_choice`` ``acc`` (cloze style): the context is the prompt
(``question + " Answer:"``), each option is scored as the continuation ``" " + option`` by the
sum of its token log-probabilities, and the question counts as right iff the true option has
the largest sum (ties go to the first option, as ``numpy.argmax``). The continuation's tokens
are those lm-eval takes: ``encode(context + continuation)`` minus the first ``len(encode(context))``
tokens. `mc_accuracy` does this in process, without lm-eval (whose import alone takes seconds);
tests check that it agrees exactly with lm-eval's ``acc`` on the same task files, which
`write_lm_eval_task` writes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradsynth.unlearning.encoding import pad_id_of, prompt_of
from gradsynth.unlearning.shared_prefix import logits_from

N_OPTIONS = 4


@dataclass(frozen=True)
class Choice:
    """One multiple-choice question: the context, its options and the index of the true one."""

    context: str
    options: tuple[str, ...]
    answer: int


def make_choices(
    facts: Iterable[tuple[str, str, str]], values: dict[str, Iterable[str]], n_options: int = N_OPTIONS
) -> list[Choice]:
    """One `Choice` per ``(question, answer, group)``; distractors are other ``values[group]``.

    A group with fewer than ``n_options`` distinct values gives questions with fewer options
    (all of them); a fact whose group has no other value is refused, since it has no distractor.
    """
    pools = {group: sorted(set(vals)) for group, vals in values.items()}
    choices = []
    for question, answer, group in facts:
        others = [v for v in pools.get(group, []) if v != answer]
        if not others:
            raise ValueError(f"no distractor for {question!r}: group {group!r} has no other value")
        rng = random.Random(f"mc-{question}")
        options = rng.sample(others, min(n_options - 1, len(others)))
        position = rng.randrange(len(options) + 1)
        options.insert(position, answer)
        choices.append(Choice(prompt_of(question), tuple(options), position))
    return choices


def chance_level(choices: list[Choice]) -> float:
    """Expected accuracy of guessing: the mean of 1 / (number of options)."""
    return sum(1 / len(c.options) for c in choices) / max(len(choices), 1)


def _continuation(tokenizer: Any, context: str, option: str) -> tuple[list[int], list[int]]:
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(f"{context} {option}")["input_ids"]
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def option_logprobs(
    model: Any, tokenizer: Any, choices: list[Choice], batch_size: int = 64
) -> list[list[float]]:
    """Per question, the summed log-probability of each option's continuation tokens.

    Sequences are batched by length (less padding); right padding leaves the real tokens'
    logits unchanged in a causal model; the tokens every sequence of a batch starts with (a chat
    template's system turn) run once (`gradsynth.unlearning.shared_prefix.logits_from`)."""
    pairs = [(i, _continuation(tokenizer, c.context, o)) for i, c in enumerate(choices) for o in c.options]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1][0]) + len(pairs[k][1][1]))
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    sums = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [pairs[k][1][0] + pairs[k][1][1] for k in rows]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        first = min(len(pairs[k][1][0]) for k in rows) - 1  # the first position whose logits count
        logits, offset = logits_from(model, ids, mask, first)
        logp = torch.log_softmax(logits.float(), dim=-1)
        for row, k in enumerate(rows):
            context, continuation = pairs[k][1]
            start = len(context) - 1 - offset
            positions = torch.arange(start, start + len(continuation), device=device)
            sums[k] = float(logp[row, positions, torch.tensor(continuation, device=device)].sum())
    model.train(was_training)
    out: list[list[float]] = [[] for _ in choices]
    for (question, _), value in zip(pairs, sums, strict=True):
        out[question].append(value)
    return out


def mc_accuracy(model: Any, tokenizer: Any, choices: list[Choice]) -> float | None:
    """lm-eval's ``acc``: the share of questions whose true option has the highest log-probability."""
    if not choices:
        return None
    scores = option_logprobs(model, tokenizer, choices)
    right = sum(
        max(range(len(s)), key=lambda k, s=s: (s[k], -k)) == c.answer
        for c, s in zip(choices, scores, strict=True)
    )
    return right / len(choices)


TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: options
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def write_lm_eval_task(choices: list[Choice], folder: str | Path, name: str) -> Path:
    """Write ``name.yaml`` and ``name.jsonl`` into ``folder`` (an lm-eval include path); returns the YAML."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with data.open("w") as handle:
        for c in choices:
            handle.write(
                json.dumps({"context": c.context, "options": list(c.options), "answer": c.answer}) + "\n"
            )
    yaml = folder / f"{name}.yaml"
    yaml.write_text(TASK_TEMPLATE.format(name=name, data=json.dumps(str(data.resolve()))))
    return yaml
