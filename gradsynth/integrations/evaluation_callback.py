"""``EvaluationCallback``: scores computed every N optimizer steps, logged with the training logs.

``scores(model) -> {name: value}`` is any callable; `gradsynth.unlearning.split_scores.SplitScores`
gives the unlearning splits' recall, NLL, multiple-choice accuracy, ROUGE-L and lm-eval tasks.
At every ``every``-th optimizer step (and at the last one) the callback runs it on the model in
eval mode (restoring its mode) without gradients, and asks the ``Trainer`` to log at that step.
`gradsynth.integrations.hf_trainer.SynthesizingTrainer` merges the scores into that log entry,
prefixed (``eval_splits/forget/recall``, ...), before any reporting callback (TensorBoard, W&B)
sees it; under a plain ``Trainer`` they are added to ``state.log_history`` only, since the
reporting callbacks have run by then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback


class EvaluationCallback(TrainerCallback):
    """Score the model every ``every`` optimizer steps into the training logs.

    Args:
        scores: ``scores(model) -> {name: float}``.
        every: optimizer steps between two evaluations (>= 1); the last step is always scored.
        prefix: put before each name in the logs.
    """

    def __init__(
        self, scores: Callable[[Any], Mapping[str, float]], every: int, *, prefix: str = "eval_splits"
    ) -> None:
        if not callable(scores):
            raise TypeError(f"scores must be a callable scores(model) -> dict; got {type(scores).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number of steps >= 1; got {every!r}")
        self.scores, self.every, self.prefix = scores, every, prefix
        self._pending: dict[str, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = state.global_step
        if model is None or not (step % self.every == 0 or step >= state.max_steps):
            return control
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                found = self.scores(model)
        finally:
            model.train(was_training)
        self._pending = {f"{self.prefix}/{name}": float(value) for name, value in found.items()}
        control.should_log = True
        return control

    def drain(self) -> dict[str, float]:
        """The scores of the last evaluation not logged yet (and forget them)."""
        pending, self._pending = self._pending, {}
        return pending

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        # A plain Trainer: its log entry is in the history already; add what was not merged.
        pending = self.drain()
        if pending and state.log_history:
            state.log_history[-1].update(pending)
        return control
