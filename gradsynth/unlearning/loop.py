"""The unlearning loop: one forget and one retain backward per micro-batch, one synthesized step.

Each optimizer step draws ``grad_accum`` forget batches and as many retain batches (each of
``batch_size`` examples, cycling through a seeded shuffle of each set), sends each loss to its
task (scaled by ``1/grad_accum`` so accumulated gradients are means) and lets
`gradsynth.optim.SynthesizingOptimizer` synthesize the update with the chosen rule. The base
optimizer is AdamW without weight decay, as in the paper's runs.

Reference models (NPO, KL) cost no copy where they need none: NPO's reference log-likelihoods of
the forget examples are computed once before the first step (`ReferenceLogprobs`, with the
model itself unless a ``reference`` is given) and looked up per batch; a PEFT model's KL
reference is the model with its adapters disabled (`AdaptersDisabled`). Only the KL retain loss
of a model without adapters still needs ``reference=`` (a frozen copy, or a sharded one under
FSDP2).

RMU (``losses.forget == "rmu"``) trains only its chosen MLP weights: the optimizer and the
synthesis see those alone, and every other parameter is frozen for the run (restored after).

With ``forget_target`` the run stops after the first step at which the forget set's greedy
recall (exact match, one teacher-forced pass over the forget examples only, no generation; or
the caller's ``recall_of``) is at most the target; ``steps`` is then the cap. Each record carries that recall.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradsynth.optim import SynthesizingOptimizer
from gradsynth.unlearning.checkpoint import Checkpointing, LoopState, check_weights
from gradsynth.unlearning.encoding import IGNORE_INDEX, collate
from gradsynth.unlearning.evaluate import split_metrics
from gradsynth.unlearning.reference import AdaptersDisabled, ReferenceLogprobs, is_peft_model
from gradsynth.unlearning.rmu import RMU, decoder_layers
from gradsynth.unlearning.sharding import deepspeed_steps, non_finite_parameter, sharded_reference
from gradsynth.unlearning.sharding import wrap as sharding_wrap
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

Encoded = tuple[list[int], list[int]]
TARGET_BATCH = 64  # forget examples per forward of the stopping check


@dataclass(frozen=True)
class UnlearnSettings:
    """Everything that defines an unlearning run besides the model and the data."""

    rule: str = "sago"
    alpha: float = 1.0
    gamma: float = 1.0
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    losses: LossSettings = field(default_factory=LossSettings)
    forget_target: float | None = None  # stop at forget recall <= this; `steps` is then the cap

    def __post_init__(self) -> None:
        if self.forget_target is not None and not 0 <= self.forget_target < 1:
            raise ValueError(f"forget_target must be in [0, 1); got {self.forget_target}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepRecord:
    """Losses and gradient geometry of one optimizer step."""

    step: int
    forget_loss: float
    retain_loss: float
    cos_fr: float | None
    cos_gr: float | None
    cos_gf: float | None
    conflict_fraction: float | None
    forget_recall: float | None = None  # measured only with a forget target


class _Cycle:
    """Endless batches from a seeded shuffle of a fixed list, reshuffled at each pass."""

    def __init__(self, items: list[Encoded], seed: str) -> None:
        self._items = items
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def take(self, n: int) -> list[Encoded]:
        while len(self._order) < n:
            self._order += self._rng.sample(range(len(self._items)), len(self._items))
        chosen, self._order = self._order[:n], self._order[n:]
        return [self._items[i] for i in chosen]

    def state(self) -> dict[str, Any]:
        """Where the cycle is: its generator's state and the rest of the current shuffle (JSON-able)."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order)}

    def restore(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])


class Diverged(ArithmeticError):
    """The run produced a non-finite loss or weight; the model it leaves must not be used."""


def _check_finite_loss(step: int, forget: float, retain: float) -> None:
    for name, value in (("forget", forget), ("retain", retain)):
        if not math.isfinite(value):
            raise Diverged(
                f"the {name} loss is {value} at step {step}: the run diverged; lower --lr, check "
                "--beta/--delta, or use --dtype float32 or bfloat16"
            )


def _check_finite_weights(model: Any) -> None:
    bad = non_finite_parameter(model)
    if bad is not None:
        raise Diverged(
            f"parameter {bad} holds NaN or infinite values after the run: it diverged; lower --lr "
            "or use --dtype float32 or bfloat16"
        )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def steps_for_epochs(epochs: float, n_forget: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that pass over the forget set ``epochs`` times."""
    return max(1, math.ceil(epochs * n_forget / (batch_size * grad_accum)))


def unlearn(
    model: Any,
    forget: list[Encoded],
    retain: list[Encoded],
    pad_id: int,
    settings: UnlearnSettings,
    reference: Any = None,
    on_step: Callable[[StepRecord], None] | None = None,
    *,
    precompute_reference: bool = True,
    recall_batches: list[dict[str, Tensor]] | None = None,
    recall_of: Callable[[Any], float] | None = None,
    checkpoint: Checkpointing | None = None,
    shard: tuple[int, int] | None = None,
    sharding: str = "ddp",
    zero: dict[str, Any] | None = None,
) -> list[StepRecord]:
    """Unlearn ``forget`` while retaining ``retain``, in place; returns one record per step.

    ``reference``: the frozen model from before unlearning, or a `ReferenceLogprobs` (NPO). Needed
    only by the KL retain loss of a model without PEFT adapters. ``precompute_reference=False``
    runs NPO's reference forward on every batch instead (the full-copy path; needs ``reference``).
    ``recall_batches``: what the forget target is checked on (default: ``forget`` as trained). A
    run that trains on full text must pass answer-only batches, or "recall" would ask for the
    whole sentence and fall long before the answers are forgotten. ``recall_of(model)``, if given,
    measures the forget recall instead (e.g. answer containment in greedy generations).
    ``checkpoint``: save a `LoopState` every N steps and on ``KeyboardInterrupt``, and/or continue
    from one (`gradsynth.unlearning.checkpoint`); the records returned then include the steps
    before the resumed one.
    ``shard=(rank, world)``: data parallel under an initialised ``torch.distributed`` process group.
    Every rank draws the same batches and trains on its slice ``items[rank::world]`` through
    ``DistributedDataParallel``, its loss scaled by ``world * n_rank / n`` (``n``: the batch's loss
    tokens, or examples for NPO/SimNPO), so that DDP's mean of the ranks' gradients is the
    gradient of the whole batch's loss, as one process computes it (`shard_weight`).
    ``sharding="fsdp2"``: the same, but the model is sharded in place with FSDP2
    (`gradsynth.unlearning.sharding`) and stays sharded after the run; a plain frozen ``reference``
    is sharded like it. Whatever runs the model afterwards must run on every rank.
    ``sharding="deepspeed"``: the same through a DeepSpeed engine whose ``zero_optimization`` config
    section is ``zero`` (default ``{"stage": 3}``; `gradsynth.unlearning.sharding.deepspeed_steps`);
    at ZeRO-3 the model stays partitioned after the run, as under FSDP2. A reference model stays
    whole on every rank.

    Raises `Diverged` at the first non-finite loss, or if a weight is non-finite at the end
    (a non-finite weight makes the next loss non-finite, so this covers every step); under
    DeepSpeed also at a step the engine skipped for a non-finite gradient (ZeRO-1/2/3 skip it
    where one process would apply it and end on NaN weights).
    """
    device = next(model.parameters()).device
    ref_table, ref_model = _references(model, forget, pad_id, settings, reference, precompute_reference)
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}

    def optimizer_for(params: list[torch.nn.Parameter]) -> SynthesizingOptimizer:
        base = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        return SynthesizingOptimizer(
            base, settings.rule, alpha=settings.alpha, gamma=settings.gamma, track_geometry=True
        )

    net, in_engine = model, None
    if shard is not None and sharding == "deepspeed":
        # The engine is built over the optimizer and runs the forwards: it comes before the losses.
        trained_now = [p for p in model.parameters() if p.requires_grad]  # RMU is refused under a launch
        micro = max(1, settings.batch_size // shard[1])
        zero = zero if zero is not None else {"stage": 3}
        in_engine = deepspeed_steps(model, optimizer_for(trained_now), zero, micro, settings.grad_accum)
        net = in_engine.engine
    elif shard is not None:
        net = sharding_wrap(model, sharding)
        if sharding == "fsdp2":
            ref_model = sharded_reference(model, ref_model)
    params, forget_of, retain_of = _objective(model, settings, ref_table, ref_model, net, shard is None)
    optimizer: Any = in_engine if in_engine is not None else optimizer_for(params)
    forget_cycle = _Cycle(forget, f"forget-{settings.seed}")
    retain_cycle = _Cycle(retain, f"retain-{settings.seed}")
    target_batches: list[dict[str, Tensor]] = []
    if settings.forget_target is not None:
        target_batches = recall_batches or [
            collate(forget[i : i + TARGET_BATCH], pad_id) for i in range(0, len(forget), TARGET_BATCH)
        ]
    records: list[StepRecord] = []
    cycles = {"forget": forget_cycle, "retain": retain_cycle}
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saving = checkpoint is not None
    checkpoint = checkpoint or Checkpointing(save=lambda state, interrupted: None)
    if checkpoint.start is not None:
        records = _restore(checkpoint.start, trained, optimizer, cycles)
    # The state at the last step boundary, but the weights and optimizer (read when saving).
    boundary = (len(records), {k: c.state() for k, c in cycles.items()}, torch.get_rng_state())

    def state_at_boundary() -> LoopState:
        step, cycle_states, rng = boundary
        return LoopState(
            step=step,
            weights={name: p.detach() for name, p in trained.items()},
            optimizer=optimizer.state_dict(),
            cycles=cycle_states,
            torch_rng=rng,
            records=[asdict(r) for r in records],
        )

    model.train()
    try:
        for step in range(len(records) + 1, settings.steps + 1):
            optimizer.zero_grad()
            forget_total = retain_total = 0.0
            for _ in range(settings.grad_accum):
                forget_items = forget_cycle.take(settings.batch_size)
                retain_items = retain_cycle.take(settings.batch_size)
                forget_weight = shard_weight(forget_items, shard, per_example=settings.losses.forget != "ga")
                retain_weight = shard_weight(retain_items, shard, per_example=False)
                if shard is not None:
                    forget_items = forget_items[shard[0] :: shard[1]]
                    retain_items = retain_items[shard[0] :: shard[1]]
                fb = {k: v.to(device) for k, v in collate(forget_items, pad_id).items()}
                rb = {k: v.to(device) for k, v in collate(retain_items, pad_id).items()}
                lf = forget_of(fb, forget_items) * forget_weight
                optimizer.backward_forget(lf / settings.grad_accum)
                lr_ = retain_of(rb) * retain_weight
                optimizer.backward_retain(lr_ / settings.grad_accum)
                forget_total += _whole(lf, shard) / settings.grad_accum
                retain_total += _whole(lr_, shard) / settings.grad_accum
                _check_finite_loss(step, forget_total, retain_total)
            with checkpoint.guard():  # the update and the record saying it happened: never split
                optimizer.step()
                if in_engine is not None and not in_engine.applied:
                    raise Diverged(
                        f"the synthesized gradient is not finite at step {step} (DeepSpeed skipped the "
                        "update on every rank): the run diverged; lower --lr, check --beta/--delta"
                    )
                geometry = optimizer.geometry
                record = StepRecord(
                    step=step,
                    forget_loss=forget_total,
                    retain_loss=retain_total,
                    cos_fr=_finite(geometry.cos_fr) if geometry else None,
                    cos_gr=_finite(geometry.cos_gr) if geometry else None,
                    cos_gf=_finite(geometry.cos_gf) if geometry else None,
                    conflict_fraction=_finite(geometry.conflict_fraction) if geometry else None,
                )
                if settings.forget_target is not None and recall_of is not None:
                    record.forget_recall = recall_of(model)
                    model.train()
                elif target_batches:
                    record.forget_recall = split_metrics(model, target_batches)["recall"]
                records.append(record)
                boundary = (step, {k: c.state() for k, c in cycles.items()}, torch.get_rng_state())
            if on_step is not None:
                on_step(record)
            if record.forget_recall is not None and record.forget_recall <= settings.forget_target:
                break
            if checkpoint.every and step % checkpoint.every == 0 and step < settings.steps:
                checkpoint.save(state_at_boundary(), False)
    except KeyboardInterrupt:
        if saving:
            optimizer.zero_grad()  # the interrupted step's partial task gradients are not state
            checkpoint.save(state_at_boundary(), True)
        raise
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(was_trainable[name])
    _check_finite_weights(model)
    model.eval()
    return records


def _loss_tokens(items: list[Encoded]) -> int:
    """The positions that carry a token loss: labels after the first that are not ignored."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, labels in items)


def shard_weight(items: list[Encoded], shard: tuple[int, int] | None, *, per_example: bool) -> float:
    """``world * n_rank / n``: the factor that makes DDP's mean over ranks of each rank's mean loss the
    mean over the whole batch (``n``: loss tokens, or examples when the loss is a mean over them)."""
    if shard is None:
        return 1.0
    rank, world = shard
    count = len if per_example else _loss_tokens
    total = count(items)
    return world * count(items[rank::world]) / total if total else 1.0


def _whole(loss: Tensor, shard: tuple[int, int] | None) -> float:
    """The whole batch's loss from a rank's weighted one: the sum over ranks of ``loss / world``."""
    value = loss.detach()
    if shard is None:
        return float(value)
    value = value.float() / shard[1]
    torch.distributed.all_reduce(value)
    return float(value)


def _restore(
    state: LoopState,
    trained: dict[str, torch.nn.Parameter],
    optimizer: SynthesizingOptimizer,
    cycles: dict[str, _Cycle],
) -> list[StepRecord]:
    """Load ``state`` into the run (weights, optimizer, cycles, torch's generator); its records."""
    check_weights(state, trained)
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(state.weights[name])
    optimizer.load_state_dict(state.optimizer)
    for name, cycle in cycles.items():
        cycle.restore(state.cycles[name])
    torch.set_rng_state(state.torch_rng)
    return [StepRecord(**r) for r in state.records]


def _objective(
    model: Any,
    settings: UnlearnSettings,
    ref_table: ReferenceLogprobs | None,
    ref_model: Any,
    net: Any = None,
    share_prefix: bool = False,
) -> tuple[list[torch.nn.Parameter], Callable[..., Any], Callable[..., Any]]:
    """The parameters to train, ``forget(batch, items) -> L_f`` and ``retain(batch) -> L_r``; the
    losses run ``net`` (``model`` itself, or its ``DistributedDataParallel`` wrapper), packing the
    rows behind one copy of their common start when ``share_prefix`` (see `forget_loss`; on one
    process only for now: the sharded paths are not yet tested with a chat model)."""
    net = model if net is None else net
    rmu = rmu_for(model, settings)
    if rmu is not None:
        return rmu.trained_parameters(), lambda batch, _items: rmu.forget_loss(batch), rmu.retain_loss
    device = next(model.parameters()).device

    def forget_of(batch: dict[str, Any], items: list[Encoded]) -> Any:
        ref_logprob = ref_table.lookup(items, device) if ref_table is not None else None
        return forget_loss(net, batch, settings.losses, ref_model, ref_logprob, share_prefix)

    return (
        # All of them, or a PEFT model's adapters alone (its base weights are frozen).
        [p for p in model.parameters() if p.requires_grad],
        forget_of,
        lambda batch: retain_loss(net, batch, settings.losses, ref_model, share_prefix),
    )


def rmu_for(model: Any, settings: UnlearnSettings) -> RMU | None:
    """RMU's state on ``model`` when it is the forget objective (its layer defaults to depth // 4)."""
    losses = settings.losses
    if losses.forget != "rmu":
        return None
    layer = losses.rmu_layer if losses.rmu_layer is not None else len(decoder_layers(model)) // 4
    return RMU(model, layer=layer, steering=losses.rmu_steering, seed=settings.seed)


def _references(
    model: Any,
    forget: list[Encoded],
    pad_id: int,
    settings: UnlearnSettings,
    reference: Any,
    precompute: bool,
) -> tuple[ReferenceLogprobs | None, Any]:
    """NPO's table of reference log-likelihoods (or None) and the reference model for the rest."""
    losses = settings.losses
    table = reference if isinstance(reference, ReferenceLogprobs) else None
    ref_model = None if table is not None else reference
    peft = ref_model is None and is_peft_model(model)
    if losses.forget == "npo" and table is None:
        if precompute:
            # Before the first step the model *is* the reference (a PEFT model's is its base
            # model, adapters disabled): no copy needed.
            source = ref_model if ref_model is not None else model
            with model.disable_adapter() if peft else contextlib.nullcontext():
                table = ReferenceLogprobs.compute(source, forget, pad_id, settings.batch_size)
        elif ref_model is None and not peft:
            raise ValueError("precompute_reference=False needs the frozen reference model; pass reference=")
    if ref_model is None and peft:
        ref_model = AdaptersDisabled(model)
    if losses.retain == "kl" and ref_model is None:
        raise ValueError(
            "the KL retain loss needs the frozen reference model: pass reference= (a frozen copy, or "
            "under FSDP2 one sharded like the model); a PEFT model needs none (its adapters are disabled)"
        )
    return table, ref_model
