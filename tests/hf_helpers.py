"""Test helpers for the Hugging Face integrations: a tiny Llama built locally and paired examples."""

from __future__ import annotations

import pytest
import torch

from gradsynth import SynthesizingOptimizer
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss

transformers = pytest.importorskip("transformers")

VOCAB = 64


def training_args(output_dir, **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` for tiny CPU runs: batch 2, no checkpoints, no reporting, seeded,
    logging every step; ``overrides`` win."""
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


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


def four_layer_llama(seed: int = 0) -> torch.nn.Module:
    """A 4-layer, 16-wide LlamaForCausalLM (vocabulary 40): deep enough for RMU's layers L-2..L."""
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(seed)
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


def reference_run(
    forget,
    retain,
    steps,
    accumulation,
    *,
    lr,
    max_norm,
    synthesize_per_micro_batch=False,
    base=torch.optim.AdamW,
):
    """The unlearning loop written out with SynthesizingOptimizer: GA + NLL, sago, AdamW, a linear
    schedule, clipping at ``max_norm``; ``forget[i]``/``retain[i]`` are micro-batch ``i``. ``base``: the
    optimizer class (AdamW, or SGD where float rounding must not be amplified).

    Returns the trained tiny_llama() and the pre-clip norm of each step's gradient.
    """
    model = tiny_llama()
    opt = SynthesizingOptimizer(base(model.parameters(), lr=lr), "sago", track_geometry=True)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    norms = []
    for step in range(steps):
        micro_batches = [step * accumulation + k for k in range(accumulation)]
        if synthesize_per_micro_batch:
            total = [torch.zeros_like(p) for p in model.parameters()]
            for i in micro_batches:
                opt.zero_grad()
                opt.backward_forget(gradient_ascent_loss(model, forget[i]) / accumulation)
                opt.backward_retain(nll_loss(model, retain[i]) / accumulation)
                opt.synthesize()
                for t, p in zip(total, model.parameters(), strict=True):
                    t.add_(p.grad)
            opt.zero_grad()
            for t, p in zip(total, model.parameters(), strict=True):
                p.grad = t
            step_fn = opt.optimizer.step
        else:
            opt.zero_grad()
            for i in micro_batches:
                opt.backward_forget(gradient_ascent_loss(model, forget[i]) / accumulation)
                opt.backward_retain(nll_loss(model, retain[i]) / accumulation)
            opt.synthesize()
            step_fn = opt.step
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        step_fn()
        sched.step()
    return model, norms


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and Accelerator share accelerate's process-wide state: start and leave each test clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
