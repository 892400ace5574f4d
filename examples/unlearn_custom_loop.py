"""Unlearning in a plain PyTorch training loop: SAGO vs the naive sum (GradDiff) vs one-sided PCGrad.

What it shows
-------------
A small model first memorises a synthetic world of facts, ``(entity, relation) -> value``, with
random values fixed by the seed. Then it is asked to forget every fact about a few target
entities with gradient ascent (forget loss ``-CE`` on the forget facts) while a retain loss
(``CE`` on facts about most other entities) holds on to the rest. The facts of a held-out set
of "neighbour" entities take no part in unlearning: they measure collateral damage.

The same pretrained model, learning rate, step count and batches are used for each rule; only
the rule that synthesizes the update from the two task gradients changes:

* ``sum``    -- ``g = f + r``, the naive GradDiff baseline;
* ``pcgrad`` -- project the forget gradient off the retain gradient per tensor when they conflict;
* ``sago``   -- coordinate-wise: where the signs of ``f`` and ``r`` conflict take ``r``, else ``f``.

For each rule it prints forget accuracy (lower is better), retain and neighbour accuracy
(higher is better), the step at which forget accuracy first fell to the threshold, and the
mean gradient geometry over the steps (``cos(f, r)``, ``cos(g, r)``, ``cos(g, f)`` from
``SynthesizingOptimizer.geometry``), then the accuracies at that first-forgetting step (what an
early stop would have kept). Nothing is hard-coded: the closing verdict is computed from the
numbers of the run, and says so when SAGO does not win.

What to expect with the defaults (seeds 0-2 checked, torch 2.13 CPU): after the fixed step budget
every rule has forgotten (forget accuracy 0-2%), the sum baseline has wrecked the model (retain
7-31%), PCGrad is in between and SAGO keeps retain above 90% and neighbours at 59-76%. At the
step where each rule first forgets, though, all of them have lost little, and SAGO, which
forgets about 2-3x more slowly, is not ahead on neighbours: in this toy SAGO's gain is
robustness to over-unlearning (gradient ascent's ``-CE`` is unbounded and keeps pushing after
the facts are gone).

Everything is CPU-only, single-threaded and deterministic for a given ``--seed``.

Run::

    python examples/unlearn_custom_loop.py            # full run, well under a minute
    python examples/unlearn_custom_loop.py --quick    # a tiny smoke-test variant (a few seconds)
    python examples/unlearn_custom_loop.py --steps 300 --seed 1 --rules sum,pcgrad,sago,sago_prefer_retain
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsynth import SynthesizingOptimizer, available_rules


@dataclass(frozen=True)
class Config:
    """Size of the world and the model, and the hyper-parameters of both phases."""

    n_entities: int = 200
    n_relations: int = 8
    n_values: int = 32
    dim: int = 32
    hidden: int = 256
    n_forget: int = 8  # entities whose facts are all forgotten
    n_neighbour: int = 40  # held-out entities, used only to measure collateral damage
    pretrain_steps: int = 400
    pretrain_lr: float = 1e-2
    # Label smoothing while memorising keeps the model from being infinitely sure of each fact;
    # without it gradient ascent barely moves facts whose probability has saturated at 1.
    label_smoothing: float = 0.1
    lr: float = 3e-4
    steps: int = 200
    retain_batch: int = 128
    forget_threshold: float = 0.05  # "forgotten" = forget accuracy at or below this


FULL = Config()
QUICK = Config(n_entities=60, hidden=128, n_forget=4, n_neighbour=12, pretrain_steps=150, lr=1e-3, steps=60)


@dataclass(frozen=True)
class World:
    """All facts, as parallel tensors, and the index sets of the three splits."""

    entity: Tensor
    relation: Tensor
    value: Tensor
    forget: Tensor
    retain: Tensor
    neighbour: Tensor


@dataclass(frozen=True)
class Accuracy:
    """Accuracy on each split."""

    forget: float
    retain: float
    neighbour: float


@dataclass(frozen=True)
class RunResult:
    """Outcome of one unlearning run."""

    rule: str
    final: Accuracy
    forgot_step: int | None  # first step with forget accuracy <= threshold
    at_forgot: Accuracy | None  # accuracies at that step
    cos_fr: float
    cos_gr: float
    cos_gf: float
    conflict_fraction: float
    seconds: float


class FactModel(nn.Module):
    """Embeds the entity and the relation, concatenates them and maps them to a value with an MLP."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.entity = nn.Embedding(cfg.n_entities, cfg.dim)
        self.relation = nn.Embedding(cfg.n_relations, cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * cfg.dim, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.n_values),
        )

    def forward(self, entity: Tensor, relation: Tensor) -> Tensor:
        return self.mlp(torch.cat([self.entity(entity), self.relation(relation)], dim=-1))


def build_world(cfg: Config, generator: torch.Generator) -> World:
    """Random facts and a random split of the entities into forget / neighbour / retain."""
    values = torch.randint(cfg.n_values, (cfg.n_entities, cfg.n_relations), generator=generator)
    entity = torch.arange(cfg.n_entities).repeat_interleave(cfg.n_relations)
    relation = torch.arange(cfg.n_relations).repeat(cfg.n_entities)
    order = torch.randperm(cfg.n_entities, generator=generator)
    forget_entities = order[: cfg.n_forget]
    neighbour_entities = order[cfg.n_forget : cfg.n_forget + cfg.n_neighbour]
    retain_entities = order[cfg.n_forget + cfg.n_neighbour :]

    def facts_of(entities: Tensor) -> Tensor:
        return torch.isin(entity, entities).nonzero().squeeze(1)

    return World(
        entity=entity,
        relation=relation,
        value=values.reshape(-1),
        forget=facts_of(forget_entities),
        retain=facts_of(retain_entities),
        neighbour=facts_of(neighbour_entities),
    )


def nll(model: nn.Module, world: World, facts: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of the model on the given facts."""
    logits = model(world.entity[facts], world.relation[facts])
    return F.cross_entropy(logits, world.value[facts], label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, world: World) -> Accuracy:
    """Greedy accuracy on the forget, retain and neighbour facts."""
    correct = (model(world.entity, world.relation).argmax(dim=-1) == world.value).float()
    return Accuracy(
        forget=correct[world.forget].mean().item(),
        retain=correct[world.retain].mean().item(),
        neighbour=correct[world.neighbour].mean().item(),
    )


def pretrain(cfg: Config, world: World) -> FactModel:
    """Memorise every fact (forget, retain and neighbour alike) with full-batch AdamW."""
    model = FactModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    every_fact = torch.arange(len(world.value))
    for _ in range(cfg.pretrain_steps):
        optimizer.zero_grad()
        nll(model, world, every_fact, cfg.label_smoothing).backward()
        optimizer.step()
    return model


def mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def unlearn(pretrained: FactModel, world: World, cfg: Config, rule: str, seed: int) -> RunResult:
    """Run gradient-ascent unlearning with one synthesis rule on a copy of the pretrained model."""
    start = time.perf_counter()
    model = copy.deepcopy(pretrained)
    optimizer = SynthesizingOptimizer(
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
        rule=rule,
        alpha=1.0,
        gamma=1.0,
        track_geometry=True,
    )
    batches = torch.Generator().manual_seed(seed + 1)  # the same retain batches for every rule
    cos_fr: list[float] = []
    cos_gr: list[float] = []
    cos_gf: list[float] = []
    conflict: list[float] = []
    forgot_step: int | None = None
    at_forgot: Accuracy | None = None
    for step in range(1, cfg.steps + 1):
        retain_batch = world.retain[torch.randint(len(world.retain), (cfg.retain_batch,), generator=batches)]
        optimizer.zero_grad()
        optimizer.backward_forget(-nll(model, world, world.forget))  # gradient ascent on the forget facts
        optimizer.backward_retain(nll(model, world, retain_batch))
        optimizer.step()
        geometry = optimizer.geometry
        if geometry is not None:
            cos_fr.append(geometry.cos_fr)
            cos_gr.append(geometry.cos_gr)
            cos_gf.append(geometry.cos_gf)
            conflict.append(geometry.conflict_fraction)
        if forgot_step is None:
            accuracy = evaluate(model, world)
            if accuracy.forget <= cfg.forget_threshold:
                forgot_step, at_forgot = step, accuracy
    return RunResult(
        rule=rule,
        final=evaluate(model, world),
        forgot_step=forgot_step,
        at_forgot=at_forgot,
        cos_fr=mean(cos_fr),
        cos_gr=mean(cos_gr),
        cos_gf=mean(cos_gf),
        conflict_fraction=mean(conflict),
        seconds=time.perf_counter() - start,
    )


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def print_table(results: list[RunResult], cfg: Config) -> None:
    threshold = f"<={100 * cfg.forget_threshold:g}%"
    header = (
        f"{'rule':<20} {'forget':>7} {'retain':>7} {'neighb':>7} | {'cos(f,r)':>8} {'cos(g,r)':>8} "
        f"{'cos(g,f)':>8} {'conflict':>8} | {'forget ' + threshold + ' at step':>21} {'retain':>7} "
        f"{'neighb':>7}"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        if res.forgot_step is None or res.at_forgot is None:
            forgot = f"{'never':>21} {'-':>7} {'-':>7}"
        else:
            forgot = (
                f"{res.forgot_step:>21d} {pct(res.at_forgot.retain):>7} {pct(res.at_forgot.neighbour):>7}"
            )
        print(
            f"{res.rule:<20} {pct(res.final.forget):>7} {pct(res.final.retain):>7} "
            f"{pct(res.final.neighbour):>7} | {res.cos_fr:>8.3f} {res.cos_gr:>8.3f} {res.cos_gf:>8.3f} "
            f"{pct(res.conflict_fraction):>8} | {forgot}"
        )


def print_verdict(results: list[RunResult], cfg: Config) -> None:
    """Compare SAGO with the sum baseline from the measured numbers; says so when SAGO does not win."""
    by_rule = {res.rule: res for res in results}
    if "sum" not in by_rule or "sago" not in by_rule:
        print("Verdict: run both 'sum' and 'sago' for a comparison.")
        return
    base, sago = by_rule["sum"].final, by_rule["sago"].final
    comparable = abs(sago.forget - base.forget) <= 2 * cfg.forget_threshold
    forgetting = f"forget accuracy {pct(sago.forget).strip()} (SAGO) vs {pct(base.forget).strip()} (sum)" + (
        "" if comparable else " -- NOT comparable forgetting, so this is no fair comparison"
    )
    d_retain = 100 * (sago.retain - base.retain)
    d_neighbour = 100 * (sago.neighbour - base.neighbour)
    if d_retain > 0 and d_neighbour > 0:
        print(
            f"Verdict: after {cfg.steps} steps SAGO kept retain accuracy {d_retain:+.1f} pts and neighbour "
            f"accuracy {d_neighbour:+.1f} pts above the sum baseline, at {forgetting}."
        )
    else:
        print(
            f"Verdict: SAGO did NOT beat the sum baseline in this run (retain {d_retain:+.1f} pts, "
            f"neighbour {d_neighbour:+.1f} pts vs sum), at {forgetting}."
        )
    early_base, early_sago = by_rule["sum"], by_rule["sago"]
    if early_base.at_forgot is None or early_sago.at_forgot is None:
        return
    a_base, a_sago = early_base.at_forgot, early_sago.at_forgot
    threshold = f"{100 * cfg.forget_threshold:g}%"
    print(
        f"Early stop instead (right-hand columns): sum first reached forget accuracy <= {threshold} at "
        f"step {early_base.forgot_step} (retain {pct(a_base.retain).strip()}, neighbour "
        f"{pct(a_base.neighbour).strip()}), SAGO at step {early_sago.forgot_step} (retain "
        f"{pct(a_sago.retain).strip()}, neighbour {pct(a_sago.neighbour).strip()})."
    )
    e_retain = 100 * (a_sago.retain - a_base.retain)
    e_neighbour = 100 * (a_sago.neighbour - a_base.neighbour)
    if e_retain >= 0 and e_neighbour >= 0:
        print(
            f"So SAGO is ahead at that point too (retain {e_retain:+.1f} pts, "
            f"neighbour {e_neighbour:+.1f} pts)."
        )
        return
    print(
        f"So stopped at the moment of forgetting, SAGO is NOT ahead on both (retain {e_retain:+.1f} pts, "
        f"neighbour {e_neighbour:+.1f} pts vs sum) and needed {early_sago.forgot_step} steps instead of "
        f"{early_base.forgot_step}."
    )
    if d_retain > 0 and d_neighbour > 0:
        print(
            "Its advantage in this run is robustness to a fixed step budget: gradient ascent's -CE is "
            "unbounded, so the sum baseline keeps damaging the model after the facts are gone, while SAGO "
            "never moves a coordinate against the retain gradient, which slows that drift."
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="unlearning steps per rule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the model and the batches")
    parser.add_argument("--quick", action="store_true", help="tiny world and few steps (a smoke test)")
    parser.add_argument(
        "--rules",
        default="sum,pcgrad,sago",
        help=f"comma-separated rules to compare, from: {', '.join(available_rules())}",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be at least 1")
        cfg = replace(cfg, steps=args.steps)
    rules = [rule.strip() for rule in args.rules.split(",") if rule.strip()]
    unknown = sorted(set(rules) - set(available_rules()))
    if unknown:
        raise SystemExit(f"unknown rule(s) {unknown}; choose from {available_rules()}")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    world = build_world(cfg, torch.Generator().manual_seed(args.seed))
    print(
        f"World: {cfg.n_entities} entities x {cfg.n_relations} relations -> {cfg.n_values} values; "
        f"forget {len(world.forget)} facts ({cfg.n_forget} entities), retain {len(world.retain)}, "
        f"neighbour {len(world.neighbour)} (held out)."
    )
    pretrained = pretrain(cfg, world)
    before = evaluate(pretrained, world)
    print(
        f"Pretrained in {time.perf_counter() - start:.1f}s: forget {pct(before.forget)}, retain "
        f"{pct(before.retain)}, neighbour {pct(before.neighbour)}."
    )
    print(
        f"Unlearning: AdamW lr={cfg.lr:g}, {cfg.steps} steps, forget batch = all forget facts, "
        f"retain batch = {cfg.retain_batch}, alpha = gamma = 1.\n"
    )
    results = []
    for rule in rules:
        res = unlearn(pretrained, world, cfg, rule, args.seed)
        print(
            f"  {rule:<20} forget {pct(res.final.forget)}  retain {pct(res.final.retain)}  neighbour "
            f"{pct(res.final.neighbour)}  ({res.seconds:.1f}s)"
        )
        results.append(res)
    print(f"\nAfter {cfg.steps} steps (accuracies; cosines and conflict fraction are means over steps):\n")
    print_table(results, cfg)
    print()
    print_verdict(results, cfg)
    print(f"\nTotal time {time.perf_counter() - start:.1f}s.")


if __name__ == "__main__":
    main()
