"""``--forget-target reference``: stop where a model that never learned the forget facts would be.

A fixed target (10%) stops the embedded world's runs below what the never-learned world model
recalls of the same facts from its prior (21% on the default world), so unlearning overshoots
into a detectable inversion (`gradsynth audit`). With ``reference`` the target of each seed is the
recall, on that seed's forget facts and with the evaluation's own answer-only batches, of the
world model pretrained without them (`gradsynth.world.never_learned`).
"""

from __future__ import annotations

import argparse
from typing import Any

from gradsynth.unlearning.evaluate import split_metrics

REFERENCE = "reference"


def forget_target_for(
    args: argparse.Namespace, seed: int, forget_batches: list[Any], log: Any = print, reference: Any = None
) -> float | None:
    """The forget target of a run with world split ``seed``: ``--forget-target`` as given, or the
    never-learned reference's recall of ``forget_batches`` for ``reference`` (``reference``: a
    user's ``--reference-model``, else the world's never-learned model of ``seed``)."""
    target = args.forget_target
    if target != REFERENCE:
        return target
    if reference is not None:
        return float(split_metrics(reference, forget_batches)["recall"])
    from gradsynth.world.never_learned import load_never_learned_model

    reference, *_ = load_never_learned_model(args.world, seed, log=log)
    return float(split_metrics(reference, forget_batches)["recall"])
