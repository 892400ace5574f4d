"""The small world the Hugging Face examples unlearn from: a tiny Llama that memorised random facts.

A "fact" is a fixed random token sequence; the model learns to continue each one exactly
(next-token prediction). Accuracy is teacher-forced next-token accuracy over a fact's tokens
after the first. Everything is built locally from a config: no download, CPU, deterministic.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_facts(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """``n`` random token sequences of ``length`` tokens, shape ``(n, length)``."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def memorise(model: LlamaForCausalLM, facts: torch.Tensor, steps: int, lr: float) -> None:
    """Full-batch AdamW with a cosine schedule until the model knows the facts."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=facts, labels=facts).loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, facts: torch.Tensor) -> float:
    """Teacher-forced next-token accuracy over each fact's tokens after the first."""
    model.eval()
    predicted = model(input_ids=facts).logits[:, :-1].argmax(-1)
    return (predicted == facts[:, 1:]).float().mean().item()


def paired_examples(forget: torch.Tensor, retain: torch.Tensor, n: int) -> list[dict]:
    """``n`` examples ``{"forget": ..., "retain": ...}``, cycling through both fact sets."""
    return [
        {
            "forget": {"input_ids": forget[i % len(forget)], "labels": forget[i % len(forget)]},
            "retain": {"input_ids": retain[i % len(retain)], "labels": retain[i % len(retain)]},
        }
        for i in range(n)
    ]
