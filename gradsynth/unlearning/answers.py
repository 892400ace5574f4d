"""Scoring an instruction-tuned model's sentence answers: normalised containment and ROUGE-L.

An instruct model answers in a sentence ("The Eiffel Tower is in Paris, France."), so a fact is
*recalled* when the normalised gold answer occurs, as whole words, in the normalised greedy
answer (the convention of RWKU and TOFU). `normalise` does, in order:

1. Unicode NFKC and lower case;
2. thousands separators dropped (``1,000`` -> ``1000``);
3. every character other than ``[a-z0-9]`` becomes a space (punctuation, hyphens, quotes);
4. the articles ``a``, ``an``, ``the`` are dropped;
5. number words become digits: ``zero`` .. ``nineteen``, the tens ``twenty`` .. ``ninety``, and a
   tens word followed by a unit word is one number (``twenty one`` / ``twenty-one`` -> ``21``).

``contains(gold, generated) = " " + normalise(gold) + " "`` is a substring of
``" " + normalise(generated) + " "`` (an empty gold answer is never contained), so ``"8 legs"``
answers ``"Eight"`` and ``"Parisian"`` does not answer ``"Paris"``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from gradsynth.unlearning.encoding import Example

ARTICLES = frozenset({"a", "an", "the"})
UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = {word: value for value, word in enumerate(UNITS)} | {
    word: 10 * (i + 2) for i, word in enumerate(TENS)
}


def _numbers(words: list[str]) -> list[str]:
    """Number words as digits; a tens word and the unit word after it as one number."""
    out: list[str] = []
    i = 0
    while i < len(words):
        value = NUMBER_WORDS.get(words[i])
        if value is None:
            out.append(words[i])
            i += 1
            continue
        nxt = NUMBER_WORDS.get(words[i + 1]) if i + 1 < len(words) else None
        if value >= 20 and nxt is not None and 1 <= nxt <= 9:
            out.append(str(value + nxt))
            i += 2
        else:
            out.append(str(value))
            i += 1
    return out


def normalise(text: str) -> str:
    """``text`` lower-cased, without punctuation or articles, number words as digits (see above)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    words = [w for w in re.sub(r"[^a-z0-9]+", " ", text).split() if w not in ARTICLES]
    return " ".join(_numbers(words))


def contains(gold: str, generated: str) -> bool:
    """Whether the normalised ``gold`` answer occurs as whole words in the normalised ``generated``."""
    want = normalise(gold)
    return bool(want) and f" {want} " in f" {normalise(generated)} "


def answer_scores(
    model: Any, tokenizer: Any, examples: list[Example], max_length: int | None = None
) -> dict[str, float | None]:
    """Over the examples with answers, from one greedy generation each (32 new tokens; each prompt
    cut to its last ``max_length`` tokens if given): ``recall`` (share whose answer `contains` the
    gold one) and ``rougeL_recall`` (mean ROUGE-L recall)."""
    from gradsynth.unlearning.generation import greedy_answers, rouge_l_recall

    chosen = [e for e in examples if e.answer is not None]
    if not chosen:
        return {"recall": None, "rougeL_recall": None}
    was_training = model.training
    model.eval()
    generated = greedy_answers(model, tokenizer, [e.prompt for e in chosen], max_length=max_length)
    model.train(was_training)
    pairs = list(zip([e.answer or "" for e in chosen], generated, strict=True))
    return {
        "recall": sum(contains(a, g) for a, g in pairs) / len(pairs),
        "rougeL_recall": sum(rouge_l_recall(a, g) for a, g in pairs) / len(pairs),
    }
