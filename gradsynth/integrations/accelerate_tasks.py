"""The two task backward passes of an Accelerate training loop, synthesized once per real step.

Contract, for a loop under ``with accelerator.accumulate(model):``:

- ``backward_forget(loss)`` / ``backward_retain(loss)`` do what ``accelerator.backward(loss)``
  does (divide by the accumulation steps, scale under fp16) and attribute the gradient to the
  task. Across micro-batches each task's gradient accumulates on its own;
- ``synthesize()`` writes ``g = rule(f, r)`` into ``p.grad`` only when
  ``accelerator.sync_gradients`` is true, i.e. on the last micro-batch of an optimizer step, on
  the full accumulated (and, with DDP, reduced) task gradients. Call it before
  ``accelerator.clip_grad_norm_`` so that clipping and fp16 unscaling act on ``g``;
- ``AcceleratedOptimizer.step()`` / ``zero_grad()`` already do nothing between sync points, and
  our ``step()`` synthesizes if ``synthesize()`` was not called.

Under DeepSpeed (``accelerate launch`` with a DeepSpeed config, or a ``DeepSpeedPlugin``) the
task backward passes go through `gradsynth.integrations.deepspeed_tasks.DeepSpeedTasks` (the
engine's own backward, each task's gradient read out of the engine), and ``synthesize()`` also
steps the engine, as ``accelerator.backward`` does under DeepSpeed at a sync point: the engine's
``gradient_clipping`` acts on ``g`` (``accelerator.clip_grad_norm_`` only reports the norm there),
and the prepared optimizer's ``step()`` / ``zero_grad()`` do nothing, as Accelerate makes them.

FSDP2: ``accelerator.accumulate`` (and the Trainer) run every micro-batch but the last under
``accelerator.no_sync``, which for FSDP2 calls ``set_requires_gradient_sync(False)``; FSDP2 then
adds the backward passes of *both* tasks into one private unsharded buffer and hands the sum
to whichever task's backward syncs next (measured through the Trainer: parameters 9e-3 off the
one-process run after two steps). So before each task's backward the gradient sync of the
prepared FSDP2 models is switched back on: every micro-batch reduce-scatters, and each task
keeps its own sharded sum.

Memory: when Accelerate's backward would be a plain ``loss.backward()`` (no DeepSpeed or
Megatron engine), the loss goes through ``backward_forget(loss)``, so autograd adds straight
into the task's stash (two gradient sets at peak under accumulation, not three).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from gradsynth.integrations.deepspeed_tasks import deepspeed_tasks
from gradsynth.integrations.distributed import refuse_fsdp1
from gradsynth.integrations.launch_check import refuse_mismatched_launch
from gradsynth.integrations.unwrap import require_synthesizing_optimizer
from gradsynth.optim import SynthesizingOptimizer


class AcceleratedTasks:
    """Forget/retain backward passes through an ``accelerate.Accelerator``.

    Args:
        accelerator: the ``Accelerator`` that prepared the model and the optimizer.
        optimizer: the optimizer ``accelerator.prepare`` returned (or the `SynthesizingOptimizer`
            itself).

    Usage::

        tasks = AcceleratedTasks(accelerator, optimizer)
        with accelerator.accumulate(model):
            tasks.backward_forget(forget_loss)
            tasks.backward_retain(retain_loss)
            if tasks.synthesize():
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(self, accelerator: Any, optimizer: Any) -> None:
        refuse_fsdp1(accelerator, optimizer)
        self.accelerator = accelerator
        self.optimizer: SynthesizingOptimizer = require_synthesizing_optimizer(optimizer)
        refuse_mismatched_launch(accelerator)
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        # One DeepSpeedTasks per engine: its task sums must outlive this object (a Trainer makes
        # one AcceleratedTasks per micro-batch).
        self._engine_tasks = None if wrapped is None else deepspeed_tasks(wrapped.engine)

    def backward_forget(self, loss: Tensor, **backward_kwargs: Any) -> None:
        """``accelerator.backward(loss)``, attributed to the forget task."""
        if self._engine_tasks is not None:
            self._engine_tasks.backward_forget(loss, **backward_kwargs)
            return
        self._backward(self.optimizer.backward_forget, loss, backward_kwargs)

    def backward_retain(self, loss: Tensor, **backward_kwargs: Any) -> None:
        """``accelerator.backward(loss)``, attributed to the retain task."""
        if self._engine_tasks is not None:
            self._engine_tasks.backward_retain(loss, **backward_kwargs)
            return
        self._backward(self.optimizer.backward_retain, loss, backward_kwargs)

    def _backward(
        self, attribute: Callable[..., None], loss: Tensor, backward_kwargs: dict[str, Any]
    ) -> None:
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        engine_backward = accelerator.distributed_type in (
            DistributedType.DEEPSPEED,
            DistributedType.MEGATRON_LM,
        )
        if engine_backward or "learning_rate" in backward_kwargs:
            # The engine (or LOMO) runs its own backward: attribute whatever it left in p.grad.
            accelerator.backward(loss, **backward_kwargs)
            attribute(None)
            return
        _keep_fsdp2_reducing(accelerator)
        # What accelerator.backward does on the plain path, with the backward run by us.
        loss = loss / accelerator.gradient_accumulation_steps
        if accelerator.scaler is not None:
            loss = accelerator.scaler.scale(loss)
        attribute(loss, **backward_kwargs)

    def synthesize(self) -> bool:
        """Synthesize if this micro-batch ends an optimizer step; returns whether it did."""
        if not self.accelerator.sync_gradients:
            return False
        if self._engine_tasks is not None:
            self._engine_tasks.step(boundary=True)
        else:
            self.optimizer.synthesize()
        return True


def _keep_fsdp2_reducing(accelerator: Any) -> None:
    """Undo ``no_sync``'s ``set_requires_gradient_sync(False)`` on the FSDP2 models (see above)."""
    if not getattr(accelerator, "is_fsdp2", False):
        return
    # Accelerate keeps the models it prepared in ``_models``; no public accessor exists.
    for model in getattr(accelerator, "_models", ()):
        if callable(getattr(model, "set_requires_gradient_sync", None)):
            model.set_requires_gradient_sync(True)
