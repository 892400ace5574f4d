"""Default task losses of `SynthesizingTrainer`: GA for forget, NLL (GD) for retain.

Both read the model's own loss (``model(**batch).loss``, the mean cross-entropy over the
batch's ``labels`` that are not -100):

- `nll_loss`: ``L_r = NLL`` (gradient descent on the retain data);
- `gradient_ascent_loss`: ``L_f = -NLL`` (a loss to minimise, as the rules expect).

Any callable ``loss(model, batch) -> Tensor`` can replace them, and so can a name:
`task_loss` resolves ``"ga"`` and ``"nll"`` here and the unlearning toolkit's objectives
(``"npo"``, ``"simnpo"``, ``"idkdpo"``, ``"undial"``, ``"kl"``; `gradsynth.unlearning.trainer_losses`)
through `register_task_loss`. The toolkit sits above this layer, so this module never imports it:
the first name it does not know loads the toolkit's module, which registers its objectives. A
loss with a ``prepare(trainer)`` method is prepared by `SynthesizingTrainer` when training starts,
before the first step (NPO's reference log-likelihoods, KL's frozen reference).

Under gradient accumulation `SynthesizingTrainer` passes ``num_items_in_batch``, the number of
label tokens of this task over the whole optimizer step, to a loss that takes it. These two
hand it to the model (``model(**batch, num_items_in_batch=n)``), whose loss is then the summed
token loss of the batch divided by ``n``, as in the ``Trainer``'s own accumulation. Called
without it, they are the plain means above.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor, nn

Role = Literal["forget", "retain"]
#: (role, name) -> a factory of the loss with its default settings.
_NAMED: dict[tuple[str, str], Callable[[], Callable[..., Tensor]]] = {}
# Where the objectives of the layer above live; imported on the first name not known here.
_TOOLKIT = "gradsynth.unlearning.trainer_losses"


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


def register_task_loss(role: Role, name: str, factory: Callable[[], Callable[..., Tensor]]) -> None:
    """Make ``task_loss(role, name)`` build ``factory()``; a name taken by another factory is an error."""
    if role not in ("forget", "retain"):
        raise ValueError(f"role must be 'forget' or 'retain'; got {role!r}")
    known = _NAMED.get((role, name))
    if known is not None and known is not factory:
        raise ValueError(f"the {role} loss {name!r} is registered already ({known!r}); choose another name")
    _NAMED[(role, name)] = factory


def task_loss(role: Role, name: str) -> Callable[..., Tensor]:
    """A new instance of the ``role`` loss called ``name``, with its default settings."""
    if (role, name) not in _NAMED:
        importlib.import_module(_TOOLKIT)
    if (role, name) not in _NAMED:
        known = sorted(n for r, n in _NAMED if r == role)
        raise ValueError(
            f"unknown {role} loss {name!r}; choose one of {', '.join(known)}, or pass a callable "
            "loss(model, batch) -> Tensor"
        )
    return _NAMED[(role, name)]()


register_task_loss("forget", "ga", lambda: gradient_ascent_loss)
register_task_loss("retain", "nll", lambda: nll_loss)
