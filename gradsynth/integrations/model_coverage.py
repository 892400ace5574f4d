"""Does an optimizer manage exactly the parameters that will train?

A ``SynthesizingOptimizer`` stashes, synthesizes and steps only the parameters in its param
groups. One built over another copy of the model, or over the base model before
``get_peft_model`` added the adapters, would leave the trainable parameters untouched without
any error: gradients reach them, nothing steps them. This check turns that into an error that
names the parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_NAMES_SHOWN = 5


def check_optimizer_covers_model(optimizer: Any, model: nn.Module) -> None:
    """Raise ``ValueError`` unless every parameter of ``optimizer`` is ``model``'s and every
    trainable (``requires_grad``) parameter of ``model`` is in ``optimizer``."""
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    model_params = {id(p) for p in named.values()}
    stray = managed - model_params
    if stray:
        raise ValueError(
            f"the optimizer holds {len(stray)} parameter tensor(s) that are not the model's (built over "
            "another copy of the model, or before get_peft_model / to(device) replaced them); build the "
            "optimizer over trainer.model's parameters, or let the trainer build it"
        )
    trainable = [name for name, p in named.items() if p.requires_grad]
    missing = [name for name in trainable if id(named[name]) not in managed]
    if not missing:
        return
    shown = ", ".join(missing[:_NAMES_SHOWN]) + (
        f", ... ({len(missing)} in all)" if len(missing) > _NAMES_SHOWN else ""
    )
    what = (
        f"none of the model's {len(trainable)} trainable parameters"
        if len(missing) == len(trainable)
        else f"{len(missing)} of the model's {len(trainable)} trainable parameters"
    )
    raise ValueError(
        f"the optimizer manages {what}, so they would never change: {shown}. Build the optimizer after "
        "get_peft_model, over model.parameters() (or the trainable ones), or let the trainer build it; "
        "freeze (requires_grad_(False)) what should not train"
    )
