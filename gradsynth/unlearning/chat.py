"""Question/answer examples in an instruction-tuned model's chat format.

``chat`` renders each question as one user turn with the tokenizer's chat template and the
generation prompt (``apply_chat_template(..., add_generation_prompt=True)``); the answer follows
it with no separator, then the end-of-sentence token, as the model's own reply would. ``plain`` is
the world's ``"<question> Answer:"`` followed by ``" " + answer``.

A template that writes the tokenizer's own beginning-of-sequence token is rendered without it
when the tokenizer adds that token itself, so the prompt does not start with it twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gradsynth.unlearning.encoding import Example, question_of

PROMPT_FORMATS = ("chat", "plain")


class NoChatTemplate(ValueError):
    """``chat`` was asked of a tokenizer that has no chat template."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, question: str) -> str:
    """``question`` as one user turn, followed by the start of the assistant's turn."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
    return text


def in_format(examples: list[Example], tokenizer: Any, prompt_format: str) -> list[Example]:
    """``examples`` (as read from a file, plain format) in ``prompt_format``; plain texts unchanged."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose {' or '.join(PROMPT_FORMATS)}")
    if prompt_format == "plain":
        return examples
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the tokenizer has no chat template")
    return [
        e
        if e.answer is None
        else replace(e, prompt=chat_prompt(tokenizer, question_of(e.prompt)), separator="")
        for e in examples
    ]


def prompt_format_for(tokenizer: Any, requested: str | None = None) -> str:
    """``requested``, or by default ``chat`` where the tokenizer has a chat template, else ``plain``
    (the command line's ``--prompt-format`` default)."""
    return requested or ("chat" if has_chat_template(tokenizer) else "plain")
