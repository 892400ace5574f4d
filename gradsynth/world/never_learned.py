"""The embedded world's audit material: a model that never learned the forget facts, and non-members.

- **The never-learned reference** of a world size and split seed: the world model's recipe
  (`gradsynth.world.pretrain`: same initialisation, schedule, steps and batch order seed) on
  every pretraining fact but that seed's forget facts, with the world model's own tokenizer (the
  same vocabulary, so that its scores compare token for token). Trained on first use and cached
  next to the world model (``reference-<size>-<key>-split<seed>`` in ``$GRADSYNTH_CACHE``); the
  key covers the world, so a changed world trains a new one.
- **Non-members**: a twin of each forget fact about a person the world does not have (a fresh
  name of the world's own shape), with the same question template and the same answer, so that
  only the association of name and answer tells a member from a non-member.
- **Perturbations** for the truth ratio: the other values of each relation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from gradsynth.unlearning.audit import AuditFact
from gradsynth.unlearning.encoding import prompt_of
from gradsynth.world.cache import (
    WORLD_SEED,
    _load_entry,
    _save_entry,
    cache_dir,
    cache_key,
    load_world_model,
    world_examples,
)
from gradsynth.world.cache_files import CacheDamaged
from gradsynth.world.facts import RELATIONS, Fact, World, _names, build_world
from gradsynth.world.model import build_model
from gradsynth.world.pretrain import pretrain
from gradsynth.world.sizes import SIZES
from gradsynth.world.splits import Splits, split_world


def relation_values() -> dict[str, list[str]]:
    """Every relation's values: the perturbed answers of its facts."""
    return {relation: sorted(set(pool)) for relation, _, _, pool in RELATIONS}


def _world_and_splits(size_name: str, split_seed: int) -> tuple[World, Splits]:
    size = SIZES[size_name]
    world = build_world(size, WORLD_SEED)
    return world, split_world(world, size, split_seed)


def _facts(found: list[Fact]) -> list[AuditFact]:
    return [AuditFact(f.question, f.answer, f.relation) for f in found]


def forget_facts(size_name: str, split_seed: int) -> list[AuditFact]:
    """The forget facts of a world size and split seed, grouped by relation."""
    return _facts(_world_and_splits(size_name, split_seed)[1].forget)


def retain_facts(size_name: str, split_seed: int) -> list[AuditFact]:
    """The retain facts of a world size and split seed, grouped by relation."""
    return _facts(_world_and_splits(size_name, split_seed)[1].retain)


def non_member_twins(size_name: str, split_seed: int) -> list[AuditFact]:
    """A twin of each forget fact about a person the world does not know (same template and answer)."""
    world, splits = _world_and_splits(size_name, split_seed)
    known = set(world.names) | {f.subject for f in (*world.reading, *world.reading_heldout)}
    subjects = sorted({f.subject for f in splits.forget})
    fresh = dict(
        zip(subjects, _names(random.Random(f"twins-{split_seed}"), len(subjects), known), strict=True)
    )
    templates = {relation: template for relation, template, _, _ in RELATIONS}
    return [
        AuditFact(templates[f.relation].format(fresh[f.subject]), f.answer, f.relation) for f in splits.forget
    ]


def load_never_learned_model(
    size_name: str, split_seed: int, log: Callable[[str], None] = print
) -> tuple[Any, Any, dict[str, Any]]:
    """The world model of ``size_name`` pretrained without split ``split_seed``'s forget facts."""
    if size_name not in SIZES:
        raise ValueError(f"unknown world size {size_name!r}; choose one of {', '.join(SIZES)}")
    size = SIZES[size_name]
    _, tokenizer, world, _ = load_world_model(size_name, log=log)
    folder = cache_dir() / f"reference-{size_name}-{cache_key(size_name, world)}-split{split_seed}"
    if folder.exists():
        try:
            model, tokenizer, info = _load_entry(folder)
            return model, tokenizer, {**info, "cached": True, "path": str(folder)}
        except CacheDamaged as err:
            log(f"The cached never-learned model in {folder} is damaged ({err}); training it again")
    forget = {prompt_of(f.question) for f in split_world(world, size, split_seed).forget}
    examples = [e for e in world_examples(world) if e.prompt not in forget]
    log(
        f"Training the '{size_name}' world model without split {split_seed}'s {len(forget)} forget facts "
        f"once ({len(examples)} facts); it is cached in {folder.parent}"
    )
    start = time.perf_counter()
    model = build_model(size, tokenizer, WORLD_SEED)
    result = pretrain(model, tokenizer, examples, size, WORLD_SEED)
    info = {
        **result,
        "seconds": round(time.perf_counter() - start, 1),
        "without_forget_of_split": split_seed,
        "excluded_facts": len(forget),
    }
    try:
        _save_entry(folder, model, tokenizer, info)
    except OSError as err:
        log(
            f"Warning: could not cache the never-learned model in {folder.parent} ({err}); using it in memory"
        )
    return model, tokenizer, {**info, "cached": False, "path": str(folder)}
