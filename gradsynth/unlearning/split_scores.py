"""Every score of a set of evaluation splits, as one function of the model.

Per split (a list of `gradsynth.unlearning.encoding.Example`): the answer NLL and greedy recall
(`gradsynth.unlearning.evaluate.split_metrics`), the multiple-choice accuracy of question/answer
splits (`gradsynth.unlearning.multiple_choice`: 4 options, the distractors drawn from the split's
other answers), and optionally the ROUGE-L recall of greedy answers
(`gradsynth.unlearning.generation`) and lm-eval task scores
(`gradsynth.unlearning.benchmarks.evaluate_tasks`). `score_splits` is what the command line
reports before and after a run; `SplitScores` holds the encoded splits so that a training
callback (`gradsynth.integrations.evaluation_callback.EvaluationCallback`) scores them every few
steps without encoding them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from gradsynth.unlearning.answers import answer_scores
from gradsynth.unlearning.encoding import Example, make_batches
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.generation import rouge_l_of
from gradsynth.unlearning.multiple_choice import Choice, make_choices, mc_accuracy

Batches = dict[str, tuple[list[dict[str, Tensor]], bool]]


def score_splits(
    model: Any,
    tokenizer: Any,
    batches: Batches,
    choices: Mapping[str, list[Choice]] | None = None,
    generate: Mapping[str, list[Example]] | None = None,
    max_length: int | None = None,
    *,
    contained: Mapping[str, list[Example]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{split: {"nll", "recall"[, "mc_acc"][, "rougeL_recall"]}}`` of ``model``.

    ``batches``: each split's encoded batches and whether it has answers; ``choices``: the
    multiple-choice questions of the splits that have them; ``generate``: the splits whose greedy
    answers are scored by ROUGE-L recall, each prompt cut to its last ``max_length`` tokens if given
    (as training cuts it: a 200 KB question was otherwise decoded whole); ``contained``: the splits
    whose recall is that of instruction-tuned models instead, a greedy answer that contains the gold
    one (`gradsynth.unlearning.answers.answer_scores`, with ROUGE-L from the same generation).
    """
    metrics = {name: split_metrics(model, b, answers) for name, (b, answers) in batches.items()}
    for name, questions in (choices or {}).items():
        metrics[name]["mc_acc"] = mc_accuracy(model, tokenizer, questions)
    for name, examples in (generate or {}).items():
        metrics[name]["rougeL_recall"] = rouge_l_of(model, tokenizer, examples, max_length=max_length)
    for name, examples in (contained or {}).items():
        metrics[name].update(answer_scores(model, tokenizer, examples, max_length=max_length))
    return metrics


def answer_choices(examples: Sequence[Example], group: str) -> list[Choice] | None:
    """Multiple-choice questions of a question/answer split: the distractors are the split's other
    answers (`make_choices`, the split as one group), the context each example's own prompt (its
    chat turn, if the prompts are in chat format). None when the split is plain text or has fewer
    than 2 distinct answers."""
    qa = [e for e in examples if e.answer is not None]
    if len(qa) != len(examples) or len({e.answer for e in qa}) < 2:
        return None
    made = make_choices([(e.prompt, e.answer or "", group) for e in qa], {group: [e.answer for e in qa]})
    return [replace(c, context=e.prompt) for c, e in zip(made, qa, strict=True)]


class SplitScores:
    """A callable ``scores(model) -> {"<split>/<metric>": value}`` over fixed evaluation splits.

    Args:
        tokenizer: the model's tokenizer.
        splits: ``{name: examples}``; a split of question/answer examples gets recall and
            multiple-choice accuracy, a plain-text one its NLL only.
        max_length: token cut of each example.
        rouge: also score greedy answers by ROUGE-L recall (generation: slower).
        tasks: lm-eval task names scored too (``"<task>/<metric>"``); ``include_path`` and
            ``limit`` as in `gradsynth.unlearning.benchmarks.evaluate_tasks`.
    """

    def __init__(
        self,
        tokenizer: Any,
        splits: Mapping[str, Sequence[Example]],
        *,
        max_length: int = 256,
        batch_size: int = 64,
        rouge: bool = False,
        tasks: Sequence[str] = (),
        include_path: str | Path | None = None,
        limit: int | float | None = None,
    ) -> None:
        if not splits:
            raise ValueError("no splits given; pass {name: [Example(...), ...]}")
        empty = [name for name, examples in splits.items() if not examples]
        if empty:
            raise ValueError(f"split {empty[0]!r} has no examples")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.batches: Batches = {
            name: (
                make_batches(tokenizer, list(examples), batch_size, max_length),
                all(e.answer is not None for e in examples),
            )
            for name, examples in splits.items()
        }
        self.choices = {
            name: found for name, examples in splits.items() if (found := answer_choices(examples, name))
        }
        self.generate = {name: list(e) for name, e in splits.items() if rouge and self.batches[name][1]}
        self.tasks, self.include_path, self.limit = tuple(tasks), include_path, limit

    def __call__(self, model: Any) -> dict[str, float]:
        flat = _flatten(
            score_splits(model, self.tokenizer, self.batches, self.choices, self.generate, self.max_length)
        )
        if self.tasks:
            from gradsynth.unlearning.benchmarks import evaluate_tasks

            tasks = evaluate_tasks(model, self.tokenizer, self.tasks, self.include_path, self.limit)
            flat.update(_flatten(tasks))
        return flat


def _flatten(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, undefined (None) values left out."""
    return {f"{outer}/{inner}": v for outer, d in nested.items() for inner, v in d.items() if v is not None}
