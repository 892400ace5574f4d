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
from torch import Tensor

from gradsynth.unlearning.encoding import Example, pad_id_of, token_ids
from gradsynth.unlearning.shared_prefix import SharedPrefix, cache_keyword, cache_of, shared_prefix

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


# Generation settings that change greedy decoding's choice, with their neutral values; a model whose
# generation config sets any of them otherwise is decoded by ``model.generate``, which applies them.
_NEUTRAL = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
}


def _processed(model: Any) -> bool:
    """Whether the model's generation config changes greedy choices (see `_NEUTRAL`)."""
    config = getattr(model, "generation_config", None)
    return any(getattr(config, name, None) not in (None, neutral) for name, neutral in _NEUTRAL.items())


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: list[str], batch_size: int = 64, max_length: int | None = None
) -> list[str]:
    """The model's greedy continuation of each prompt (its last ``max_length`` tokens, if given),
    at most `MAX_NEW_TOKENS` tokens up to the end-of-sentence token, decoded without special tokens.

    Decoded by `greedy_tokens` (the prompts' shared prefix run once, finished rows dropped), or by
    ``model.generate`` for a model whose generation config changes greedy choices."""
    if max_length is None:
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    else:
        encoded = [token_ids(tokenizer, p, max_length, from_end=True)[-max_length:] for p in prompts]
    pad, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    processed = _processed(model)
    prefix = None if processed else shared_prefix(model, encoded)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        if processed:
            tokens = _generated(model, chunk, pad, eos)
        else:
            tokens = greedy_tokens(model, chunk, pad, eos, prefix)
        answers += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return answers


def greedy_tokens(
    model: Any, rows: list[list[int]], pad: int, eos: int | None, prefix: SharedPrefix | None = None
) -> list[list[int]]:
    """Each row's greedy continuation, without the end-of-sentence token: the arg-max token, step by
    step, at most `MAX_NEW_TOKENS`.

    What ``model.generate(do_sample=False)`` chooses, decoded with less work: the rows are
    left-padded behind ``prefix`` (their shared start, run once: `gradsynth.unlearning.shared_prefix`)
    and a row that has ended leaves the batch (``generate`` runs every row until the last ends: a
    rambling answer of 32 tokens made the others' 7 cost 32)."""
    device = next(model.parameters()).device
    start = prefix.length if prefix is not None else 0
    ids, own_mask = left_padded([row[start:] for row in rows], pad, device)
    if prefix is not None:
        cache, mask = prefix.cache_for(len(rows)), prefix.attention(own_mask)
        positions = prefix.positions(own_mask)
    else:
        cache, mask, positions = None, own_mask, (own_mask.cumsum(-1) - 1).clamp(min=0)
    keyword = cache_keyword(model)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{keyword: cache},
    )
    active = torch.arange(len(rows), device=device)
    last = positions[:, -1]
    tokens: list[list[int]] = [[] for _ in rows]
    for step in range(MAX_NEW_TOKENS):
        chosen = out.logits[:, -1].argmax(dim=-1)
        going = torch.ones_like(chosen, dtype=torch.bool) if eos is None else chosen != eos
        for row, token, on in zip(active.tolist(), chosen.tolist(), going.tolist(), strict=True):
            if on:
                tokens[row].append(token)
        if step == MAX_NEW_TOKENS - 1 or not bool(going.any()):
            break
        cache = cache_of(out)
        if not bool(going.all()):
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            active, mask, last, chosen = active[kept], mask[kept], last[kept], chosen[kept]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        out = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            use_cache=True,
            logits_to_keep=1,
            **{keyword: cache},
        )
    return tokens


def left_padded(rows: list[list[int]], pad: int, device: Any) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded on the left to the longest (all end together)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _generated(model: Any, rows: list[list[int]], pad: int, eos: int | None) -> list[list[int]]:
    """``model.generate``'s greedy continuation of each row (left-padded), its own settings applied."""
    input_ids, attention = left_padded(rows, pad, next(model.parameters()).device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return output[:, input_ids.shape[1] :].tolist()


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
