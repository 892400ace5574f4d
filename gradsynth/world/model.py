"""The tiny ``LlamaForCausalLM`` of the embedded world, built from a ``transformers`` config."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gradsynth.world.sizes import WorldSize


def build_model(size: WorldSize, tokenizer: Any, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of the given size (tied embeddings, full multi-head attention)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
