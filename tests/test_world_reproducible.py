"""The world model is the same on every run and thread count: a fixed schedule, bit-identical weights.

Two checks, chosen for what can really be kept stable:

- **weights, bit for bit, across thread counts**: a short pretraining run with
  ``torch.set_num_threads(1)`` and with 2 threads gives weights with the same SHA-256. (Across CPU
  kinds, AVX2 against AVX-512, the float kernels round differently, so no weight hash can be
  promised there.)
- **the cached CI model's fingerprint**: its greedy recall on every split, as counts of facts
  recalled, equals the documented numbers (docs/reproducing.md). Counts of facts are what a reader
  compares, and the memorised facts sit far from the decision boundary, so they survive a change
  of rounding where a weight hash would not.
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


def _weights_digest(model: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def test_pretraining_gives_bit_identical_weights_with_one_and_two_threads():
    from gradsynth.world.pretrain import pretrain

    size = replace(SIZES["ci"], pretrain_steps=6, warmup_steps=2)
    world = build_world(size, 0)
    examples = world_examples(world)[:96]
    tokenizer = train_tokenizer([f"{e.prompt} {e.answer}" for e in examples], size.vocab_size)
    digests = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        model = build_model(size, tokenizer, 0)
        info = pretrain(model, tokenizer, examples, size, 0)
        assert info["steps"] == size.pretrain_steps  # a fixed schedule, whatever the recall
        digests.append(_weights_digest(model))
    assert digests[0] == digests[1]


def test_the_cached_ci_world_model_has_the_documented_fingerprint(ci_world_master):
    from gradsynth.world.cache import _load_entry

    model, tokenizer, info = _load_entry(Path(ci_world_master))
    assert info["steps"] == SIZES["ci"].pretrain_steps
    counts = recall_counts(model, tokenizer, split_world(build_world(SIZES["ci"], 0), SIZES["ci"], 0))
    assert counts == CI_FINGERPRINT, json.dumps(counts)
