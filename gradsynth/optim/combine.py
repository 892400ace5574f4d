"""The synthesis of a set of parameters: ``g = rule.combine(f, r; alpha, gamma)``, with geometry if tracked.

`synthesize` is the one synthesis loop: it walks the param groups with their settings, asks the
caller for each parameter's two task gradients, combines them with `combine_all` and settles the
geometry (one collective for sharded sums). The optimizer shell runs it on its stashes; engine
integrations (DeepSpeed) on the gradients they read out of the engine. `combine_all` groups the
tensors by rule (so that a rule's scope, e.g. ``pcgrad_global``'s, spans param groups), lets each
rule `prepare` its scope-wide quantities, and combines tensor by tensor. Sharded tensors
(DTensors) make every scope-wide sum global, as the rules do for FSDP2.

An update is written over the retain gradient (no allocation). With geometry, a built-in rule
(``Rule.measures_geometry``) takes the sums in the same pass, chunk by chunk before each chunk of
``g`` is written (`gradsynth.rules.geometry_sums`): no extra gradient set. A custom rule's ``g``
goes into a new tensor, measured against ``f`` and ``r`` after (so a custom rule that raises
leaves the task gradients intact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.rules import kernels
from gradsynth.rules.base import Rule

#: One tensor's share of a synthesis: ``(rule, alpha, gamma, forget, retain)``; ``None`` for a
#: task that did not reach the tensor (it counts as zero), never both.
Entry = tuple[Rule, float, float, Tensor | None, Tensor | None]
#: A param group's ``(rule, alpha, gamma)`` and the parameters it covers.
Group = tuple[tuple[Rule, float, float], Iterable[Tensor]]
#: A parameter's ``(forget, retain)`` gradients, ``None`` for a task that did not reach it.
Gradients = Callable[[Tensor], tuple[Tensor | None, Tensor | None]]


@dataclass
class Synthesis:
    """What `synthesize` produced: each reached parameter's update, in order, and the geometry."""

    params: list[Tensor]
    updates: list[Tensor]
    geometry: GeometryAccumulator | None


def synthesize(
    groups: Iterable[Group],
    gradients: Gradients,
    geometry: GeometryAccumulator | None = None,
    *,
    written: list[int] | None = None,
) -> Synthesis:
    """Synthesize every parameter that a task reached: the loop the shell and the engines share.

    ``gradients(p)`` gives ``(forget, retain)`` of a parameter (it may take them out of the
    caller's storage, or leave them there); parameters neither task reached are skipped. The
    geometry (if given, possibly holding sums already, as streaming leaves it) is reduced once at
    the end: a collective for sharded tensors, so every rank calls this. ``written`` is as in
    `combine_all`.
    """
    params: list[Tensor] = []
    entries: list[Entry] = []
    for (rule, alpha, gamma), group_params in groups:
        for p in group_params:
            forget, retain = gradients(p)
            if forget is None and retain is None:
                continue
            params.append(p)
            entries.append((rule, alpha, gamma, forget, retain))
    updates = combine_all(entries, geometry, written=written)
    if geometry is not None:
        geometry.reduce()
    return Synthesis(params, updates, geometry)


def combine_one(
    rule: Rule,
    forget: Tensor,
    retain: Tensor,
    *,
    alpha: float,
    gamma: float,
    context: Any = None,
    geometry: GeometryAccumulator | None = None,
) -> Tensor:
    """Return one parameter's synthesized gradient: in ``retain``'s buffer (new for a custom rule
    with geometry)."""
    if geometry is None:
        rule.combine(forget, retain, alpha=alpha, gamma=gamma, out=retain, context=context)
        return retain
    if rule.measures_geometry:
        rule.combine(  # type: ignore[call-arg]
            forget, retain, alpha=alpha, gamma=gamma, out=retain, context=context, geometry=geometry
        )
        return retain
    update = torch.empty_like(retain)
    rule.combine(forget, retain, alpha=alpha, gamma=gamma, out=update, context=context)
    geometry.add(forget, retain, update)
    return update


def combine_all(
    entries: Sequence[Entry], geometry: GeometryAccumulator | None = None, *, written: list[int] | None = None
) -> list[Tensor]:
    """The synthesized gradient of every entry, in order (each rule prepared once over its scope).

    The retain tensors may be overwritten (see `combine_one`); ``written`` (if given) receives
    the index of each entry whose retain tensor now holds its update, so that a caller can tell,
    when a rule raises part way, whether any task gradient was lost. Sharded sums are settled by
    the rules; geometry is left unreduced (call ``geometry.reduce()`` once after).
    """
    # The step's size chooses between the fused kernels and the eager rules (`kernels.for_step`).
    size = sum(next(t for t in entry[3:] if t is not None).numel() for entry in entries)
    with kernels.for_step(size):
        return _combine_all(entries, geometry, written)


def _combine_all(
    entries: Sequence[Entry], geometry: GeometryAccumulator | None, written: list[int] | None
) -> list[Tensor]:
    updates: list[Tensor | None] = [None] * len(entries)
    by_rule: dict[int, tuple[Rule, list[int]]] = {}
    for index, entry in enumerate(entries):
        by_rule.setdefault(id(entry[0]), (entry[0], []))[1].append(index)
    for rule, indices in by_rule.values():
        pairs = []
        for index in indices:
            _, _, _, forget, retain = entries[index]
            pairs.append(
                (
                    torch.zeros_like(retain) if forget is None else forget,
                    torch.zeros_like(forget) if retain is None else retain,
                )
            )
        context = rule.prepare(
            [f for f, _ in pairs],
            [r for _, r in pairs],
            alpha=[entries[i][1] for i in indices],
            gamma=[entries[i][2] for i in indices],
        )
        for index, (forget, retain) in zip(indices, pairs, strict=True):
            _, alpha, gamma, _, _ = entries[index]
            updates[index] = combine_one(
                rule, forget, retain, alpha=alpha, gamma=gamma, context=context, geometry=geometry
            )
            if written is not None and updates[index] is entries[index][4]:
                written.append(index)
    return updates  # type: ignore[return-value]
