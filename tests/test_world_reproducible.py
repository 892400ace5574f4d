"""The world model's training is reproducible where torch's CPU kernels make that possible.

What is promised, and checked here (docs/reproducing.md, "What is reproducible"):

- **bit for bit on the same processor kind and thread count**: two pretraining runs with the
  same ``torch.set_num_threads`` give weights with the same SHA-256;
- **within float32 rounding across thread counts**: 1 and 2 threads give weights that differ by
  a relative norm of ~5e-7 after a short run (measured on an Intel AVX-512 host; on the AMD AVX2
  host the two were bit-identical, which torch does not promise: a parallel reduction may split
  its sums differently);
- **the cached CI model's fingerprint**: its greedy recall on every split, as counts of facts
  recalled, equals the documented numbers (docs/reproducing.md). Counts of facts are what a reader
  compares, and the memorised facts sit far from the decision boundary, so they survive a change
  of rounding (another thread count, AVX2 against AVX-512) where a weight hash would not.

Across processor kinds nothing is promised bit for bit; the shipped model is how every machine
starts from the same weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gradsynth.world import SIZES, build_world, split_world
from gradsynth.world.cache import world_examples
from gradsynth.world.model import build_model
from gradsynth.world.pretrain import recall_counts
from gradsynth.world.tokenizer import train_tokenizer

# Facts recalled per split (split seed 0) by the cached CI world model: documented in
# docs/reproducing.md ("The embedded world"). A changed world or schedule must update both.
CI_FINGERPRINT = {
    "forget": (6, 6),
    "retain": (39, 39),
    "sibling": (3, 3),
    "neighbour": (16, 16),
    "general": (21, 32),
    "additions": (12, 12),
}


def _short_pretraining(threads: int) -> torch.Tensor:
    from gradsynth.world.pretrain import pretrain

    size = replace(SIZES["ci"], pretrain_steps=6, warmup_steps=2)
    world = build_world(size, 0)
    examples = world_examples(world)[:96]
    tokenizer = train_tokenizer([f"{e.prompt} {e.answer}" for e in examples], size.vocab_size)
    torch.set_num_threads(threads)
    model = build_model(size, tokenizer, 0)
    info = pretrain(model, tokenizer, examples, size, 0)
    assert info["steps"] == size.pretrain_steps  # a fixed schedule, whatever the recall
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("threads", [1, 2])
def test_pretraining_is_bit_identical_on_the_same_processor_and_thread_count(threads):
    assert _digest(_short_pretraining(threads)) == _digest(_short_pretraining(threads))


def test_pretraining_with_one_and_two_threads_agrees_within_float32_rounding():
    one, two = _short_pretraining(1), _short_pretraining(2)
    # Six Adam steps from one initialisation: rounding differences of ~1e-7 per operation grow to
    # a relative norm of ~5e-7 (AVX-512 host). A real difference moves them far more: the same
    # six steps with the examples in reverse order, or another shuffling seed, gave ~9e-2.
    relative = float((one - two).norm() / one.norm())
    assert relative < 1e-4, relative
    assert float((one - two).abs().max()) < 1e-3


def test_the_cached_ci_world_model_has_the_documented_fingerprint(ci_world_master):
    from gradsynth.world.cache import _load_entry

    model, tokenizer, info = _load_entry(Path(ci_world_master))
    assert info["steps"] == SIZES["ci"].pretrain_steps
    counts = recall_counts(model, tokenizer, split_world(build_world(SIZES["ci"], 0), SIZES["ci"], 0))
    assert counts == CI_FINGERPRINT, json.dumps(counts)
