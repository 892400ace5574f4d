"""Test helpers for the Hugging Face integrations: a tiny Llama built locally and paired examples."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide LlamaForCausalLM from a config (no download), same weights for a given seed."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def paired_examples(n: int, length: int = 8, seed: int = 1) -> list[dict]:
    """``n`` examples ``{"forget": {...}, "retain": {...}}`` of random token sequences, labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        forget, retain = (torch.randint(0, VOCAB, (length,), generator=g) for _ in range(2))
        examples.append(
            {
                "forget": {"input_ids": forget, "labels": forget.clone()},
                "retain": {"input_ids": retain, "labels": retain.clone()},
            }
        )
    return examples


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and Accelerator share accelerate's process-wide state: start and leave each test clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
