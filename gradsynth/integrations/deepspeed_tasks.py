"""DeepSpeed ZeRO-0/1/2/3: each task's reduced gradient read out of the engine, synthesized, written back.

The engine adds every backward of a step into its own reduced, partitioned buffers, so the two
task gradients must be taken out of it between the task backward passes. Per micro-batch and
task, `DeepSpeedTasks`:

1. marks the backward as an accumulation boundary (``engine.set_gradient_accumulation_boundary
   (True)``) and runs ``engine.backward(loss)``, so the engine reduces this backward's gradient
   over the data-parallel ranks at once. Reduction is linear: reducing each micro-batch and
   adding the results equals reducing their sum, so the window's gradient is unchanged;
2. reads the reduced gradient with DeepSpeed's public helpers and adds it to the task's own
   running sum: stage 0 ``p.grad``; ZeRO-1/2 ``safe_get_full_grad`` (a full-size copy, the same
   on every rank); ZeRO-3 ``safe_get_local_grad`` (this rank's partition of the flat gradient);
3. clears the engine's gradient (ZeRO-3 needs zeros written with ``safe_set_local_grad``: the
   fp32 partition keeps accumulating through ``engine.zero_grad()``).

At the last micro-batch of a window, `step` synthesizes ``g = rule(f, r)`` with the same
`gradsynth.optim.combine.synthesize` loop the optimizer shell uses, under the `SynthesizingOptimizer`'s
settings (its rule, ``alpha``, ``gamma``, per-param-group keys, geometry), writes ``g`` back
(``p.grad`` / ``safe_set_full_grad`` / ``safe_set_local_grad``) and calls ``engine.step()``: the
engine's loss-scale handling, ``gradient_clipping`` and optimizer step act on ``g``.

ZeRO-3 partitions are wrapped as ``Shard(0)`` DTensors over the parameter's partition group
(padding trimmed), so a rule's scope-wide sums (PCGrad's ``<f, r>`` and ``||r||^2``,
``pcgrad_global``'s, the geometry) are global, settled in one all-reduce as under FSDP2, while
SAGO stays elementwise on the local shard with no communication.

Extra memory per rank (fp32, beyond what the engine holds): two task sums, full-size at stages
0-2, partition-size at ZeRO-3; see docs/scaling.md for the measurements.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsynth.integrations.distributed import check_engine
from gradsynth.integrations.unwrap import find_synthesizing_optimizer
from gradsynth.optim import SynthesizingOptimizer
from gradsynth.optim.combine import synthesize
from gradsynth.optim.geometry import GeometryAccumulator, GradientGeometry
from gradsynth.optim.task_gradients import FORGET, RETAIN, TASKS

__all__ = ["DeepSpeedTasks", "deepspeed_tasks"]


class DeepSpeedTasks:
    """Forget/retain backward passes through a ``deepspeed.initialize`` engine (ZeRO stage 0-3).

    Args:
        engine: the ``DeepSpeedEngine``, built over a `SynthesizingOptimizer` as its client
            optimizer (its rule, ``alpha``, ``gamma``, param-group keys and ``track_geometry``
            apply). DeepSpeed needs ``"zero_allow_untested_optimizer": true`` in its config for
            it; the Trainer and Accelerate set that themselves.

    Usage, in a custom loop (``engine.backward`` semantics: losses are divided by the engine's
    ``gradient_accumulation_steps`` unless ``scale_wrt_gas=False`` is passed)::

        opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), rule="sago")
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        tasks = DeepSpeedTasks(engine)
        for forget_batch, retain_batch in batches:
            tasks.backward_forget(forget_loss(engine, forget_batch))
            tasks.backward_retain(retain_loss(engine, retain_batch))
            tasks.step()  # synthesizes and steps the engine once per accumulation window
    """

    def __init__(self, engine: Any) -> None:
        stage = getattr(engine, "zero_optimization_stage", None)
        if not callable(stage):
            raise TypeError(f"DeepSpeedTasks needs a DeepSpeedEngine, got {type(engine).__name__}")
        self.engine = engine
        self.stage: int = int(stage())
        if self.stage not in (0, 1, 2, 3):
            raise NotImplementedError(f"unknown ZeRO stage {self.stage}")
        check_engine(engine)  # refuses ZeRO offload (untested)
        found = find_synthesizing_optimizer(engine.optimizer)
        if found is None:
            raise TypeError(
                "the engine's optimizer is not a SynthesizingOptimizer and wraps none: pass one as the "
                "client optimizer, deepspeed.initialize(model=model, optimizer=SynthesizingOptimizer("
                "torch.optim.AdamW(model.parameters())), config=...), and leave 'optimizer' out of the "
                "DeepSpeed config (an optimizer built by DeepSpeed from the config cannot be wrapped)"
            )
        self.optimizer: SynthesizingOptimizer = found
        self._sums: dict[str, dict[Tensor, Tensor]] = {task: {} for task in TASKS}
        self._micro = 0
        self._meshes: dict[int, Any] = {}
        self._geometry: GeometryAccumulator | None = None

    # ----- the model's parameters, by param group ----------------------------------------------

    def _groups(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """``(param group of the SynthesizingOptimizer, the model parameters it covers)``."""
        zero = self.engine.optimizer
        groups = self.optimizer.param_groups
        if self.stage == 0:
            return [(group, list(group["params"])) for group in groups]
        if self.stage in (1, 2):
            return list(zip(groups, zero.bit16_groups, strict=True))
        return [(groups[zero.sub_group_to_group_id[i]], params) for i, params in enumerate(zero.fp16_groups)]

    def _params(self) -> list[Tensor]:
        return [p for _, params in self._groups() for p in params if p.requires_grad]

    # ----- reading and writing the engine's gradients --------------------------------------------

    def _read(self, p: Tensor, keep: bool) -> Tensor | None:
        """The reduced gradient of ``p`` that the last backward left; a tensor we own if ``keep``
        (else it may be the engine's own buffer, to be read before the engine is cleared)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        if self.stage == 0:
            grad, p.grad = p.grad, None
            return grad
        if self.stage in (1, 2):
            grad = safe_get_full_grad(p)
            borrowed = grad is not None and grad is p.grad
        else:
            grad = safe_get_local_grad(p)
            borrowed = grad is not None
        return grad.clone() if keep and borrowed else grad

    def _clear(self, params: list[Tensor]) -> None:
        """Zero the engine's gradients so the next backward starts from nothing."""
        from deepspeed.utils import safe_set_local_grad

        if self.stage == 3:
            for p in params:
                safe_set_local_grad(p, torch.zeros_like(p.ds_tensor, dtype=torch.float32).reshape(-1))
        if self.stage > 0:
            self.engine.zero_grad()

    def _write(self, p: Tensor, update: Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

        if self.stage == 0:
            p.grad = update.to(p.dtype)
        elif self.stage in (1, 2):
            safe_set_full_grad(p, update)
        else:
            safe_set_local_grad(p, self._unshard(p, update))

    # ----- ZeRO-3 partitions as DTensor shards ----------------------------------------------------

    def _mesh(self, group: Any, device_type: str) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        key = id(group)
        if key not in self._meshes:
            self._meshes[key] = DeviceMesh.from_group(group, device_type)
        return self._meshes[key]

    def _shard(self, p: Tensor, local: Tensor) -> Tensor:
        """This rank's flat partition (padding trimmed) as a ``Shard(0)`` DTensor of ``p.ds_numel``."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Shard

        group = p.ds_process_group
        size = local.numel()
        start = dist.get_rank(group=group) * size
        real = max(0, min(size, p.ds_numel - start))
        mesh = self._mesh(group, local.device.type)
        return DTensor.from_local(
            local[:real], mesh, [Shard(0)], run_check=False, shape=torch.Size([p.ds_numel]), stride=(1,)
        )

    def _unshard(self, p: Tensor, update: Tensor) -> Tensor:
        local = update.to_local()
        padded = torch.zeros(p.ds_tensor.numel(), dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        return padded

    # ----- the task backward passes --------------------------------------------------------------

    def backward_forget(self, loss: Tensor, **backward_kwargs: Any) -> None:
        """``engine.backward(loss)``, attributed to the forget task."""
        self._backward(FORGET, loss, backward_kwargs)

    def backward_retain(self, loss: Tensor, **backward_kwargs: Any) -> None:
        """``engine.backward(loss)``, attributed to the retain task."""
        self._backward(RETAIN, loss, backward_kwargs)

    def _backward(self, task: str, loss: Tensor, backward_kwargs: dict[str, Any]) -> None:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(loss, **backward_kwargs)
        params = self._params()
        sums = self._sums[task]
        with torch.no_grad():
            for p in params:
                # Later micro-batches are added into the task's sum: no copy of the engine's buffer.
                grad = self._read(p, keep=p not in sums)
                if grad is None:
                    continue
                if p in sums:
                    sums[p].add_(grad)
                else:
                    sums[p] = grad
            self._clear(params)

    # ----- synthesis and step ----------------------------------------------------------------------

    @torch.no_grad()
    def synthesize(self) -> None:
        """Write ``g = rule(f, r)`` of the window's task sums back into the engine; no step.

        A collective under ZeRO-3 with PCGrad or geometry: every rank calls it. With nothing
        pending it does nothing.
        """
        if not any(self._sums.values()):
            return
        groups = [(self.optimizer.group_settings(group), params) for group, params in self._groups()]
        geometry = GeometryAccumulator() if self.optimizer.track_geometry else None
        done = synthesize(groups, self._take, geometry)
        for p, update in zip(done.params, done.updates, strict=True):
            self._write(p, update)
        self._geometry = done.geometry

    def _take(self, p: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The window's task sums of ``p``, taken out (ZeRO-3 partitions as DTensor shards)."""
        forget, retain = self._sums[FORGET].pop(p, None), self._sums[RETAIN].pop(p, None)
        if self.stage == 3:
            forget = None if forget is None else self._shard(p, forget)
            retain = None if retain is None else self._shard(p, retain)
        return forget, retain

    def step(self, boundary: bool | None = None) -> bool:
        """Call once per micro-batch: on the window's last one, synthesize and ``engine.step()``.

        Args:
            boundary: whether this micro-batch ends the optimizer step; ``None`` counts
                micro-batches against the engine's ``gradient_accumulation_steps``.

        Returns whether the engine stepped.
        """
        self._micro += 1
        if boundary is None:
            boundary = self._micro >= self.engine.gradient_accumulation_steps()
        if not boundary:
            return False
        self.synthesize()
        self.engine.set_gradient_accumulation_boundary(True)
        with self.optimizer.synthesized_elsewhere(self._geometry):
            self.engine.step()
        self._micro = 0
        return True

    @property
    def geometry(self) -> GradientGeometry | None:
        """Gradient geometry of the last step (the optimizer's ``track_geometry``), else None."""
        return self.optimizer.geometry


def deepspeed_tasks(engine: Any) -> DeepSpeedTasks:
    """The one `DeepSpeedTasks` of ``engine`` (created on first use, kept on the engine).

    For code that cannot hold the object between micro-batches (a Trainer's ``training_step``).
    """
    tasks = getattr(engine, "_gradsynth_tasks", None)
    if tasks is None:
        tasks = DeepSpeedTasks(engine)
        engine._gradsynth_tasks = tasks
    return tasks
