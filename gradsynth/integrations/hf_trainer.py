"""``SynthesizingTrainer``: a Hugging Face ``Trainer`` that unlearns by gradient synthesis.

Each training example pairs the two tasks, ``{"forget": ..., "retain": ...}``. Per micro-batch
the trainer computes ``L_f = forget_loss(model, forget_batch)`` and ``L_r = retain_loss(model,
retain_batch)``, each divided by the number of micro-batches of the step, and runs one backward
per task into the `SynthesizingOptimizer`'s task stashes. On the last micro-batch of a step
(``accelerator.sync_gradients``) it synthesizes ``g = rule(f, r)`` once, on the full
accumulated gradients; the Trainer then clips ``g`` (``max_grad_norm``) and steps the base
optimizer. What the Trainer logs as ``loss`` is ``L_f + L_r``; the logs also carry
``forget_loss``, ``retain_loss`` and the mean gradient geometry (``geometry/cos_gr``, ...) over
the logging window, so TensorBoard / W&B callbacks receive them.

The Trainer's ``num_items_in_batch`` is not used: the task losses are per-micro-batch means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from gradsynth.integrations.accelerate_tasks import AcceleratedTasks
from gradsynth.integrations.step_stats import StepStats
from gradsynth.integrations.task_batches import (
    FORGET_KEY,
    RETAIN_KEY,
    TaskPairCollator,
    is_task_pair,
    split_task_pair,
)
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss
from gradsynth.integrations.unwrap import find_synthesizing_optimizer
from gradsynth.optim import SynthesizingOptimizer
from gradsynth.rules.registry import RuleLike

TaskLoss = Callable[[nn.Module, Any], Tensor]


class SynthesizingTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps follow the synthesized gradient.

    Args:
        model, args: as for ``Trainer``.
        forget_loss: ``loss(model, forget_batch) -> Tensor``, a loss to minimise; default
            gradient ascent (``-model(**batch).loss``).
        retain_loss: ``loss(model, retain_batch) -> Tensor``; default ``model(**batch).loss``.
        rule, alpha, gamma, track_geometry: settings of the `SynthesizingOptimizer` the trainer
            wraps around the optimizer it builds (or one passed as ``optimizers=(opt, sched)``).
            Unset: ``"sago"``, 1.0, 1.0 and geometry tracking on. An optimizer that is a
            `SynthesizingOptimizer` already keeps its own settings, and setting them here too
            is an error.
        data_collator: default `TaskPairCollator` (``default_data_collator`` on each side).
        **trainer_kwargs: passed on to ``Trainer`` (``train_dataset``, ``optimizers``, ...).

    Subclasses may override `compute_forget_loss` / `compute_retain_loss` instead.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        forget_loss: TaskLoss | None = None,
        retain_loss: TaskLoss | None = None,
        rule: RuleLike | None = None,
        alpha: float | None = None,
        gamma: float | None = None,
        track_geometry: bool | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        super().__init__(
            model=model, args=args, data_collator=data_collator or TaskPairCollator(), **trainer_kwargs
        )
        self.forget_loss = forget_loss or gradient_ascent_loss
        self.retain_loss = retain_loss or nll_loss
        settings = {"rule": rule, "alpha": alpha, "gamma": gamma, "track_geometry": track_geometry}
        self._synthesis_settings = {name: value for name, value in settings.items() if value is not None}
        if self._synthesis_settings and find_synthesizing_optimizer(self.optimizer) is not None:
            raise ValueError(
                f"the optimizer passed in is a SynthesizingOptimizer already, and "
                f"{sorted(self._synthesis_settings)} were given to the trainer as well; set them in one "
                "place: on the SynthesizingOptimizer, or pass its base optimizer and set them here"
            )
        self._step_stats = StepStats()
        self._step_open = False

    # ----- the optimizer ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build (or take) the base optimizer as ``Trainer`` does, and wrap it once."""
        optimizer = super().create_optimizer(model)
        if find_synthesizing_optimizer(optimizer) is None:
            settings = {"track_geometry": True, **self._synthesis_settings}
            self.optimizer = optimizer = SynthesizingOptimizer(optimizer, **settings)
        self._refuse_foreign_parameters(self.model if model is None else model)
        return optimizer

    def _refuse_foreign_parameters(self, model: nn.Module) -> None:
        model_params = {id(p) for p in model.parameters()}
        stray = [
            p for group in self.optimizer.param_groups for p in group["params"] if id(p) not in model_params
        ]
        if stray:
            raise ValueError(
                f"the optimizer holds {len(stray)} parameter tensor(s) that are not the model's (built over "
                "another copy of the model, or before get_peft_model / to(device) replaced them); build the "
                "optimizer over trainer.model's parameters, or let the trainer build it"
            )

    @property
    def synthesizing_optimizer(self) -> SynthesizingOptimizer:
        """The `SynthesizingOptimizer` inside ``self.optimizer`` (after ``create_optimizer``)."""
        found = find_synthesizing_optimizer(self.optimizer)
        if found is None:
            raise RuntimeError("no optimizer yet: it is created by train() (or create_optimizer())")
        return found

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.is_fsdp_enabled:
            # FSDP's loader (torch.distributed.checkpoint) first builds the optimizer state by a
            # step with zero gradients at lr 0; our step() would refuse gradients of no task, so
            # that step is taken on the base optimizer here, and the loader then fills the state.
            _initialise_state(self.synthesizing_optimizer.optimizer)
        super()._load_optimizer_and_scheduler(checkpoint)

    # ----- one micro-batch ----------------------------------------------------------------------

    def compute_forget_loss(self, model: nn.Module, forget_batch: Any) -> Tensor:
        """The forget loss of one micro-batch (a loss to minimise)."""
        return self.forget_loss(model, forget_batch)

    def compute_retain_loss(self, model: nn.Module, retain_batch: Any) -> Tensor:
        """The retain loss of one micro-batch."""
        return self.retain_loss(model, retain_batch)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Both task backward passes of one micro-batch; the synthesis on the step's last one."""
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()  # schedule-free bases
        forget_batch, retain_batch = split_task_pair(inputs)
        forget_batch, retain_batch = self._prepare_inputs(forget_batch), self._prepare_inputs(retain_batch)
        tasks = AcceleratedTasks(self.accelerator, self.optimizer)
        if not self._step_open:
            # A step the GradScaler skipped leaves a synthesis behind; the Trainer zeroes only p.grad.
            tasks.optimizer.zero_grad(set_to_none=True)
            self._step_open = True
        scale = 1.0 / self.current_gradient_accumulation_steps
        forget = self._task_loss(self.compute_forget_loss, model, forget_batch) * scale
        tasks.backward_forget(forget)
        retain = self._task_loss(self.compute_retain_loss, model, retain_batch) * scale
        tasks.backward_retain(retain)
        forget, retain = forget.detach(), retain.detach()
        self._step_stats.add_losses(forget, retain)
        if tasks.synthesize():
            self._step_stats.end_step(tasks.optimizer.geometry if tasks.optimizer.track_geometry else None)
            self._step_open = False
        return forget + retain

    def _task_loss(self, compute: TaskLoss, model: nn.Module, batch: Any) -> Tensor:
        with self.compute_loss_context_manager():
            loss = compute(model, batch)
        # nn.DataParallel (several GPUs, one process) returns one loss per device.
        return loss.mean() if self.args.n_gpu > 1 else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """A paired batch evaluates to ``(L_f + L_r, None, None)``; any other batch as in ``Trainer``."""
        if not is_task_pair(inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        forget_batch, retain_batch = split_task_pair(self._prepare_inputs(inputs))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_forget_loss(model, forget_batch) + self.compute_retain_loss(
                model, retain_batch
            )
        return loss.detach(), None, None

    # ----- bookkeeping that must see both halves of a paired batch -------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # The model never sees the paired batch itself: keep both task columns.
        if self._signature_columns is None:
            self._signature_columns = [FORGET_KEY, RETAIN_KEY]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        forget_batch, retain_batch = split_task_pair(inputs)
        return super().floating_point_ops(forget_batch) + super().floating_point_ops(retain_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the per-task losses and the mean gradient geometry to each training log."""
        if "loss" in logs:
            logs.update(self._step_stats.drain(lambda t: self.accelerator.reduce(t, reduction="mean")))
        super().log(logs, start_time)


def _initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create ``optimizer``'s state by one step with zero gradients and learning rate 0."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if optimizer.state or any(p.grad is not None for p in params):
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
