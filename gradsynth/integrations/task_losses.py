"""Default task losses of `SynthesizingTrainer`: GA for forget, NLL (GD) for retain.

Both read the model's own loss (``model(**batch).loss``, the mean cross-entropy over the
batch's ``labels`` that are not -100):

- `nll_loss`: ``L_r = NLL`` (gradient descent on the retain data);
- `gradient_ascent_loss`: ``L_f = -NLL`` (a loss to minimise, as the rules expect).

Any callable ``loss(model, batch) -> Tensor`` can replace them (NPO, SimNPO, KL to a
reference model, ...).

Under gradient accumulation `SynthesizingTrainer` passes ``num_items_in_batch``, the number of
label tokens of this task over the whole optimizer step, to a loss that takes it. These two
hand it to the model (``model(**batch, num_items_in_batch=n)``), whose loss is then the summed
token loss of the batch divided by ``n``, as in the ``Trainer``'s own accumulation. Called
without it, they are the plain means above.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def nll_loss(model: nn.Module, batch: Any, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    """The model's own loss on ``batch`` (needs ``labels`` in it); with ``num_items_in_batch``,
    its summed token loss divided by that count."""
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    loss = getattr(model(**batch, **extra), "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss for this batch; give the batch 'labels' (e.g. labels = input_ids "
            "with -100 on the tokens to ignore), or pass forget_loss=/retain_loss= callables"
        )
    return loss


def gradient_ascent_loss(
    model: nn.Module, batch: Any, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """``-NLL``: minimising it pushes the likelihood of the batch down."""
    return -nll_loss(model, batch, num_items_in_batch)
