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

Loss normalisation under accumulation: the trainer counts the forget and the retain label
tokens (``labels != -100``, after the causal shift) separately over all micro-batches of a step,
and a task loss that takes ``num_items_in_batch`` (the defaults do) returns its micro-batch's
summed token loss divided by its task's count for the whole step. Summed over uneven
micro-batches, each task gradient is then the whole batch's token-mean gradient, as the
``Trainer`` does for its one loss. A loss callable without that keyword is a per-micro-batch
mean divided by the number of micro-batches.

With ``TrainingArguments(deepspeed=config)`` (ZeRO-0/1/2/3, no ``optimizer`` section in the
config, so the trainer builds and wraps the optimizer) the same steps run through
`gradsynth.integrations.deepspeed_tasks`: the engine reduces each task's backward, the synthesis
writes ``g`` back into it, and the engine clips (its ``gradient_clipping``, which the Trainer sets
from ``max_grad_norm``) and steps.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_pt_utils import find_batch_size

from gradsynth.integrations.accelerate_tasks import AcceleratedTasks
from gradsynth.integrations.evaluation_callback import EvaluationCallback
from gradsynth.integrations.launch_check import refuse_mismatched_launch
from gradsynth.integrations.model_coverage import check_optimizer_covers_model
from gradsynth.integrations.step_stats import StepStats
from gradsynth.integrations.task_batches import (
    FORGET_KEY,
    RETAIN_KEY,
    TaskPairCollator,
    is_task_pair,
    split_task_pair,
)
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss, task_loss
from gradsynth.integrations.unwrap import find_synthesizing_optimizer
from gradsynth.optim import SynthesizingOptimizer
from gradsynth.optim.synthesizing_optimizer import adopt_settings, optimizer_settings
from gradsynth.rules.registry import RuleLike

TaskLoss = Callable[..., Tensor]


class TaskItemCounts(NamedTuple):
    """Label tokens of one optimizer step, per task (``None``: not counted)."""

    forget: Tensor | int | None
    retain: Tensor | int | None


def _takes_num_items(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_items_in_batch" or p.kind is p.VAR_KEYWORD for p in parameters)


def _refuse_dropped_features(args: Any, trainer_kwargs: dict[str, Any]) -> None:
    """Trainer options that act on the Trainer's own single loss, which this trainer replaces."""
    if getattr(args, "label_smoothing_factor", 0):
        raise ValueError(
            "label_smoothing_factor smooths the Trainer's own loss, which SynthesizingTrainer does not use; "
            "put the smoothing into forget_loss=/retain_loss= callables, or set it to 0"
        )
    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError(
            "compute_loss_func replaces the Trainer's single loss, which SynthesizingTrainer does not use; "
            "pass forget_loss=/retain_loss= callables instead"
        )


class SynthesizingTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps follow the synthesized gradient.

    Args:
        model: as for ``Trainer``.
        args: as for ``Trainer`` (``TrainingArguments``).
        forget_loss: ``loss(model, forget_batch) -> Tensor``, a loss to minimise, or its name:
            ``"ga"`` (the default: gradient ascent, ``-model(**batch).loss``), ``"npo"``,
            ``"simnpo"``, ``"idkdpo"``, ``"undial"`` (`gradsynth.unlearning.trainer_losses`,
            with their default settings; pass an object such as ``NPO(beta=0.05)`` for others).
        retain_loss: ``loss(model, retain_batch) -> Tensor`` or its name: ``"nll"`` (the
            default, ``model(**batch).loss``) or ``"kl"`` (to the model before unlearning).
            A loss with a ``prepare(trainer)`` method is prepared when `train` starts, before
            the first step (NPO's reference log-likelihoods, KL's frozen reference).
        rule: the synthesis rule of the `SynthesizingOptimizer` the trainer wraps around the
            optimizer it builds (or one passed as ``optimizers=(opt, sched)``); unset: ``"sago"``.
        alpha: its retain weight; unset: 1.0.
        gamma: its forget weight; unset: 1.0.
        track_geometry: whether it records the gradient geometry; unset: on.
            An optimizer that is a `SynthesizingOptimizer` already keeps its own settings of
            these four, and setting them here too is an error.
            Resuming from a checkpoint restores the settings that were not given here; the ones
            given here win over the checkpoint's, with a warning naming both when they differ (a
            `SynthesizingOptimizer` passed in follows its own ``load_state_dict`` instead).
        streaming: build the `SynthesizingOptimizer` with ``streaming=True`` (the retain
            backward combines each parameter as soon as its gradient is complete: less peak
            memory). Needs ``gradient_accumulation_steps=1`` and one process.
        data_collator: default `TaskPairCollator` (pads ragged examples; labels with -100).
        **trainer_kwargs: passed on to ``Trainer`` (``train_dataset``, ``optimizers``, ...).
            ``compute_loss_func`` and ``label_smoothing_factor`` act on the ``Trainer``'s single
            loss and are refused; ``compute_metrics`` applies to unpaired eval sets only.

    Subclasses may override `compute_forget_loss` / `compute_retain_loss` instead.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        forget_loss: TaskLoss | str | None = None,
        retain_loss: TaskLoss | str | None = None,
        rule: RuleLike | None = None,
        alpha: float | None = None,
        gamma: float | None = None,
        track_geometry: bool | None = None,
        streaming: bool | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        _refuse_dropped_features(args, trainer_kwargs)
        super().__init__(
            model=model, args=args, data_collator=data_collator or TaskPairCollator(), **trainer_kwargs
        )
        refuse_mismatched_launch(self.accelerator)
        self.forget_loss = _resolve("forget", forget_loss, gradient_ascent_loss)
        self.retain_loss = _resolve("retain", retain_loss, nll_loss)
        settings = {
            "rule": rule,
            "alpha": alpha,
            "gamma": gamma,
            "track_geometry": track_geometry,
            "streaming": streaming,
        }
        self._synthesis_settings = {name: value for name, value in settings.items() if value is not None}
        if self._synthesis_settings and find_synthesizing_optimizer(self.optimizer) is not None:
            raise ValueError(
                f"the optimizer passed in is a SynthesizingOptimizer already, and "
                f"{sorted(self._synthesis_settings)} were given to the trainer as well; set them in one "
                "place: on the SynthesizingOptimizer, or pass its base optimizer and set them here"
            )
        if streaming:
            self._refuse_streaming_with_accumulation()
        if self.compute_metrics is not None and any(map(_is_paired_dataset, _eval_sets(self.eval_dataset))):
            raise ValueError(
                "compute_metrics needs predictions, and a paired eval set yields per-task losses only "
                "(eval_forget_loss, eval_retain_loss); evaluate unpaired data with compute_metrics, "
                "or drop it"
            )
        self._step_stats = StepStats()
        self._step_open = False
        self._eval_task_losses: list[Tensor] | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after preparing the task losses that need the model before unlearning."""
        for loss in (self.forget_loss, self.retain_loss):
            prepare = getattr(loss, "prepare", None)
            if callable(prepare):
                prepare(self)
        return super().train(*args, **kwargs)

    def _refuse_streaming_with_accumulation(self) -> None:
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"streaming=True runs one backward per task per optimizer step, so it needs "
                f"gradient_accumulation_steps=1 (got {self.args.gradient_accumulation_steps}); raise the "
                "batch size instead, or use streaming=False"
            )

    # ----- the optimizer ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build (or take) the base optimizer as ``Trainer`` does, and wrap it once."""
        optimizer = super().create_optimizer(model)
        if find_synthesizing_optimizer(optimizer) is None:
            settings = {"track_geometry": True, **self._synthesis_settings}
            self.optimizer = optimizer = SynthesizingOptimizer(optimizer, **settings)
            # Settings given to the trainer win on resume. A SynthesizingOptimizer passed in keeps
            # its own load_state_dict policy (the checkpoint's settings, with a warning).
            optimizer.register_load_state_dict_pre_hook(self._explicit_settings_win)
        if self.synthesizing_optimizer.streaming:
            self._refuse_streaming_with_accumulation()
        check_optimizer_covers_model(self.optimizer, self.model if model is None else model)
        return optimizer

    def _explicit_settings_win(self, optimizer: SynthesizingOptimizer, state_dict: dict[str, Any]) -> Any:
        """Resume: settings given to the trainer override the checkpoint's (warning when they differ);
        the others are restored from it. A load pre-hook, so it acts wherever the Trainer loads."""
        saved = state_dict.get("gradsynth")
        if saved is None:
            return None
        current = optimizer_settings(optimizer)
        given = {name for name in self._synthesis_settings if name in current}
        overridden = [
            f"{name}={saved[name]!r} -> {current[name]!r}"
            for name in current
            if name in given and name in saved and saved[name] != current[name]
        ]
        if overridden:
            warnings.warn(
                "resuming: the settings given to SynthesizingTrainer win over the checkpoint's "
                f"(checkpoint -> trainer: {', '.join(overridden)}); drop them from the trainer to resume "
                "the checkpoint's",
                UserWarning,
                stacklevel=2,
            )
        # What the checkpoint will restore, the optimizer takes now: its load then changes nothing silently.
        adopt_settings(
            optimizer, {name: saved[name] for name in current if name in saved and name not in given}
        )
        return {**state_dict, "gradsynth": {**saved, **{name: current[name] for name in given}}}

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

    def compute_forget_loss(
        self, model: nn.Module, forget_batch: Any, num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The forget loss of one micro-batch (a loss to minimise).

        With ``num_items_in_batch`` (the step's forget label tokens), the summed token loss of
        this micro-batch divided by it; passed on only to a ``forget_loss`` that takes it.
        """
        return _call_task_loss(self.forget_loss, model, forget_batch, num_items_in_batch)

    def compute_retain_loss(
        self, model: nn.Module, retain_batch: Any, num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The retain loss of one micro-batch; ``num_items_in_batch`` as in `compute_forget_loss`."""
        return _call_task_loss(self.retain_loss, model, retain_batch, num_items_in_batch)

    def _normalises_by_count(self, task: str) -> bool:
        """Whether this task's loss divides by the step's token count itself (else: by micro-batches)."""
        method = getattr(type(self), f"compute_{task}_loss")
        if method is not getattr(SynthesizingTrainer, f"compute_{task}_loss"):
            return _takes_num_items(method)
        return _takes_num_items(getattr(self, f"{task}_loss"))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """Per-task label-token counts of a step's paired micro-batches (`TaskItemCounts`)."""
        if not batch_samples or not all(map(is_task_pair, batch_samples)):
            return super()._get_num_items_in_batch(batch_samples, device)
        sides = [split_task_pair(batch) for batch in batch_samples]
        return TaskItemCounts(
            forget=super()._get_num_items_in_batch([forget for forget, _ in sides], device),
            retain=super()._get_num_items_in_batch([retain for _, retain in sides], device),
        )

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
        # Under DeepSpeed the engine holds the gradients (its base optimizer sees flat partitions);
        # the loss is scaled here, so the engine must not divide it again.
        deepspeed = self.is_deepspeed_enabled
        if not self._step_open:
            if not deepspeed:
                # A step the GradScaler skipped leaves a synthesis behind; the Trainer zeroes only p.grad.
                tasks.optimizer.zero_grad(set_to_none=True)
            self._step_open = True
        # The step's loss shares are scaled here already, so the DeepSpeed engine must not divide again.
        backward_kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        counts = (
            num_items_in_batch
            if isinstance(num_items_in_batch, TaskItemCounts)
            else TaskItemCounts(None, None)
        )
        forget = self._step_share(FORGET_KEY, model, forget_batch, counts.forget)
        tasks.backward_forget(forget, **backward_kwargs)
        retain = self._step_share(RETAIN_KEY, model, retain_batch, counts.retain)
        tasks.backward_retain(retain, **backward_kwargs)
        forget, retain = forget.detach(), retain.detach()
        self._step_stats.add_losses(forget, retain)
        if tasks.synthesize():
            optimizer = tasks.optimizer
            self._step_stats.end_step(optimizer.pending_geometry if optimizer.track_geometry else None)
            self._step_open = False
        return forget + retain

    def _step_share(self, task: str, model: nn.Module, batch: Any, count: Tensor | int | None) -> Tensor:
        """One micro-batch's part of its task's step loss: summed tokens / the step's count, or the
        micro-batch mean / the number of micro-batches."""
        compute = getattr(self, f"compute_{task}_loss")
        if count is None or not self._normalises_by_count(task):
            return self._task_loss(compute, model, batch) / self.current_gradient_accumulation_steps
        loss = self._task_loss(compute, model, batch, num_items_in_batch=count)
        if self.args.average_tokens_across_devices:
            # The count is summed over processes and DDP averages the gradients: as the Trainer does.
            loss = loss * (
                self.accelerator.num_processes // self.get_tp_size()
                if self.args.n_gpu <= 1
                else self.args.n_gpu
            )
        return loss

    def _task_loss(self, compute: TaskLoss, model: nn.Module, batch: Any, **kwargs: Any) -> Tensor:
        with self.compute_loss_context_manager():
            loss = compute(model, batch, **kwargs)
        # nn.DataParallel (several GPUs, one process) returns one loss per device.
        return loss.mean() if self.args.n_gpu > 1 else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """A paired batch evaluates to ``(L_f + L_r, None, None)``; any other batch as in ``Trainer``.

        The per-task losses of paired batches are kept for `evaluation_loop`, which reports them
        as ``<prefix>_forget_loss`` and ``<prefix>_retain_loss``.
        """
        if not is_task_pair(inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self.compute_metrics is not None:
            raise ValueError(
                "compute_metrics needs predictions, and a paired eval set yields per-task losses only; "
                "evaluate unpaired data with compute_metrics, or drop it"
            )
        forget_batch, retain_batch = split_task_pair(self._prepare_inputs(inputs))
        with torch.no_grad(), self.compute_loss_context_manager():
            forget = self.compute_forget_loss(model, forget_batch).detach()
            retain = self.compute_retain_loss(model, retain_batch).detach()
        if self._eval_task_losses is not None:
            # One row per example, gathered as the Trainer gathers eval_loss (duplicates dropped).
            rows = torch.stack([forget, retain]).float().expand(find_batch_size(forget_batch), 2)
            self._eval_task_losses.append(self.accelerator.gather_for_metrics(rows.contiguous()).cpu())
        return forget + retain, None, None

    def evaluation_loop(self, dataloader: Any, description: str, *args: Any, **kwargs: Any) -> Any:
        """The ``Trainer``'s loop, plus ``<prefix>_forget_loss`` and ``<prefix>_retain_loss`` on pairs."""
        prefix = kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval")
        self._eval_task_losses = []
        try:
            output = super().evaluation_loop(dataloader, description, *args, **kwargs)
            if self._eval_task_losses:
                forget, retain = torch.cat(self._eval_task_losses).mean(dim=0).tolist()
                output.metrics[f"{prefix}_forget_loss"] = forget
                output.metrics[f"{prefix}_retain_loss"] = retain
        finally:
            self._eval_task_losses = None
        return output

    # ----- bookkeeping that must see both halves of a paired batch -------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # Paired data: the model never sees the pair itself, keep both task columns. Unpaired
        # (eval) data: the model's own inputs, as the Trainer keeps them.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [FORGET_KEY, RETAIN_KEY, *self._signature_columns]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        forget_batch, retain_batch = split_task_pair(inputs)
        return super().floating_point_ops(forget_batch) + super().floating_point_ops(retain_batch)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # include_num_input_tokens_seen: the tokens of both tasks.
        if not is_task_pair(inputs):
            return super()._track_num_input_tokens(inputs)
        for side in split_task_pair(inputs):
            super()._track_num_input_tokens(side)
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the per-task losses and the mean gradient geometry to each training log."""
        if "loss" in logs:
            logs.update(self._step_stats.drain(lambda t: self.accelerator.reduce(t, reduction="mean")))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, EvaluationCallback):
                logs.update(callback.drain())
        super().log(logs, start_time)


def _resolve(role: str, loss: TaskLoss | str | None, default: TaskLoss) -> TaskLoss:
    if loss is None:
        return default
    if isinstance(loss, str):
        return task_loss(role, loss)  # type: ignore[arg-type]
    if not callable(loss):
        raise TypeError(
            f"{role}_loss must be a name or a callable loss(model, batch); got {type(loss).__name__}"
        )
    return loss


def _call_task_loss(loss: TaskLoss, model: nn.Module, batch: Any, num_items_in_batch: Any) -> Tensor:
    if num_items_in_batch is None or not _takes_num_items(loss):
        return loss(model, batch)
    return loss(model, batch, num_items_in_batch=num_items_in_batch)


def _eval_sets(eval_dataset: Any) -> list[Any]:
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def _is_paired_dataset(dataset: Any) -> bool:
    try:
        return len(dataset) > 0 and is_task_pair(dataset[0])
    except (TypeError, KeyError, IndexError):
        return False


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
