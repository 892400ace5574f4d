"""Greedy answers and their ROUGE-L recall, for question/answer data on a user's model.

``ROUGE-L recall = LCS(answer words, generated words) / len(answer words)``, as RWKU reports it
(greedy decoding, 32 new tokens), computed by Google's ``rouge-score`` package (the one lm-eval's
ROUGE metrics use). Its words are the lower-cased runs of ``[a-z0-9]``: punctuation and other
characters separate words and are dropped, so ``"Velmora."`` matches ``"Velmora"`` (a plain
whitespace split, which gradsynth used before, counted them as different words; on text without
such characters the two agree, tests/test_objectives.py checks it). Generation
stops at the end-of-sentence token; the prompt is left-padded so all rows end at the same place.
With ``max_length``, a prompt keeps its last ``max_length`` tokens, as training keeps them (a
200 KB question was otherwise decoded over its whole length, for minutes).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from gradsynth.unlearning.encoding import Example, pad_id_of, token_ids

MAX_NEW_TOKENS = 32


@functools.cache
def _scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError(
            "ROUGE-L needs rouge-score: pip install 'gradsynth[lm]' (or 'gradsynth[eval]')"
        ) from err
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l_recall(reference: str, generated: str) -> float:
    """ROUGE-L recall of ``generated`` against ``reference`` by rouge-score (0 for an empty reference)."""
    return float(_scorer().score(reference, generated)["rougeL"].recall)


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int = 16, max_length: int | None = None
) -> list[str]:
    """The model's greedy continuation of each prompt (its last ``max_length`` tokens, if given),
    decoded without special tokens."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if max_length is None:
            encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in chunk]
        else:
            encoded = [token_ids(tokenizer, p, max_length, from_end=True)[-max_length:] for p in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return answers


def rouge_l_of(
    model: Any, tokenizer: Any, examples: list[Example], limit: int = 100, max_length: int | None = None
) -> float | None:
    """Mean ROUGE-L recall of greedy answers over the first ``limit`` examples (None without answers);
    each prompt cut to its last ``max_length`` tokens, if given."""
    chosen = [e for e in examples if e.answer is not None][:limit]
    if not chosen:
        return None
    was_training = model.training
    model.eval()
    generated = greedy_answers(model, tokenizer, [e.prompt for e in chosen], max_length=max_length)
    model.train(was_training)
    return sum(rouge_l_recall(e.answer or "", g) for e, g in zip(chosen, generated, strict=True)) / len(
        chosen
    )
