r"""Reference models that cost no second copy of the model.

NPO and the KL retain loss compare the model with the frozen model from before unlearning,
``pi_ref``. Holding ``pi_ref`` as a full copy costs one more model per rank (16 GB for an 8B model
in bf16). Two cases need no copy at all:

- **NPO** reads ``pi_ref`` only through the summed answer log-likelihood of each *forget*
  example, ``log pi_ref(y_i|x_i)``, which never changes during unlearning. `ReferenceLogprobs`
  computes it once, before the first step, with the model itself (which *is* ``pi_ref`` then), and
  looks it up per batch: one float per forget example instead of a model.
- **PEFT / LoRA**: the base weights are frozen, so ``pi_ref`` is the same model with its adapters
  disabled. `AdaptersDisabled` runs the model's forward under ``disable_adapter()`` (in eval mode,
  as the frozen copy would), which is what the KL retain loss needs per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradsynth.unlearning.encoding import collate
from gradsynth.unlearning.objectives import sequence_logprob

Encoded = tuple[list[int], list[int]]


def _key(example: Encoded) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ids, labels = example
    return tuple(ids), tuple(labels)


class ReferenceLogprobs:
    """``log pi_ref(y|x)`` of each forget example, computed once and looked up per batch (NPO).

    Build it with `compute` before the first unlearning step; `lookup` returns the values of a
    batch's examples in their order. Examples are found by their tokens, so a batch drawn in any
    order, or repeated, finds its values.
    """

    def __init__(self, table: dict[tuple[tuple[int, ...], tuple[int, ...]], float]) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    @classmethod
    @torch.no_grad()
    def compute(
        cls, model: Any, examples: Sequence[Encoded], pad_id: int, batch_size: int = 16
    ) -> ReferenceLogprobs:
        """One pass of ``model`` (in eval mode, restored after) over ``examples``."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        table = {}
        try:
            for start in range(0, len(examples), batch_size):
                chunk = list(examples[start : start + batch_size])
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logprob, _ = sequence_logprob(logits, batch["labels"])
                table.update({_key(e): float(v) for e, v in zip(chunk, logprob.tolist(), strict=True)})
        finally:
            model.train(was_training)
        return cls(table)

    def lookup(self, examples: Iterable[Encoded], device: torch.device | str = "cpu") -> Tensor:
        """The reference log-likelihoods of ``examples``, a float32 tensor in their order."""
        try:
            values = [self._table[_key(e)] for e in examples]
        except KeyError:
            raise KeyError(
                "a forget example has no precomputed reference log-likelihood; compute the table over "
                "the forget set that unlearning draws from (ReferenceLogprobs.compute(model, forget, pad_id))"
            ) from None
        return torch.tensor(values, dtype=torch.float32, device=device)


class AdaptersDisabled:
    """The frozen reference of a PEFT model: the same model, adapters off, eval mode, no gradient.

    Calling it runs ``model(**inputs)`` under ``model.disable_adapter()`` and ``torch.no_grad()``
    and restores the model's train/eval mode afterwards.
    """

    def __init__(self, model: Any) -> None:
        if not callable(getattr(model, "disable_adapter", None)):
            raise TypeError(
                f"{type(model).__name__} has no disable_adapter(); AdaptersDisabled serves PEFT models "
                "(peft.get_peft_model); for a model without adapters pass a frozen copy as the reference"
            )
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def is_peft_model(model: Any) -> bool:
    """True for a model whose reference is itself with adapters disabled."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")
