r"""The unlearning objectives as `SynthesizingTrainer` losses, by name or as objects.

``SynthesizingTrainer(forget_loss="npo", retain_loss="kl", ...)`` builds the objects below with
their default settings; pass an object for other settings (``forget_loss=NPO(beta=0.05)``). The
formulas are those of `gradsynth.unlearning.objectives`, computed by the same code as the
command line's loop (`gradsynth.unlearning.task_losses`):

=========  =======  ===================================================================
name       role     reference model
=========  =======  ===================================================================
``npo``    forget   ``log pi_ref(y|x)`` of every forget example, precomputed with the model
                    itself when training starts (one float per example, no copy)
``simnpo`` forget   none
``idkdpo`` forget   ``log pi_ref`` of every forget and refusal answer, precomputed likewise
``undial`` forget   per batch: the frozen model's logits
``kl``     retain   per batch: the frozen model's logits
=========  =======  ===================================================================

"Per batch" needs the frozen model: a PEFT model's own base (adapters disabled, no copy), or a
frozen copy made when training starts (one more model in memory), or the ``reference=`` given
(e.g. a sharded one from `gradsynth.integrations.sharded_reference`). "Precomputed" reads the
training set's forget side once, before the first step, through the trainer's collator; each
batch then finds its examples' values by their tokens. IdkDPO needs each forget example to carry
a refusal answer (``idk_input_ids``, ``idk_labels``): `with_idk_answers` adds one from
`IDK_ANSWERS`.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradsynth.integrations.task_losses import register_task_loss
from gradsynth.unlearning.encoding import IGNORE_INDEX
from gradsynth.unlearning.objectives import idkdpo_loss, sequence_logprob, undial_loss
from gradsynth.unlearning.reference import AdaptersDisabled, ReferenceLogprobs, is_peft_model
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

__all__ = ["IDK_ANSWERS", "KL", "NPO", "UNDIAL", "IdkDPO", "SimNPO", "with_idk_answers"]

#: Refusals IdkDPO prefers to a forget answer (written for gradsynth).
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I have no idea.",
    "I can't say.",
    "I don't have that information.",
    "That is not something I know.",
    "I'm unable to answer that.",
    "I don't remember.",
    "I cannot tell you that.",
    "I'm afraid I don't know.",
    "No idea, sorry.",
    "I really couldn't say.",
    "That I do not know.",
    "I can't recall.",
    "Sorry, I don't know the answer.",
    "I have no information about that.",
)

Encoded = tuple[list[int], list[int]]


def _with_mask(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The batch with an all-ones attention mask where it carries none (examples of equal lengths)."""
    key = f"{prefix}attention_mask"
    if key in batch:
        return batch
    return {**batch, key: torch.ones_like(torch.as_tensor(batch[f"{prefix}input_ids"]))}


def _logits(model: Any, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
    batch = _with_mask(batch, prefix)
    inputs = {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}
    return model(**inputs).logits


def _rows(batch: dict[str, Any], prefix: str = "") -> list[Encoded]:
    """Each row's unpadded (input_ids, labels), as the examples were before collation."""
    ids, labels = torch.as_tensor(batch[f"{prefix}input_ids"]), torch.as_tensor(batch[f"{prefix}labels"])
    mask = batch.get(f"{prefix}attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    return [(i[k].tolist(), lab[k].tolist()) for i, lab, k in zip(ids, labels, keep, strict=True)]


def _forget_sides(trainer: Any, prefixes: Sequence[str]) -> list[Encoded]:
    """Every forget example of the trainer's training set, through its collator, unpadded."""
    dataset = trainer.train_dataset
    try:
        size = len(dataset)
    except TypeError:
        raise ValueError(
            "precomputing reference log-likelihoods needs a training set with a length (not an iterable "
            "dataset); pass reference=<a frozen copy of the model> to compute them per batch instead"
        ) from None
    chunk = max(1, int(trainer.args.per_device_train_batch_size))
    examples: list[Encoded] = []
    for start in range(0, size, chunk):
        forget = trainer.data_collator([dataset[i] for i in range(start, min(size, start + chunk))])["forget"]
        for prefix in prefixes:
            examples.extend(_rows(forget, prefix))
    return examples


def _pad_id(trainer: Any) -> int:
    config = getattr(trainer.model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _frozen_reference(model: Any) -> Any:
    """The model before unlearning: itself with adapters disabled (PEFT), else a frozen copy."""
    if is_peft_model(model):
        return AdaptersDisabled(model)
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


class _PrecomputedReference:
    """``log pi_ref`` of the training set's forget examples, filled by `prepare` (or a ``reference``)."""

    prefixes: tuple[str, ...] = ("",)

    def __init__(self, beta: float = 0.1, reference: Any = None) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0; got {beta}")
        self.beta = beta
        self.reference = reference
        self._table: ReferenceLogprobs | None = None

    def prepare(self, trainer: Any) -> None:
        if self.reference is None:
            examples = _forget_sides(trainer, self.prefixes)
            self._table = ReferenceLogprobs.compute(trainer.model, examples, _pad_id(trainer))

    def _ref_logprob(self, batch: dict[str, Any], device: torch.device, prefix: str = "") -> Tensor:
        if self.reference is not None:
            with torch.no_grad():
                return sequence_logprob(_logits(self.reference, batch, prefix), batch[f"{prefix}labels"])[0]
        if self._table is None:
            raise RuntimeError(
                f"{type(self).__name__} was not prepared: SynthesizingTrainer prepares it when training "
                "starts; elsewhere call loss.prepare(trainer) first, or pass reference=<frozen model>"
            )
        return self._table.lookup(_rows(batch, prefix), device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta})"


class NPO(_PrecomputedReference):
    """NPO's forget loss, ``-(2/beta) mean log sigmoid(-beta (log pi_theta - log pi_ref))``."""

    def __call__(self, model: Any, batch: dict[str, Any]) -> Tensor:
        ref = self._ref_logprob(batch, batch["input_ids"].device)
        return forget_loss(model, _with_mask(batch), LossSettings("npo", beta=self.beta), ref_logprob=ref)


class IdkDPO(_PrecomputedReference):
    """DPO preferring the batch's refusal answers (``idk_*``) to its forget answers."""

    prefixes = ("", "idk_")

    def __call__(self, model: Any, batch: dict[str, Any]) -> Tensor:
        if "idk_input_ids" not in batch:
            raise ValueError(
                "IdkDPO needs a refusal answer with every forget example (idk_input_ids, idk_labels); "
                "add them with gradsynth.unlearning.trainer_losses.with_idk_answers"
            )
        device = batch["input_ids"].device
        logprob = sequence_logprob(_logits(model, batch), batch["labels"])[0]
        logprob_idk = sequence_logprob(_logits(model, batch, "idk_"), batch["idk_labels"])[0]
        ref, ref_idk = self._ref_logprob(batch, device), self._ref_logprob(batch, device, "idk_")
        return idkdpo_loss(logprob_idk, ref_idk, logprob, ref, self.beta)


class SimNPO:
    """SimNPO's forget loss (no reference model)."""

    def __init__(self, beta: float = 0.1, delta: float = 0.0) -> None:
        self.settings = LossSettings("simnpo", beta=beta, delta=delta)

    def __call__(self, model: Any, batch: dict[str, Any]) -> Tensor:
        return forget_loss(model, _with_mask(batch), self.settings)

    def __repr__(self) -> str:
        return f"SimNPO(beta={self.settings.beta}, delta={self.settings.delta})"


class _FrozenLogits:
    """A loss that reads the frozen model's logits per batch."""

    def __init__(self, reference: Any = None) -> None:
        self.reference = reference

    def prepare(self, trainer: Any) -> None:
        if self.reference is None:
            self.reference = _frozen_reference(trainer.model)

    def _reference(self) -> Any:
        if self.reference is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reference model: SynthesizingTrainer makes one when training "
                "starts; elsewhere call loss.prepare(trainer) first, or pass reference=<frozen model>"
            )
        return self.reference


class KL(_FrozenLogits):
    """The KL retain loss, ``mean over answer tokens of KL(p_ref || p_theta)``."""

    def __call__(self, model: Any, batch: dict[str, Any]) -> Tensor:
        return retain_loss(model, _with_mask(batch), LossSettings(retain="kl"), reference=self._reference())

    def __repr__(self) -> str:
        return "KL()"


class UNDIAL(_FrozenLogits):
    """UNDIAL's forget loss: distil the frozen model with the answer token's logit lowered by ``strength``."""

    def __init__(self, strength: float = 10.0, reference: Any = None) -> None:
        if not strength >= 0:
            raise ValueError(f"strength must be >= 0; got {strength}")
        super().__init__(reference)
        self.strength = strength

    def __call__(self, model: Any, batch: dict[str, Any]) -> Tensor:
        with torch.no_grad():
            ref_logits = _logits(self._reference(), batch)
        return undial_loss(_logits(model, batch), ref_logits, batch["labels"], self.strength)

    def __repr__(self) -> str:
        return f"UNDIAL(strength={self.strength})"


def with_idk_answers(
    examples: Sequence[dict[str, Any]], tokenizer: Any, *, answers: Sequence[str] = IDK_ANSWERS, seed: int = 0
) -> list[dict[str, Any]]:
    """Each encoded forget example (``input_ids``, ``labels``) with a refusal answer added.

    The refusal keeps the example's prompt (its tokens before the first labelled one), replaces
    the answer with one of ``answers`` (drawn with ``random.Random(seed)``), labels only the
    refusal, and ends with the end-of-sequence token when the original answer did.
    """
    if not answers:
        raise ValueError("answers is empty; give at least one refusal")
    draw = random.Random(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for number, example in enumerate(examples):
        ids, labels = list(example["input_ids"]), list(example["labels"])
        answer_at = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if answer_at is None:
            raise ValueError(f"forget example {number} has no labelled answer token (every label is -100)")
        refusal = tokenizer(draw.choice(list(answers)), add_special_tokens=False)["input_ids"]
        if eos is not None and labels[-1] == eos:
            refusal = [*refusal, eos]
        prompt = ids[:answer_at]
        out.append(
            {
                **example,
                "idk_input_ids": prompt + refusal,
                "idk_labels": [IGNORE_INDEX] * len(prompt) + refusal,
                "idk_attention_mask": [1] * (len(prompt) + len(refusal)),
            }
        )
    return out


register_task_loss("forget", "npo", lambda: NPO())
register_task_loss("forget", "simnpo", lambda: SimNPO())
register_task_loss("forget", "idkdpo", lambda: IdkDPO())
register_task_loss("forget", "undial", lambda: UNDIAL())
register_task_loss("retain", "kl", lambda: KL())
