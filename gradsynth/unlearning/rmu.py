r"""RMU (Representation Misdirection for Unlearning), the fourth forget objective of the paper.

RMU works on the hidden states ``h(x)`` that one chosen decoder layer outputs, not on the
logits. On forget text it steers them toward a fixed random control vector; on retain text it
holds them where the model before unlearning had them. Only a few chosen weights are trained
(by default the MLP output projections of the chosen layer and the two below it)::

    u ~ Uniform[0, 1)^d,   c = s * u / ||u||                 (s: the steering coefficient)
    act(a, b) = mean_i [ sum_{t labelled} mean_k (a_itk - b_itk)^2 / #labelled_i ]
    L_f = act(h_theta(x_f), c)                              (forget: misdirect)
    L_r = act(h_theta(x_r), h_ref(x_r))                     (retain: keep the representation)

"labelled" are the tokens whose label is not ``-100`` (no shift: a hidden state belongs to its
own token). These are the definitions of the WMDP paper's RMU as the SAGO reference code uses
it (steering coefficient 20 there; layer 7 and layers 5-7's ``mlp.down_proj`` for 7B models).

The frozen reference needs no copy of the model: only the trained weights change, so
``h_ref`` is the same model run with the trained weights' values from before unlearning
(`RMU.reference_activations`, through ``torch.func.functional_call``). Its memory is the
trained weights once more, not a whole model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: The weights RMU trains in each chosen layer, as in the WMDP paper and the reference code.
DEFAULT_TRAINED = "mlp.down_proj.weight"


def activation_loss(activations: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    """``act(a, b)`` of the module docstring: squared error per labelled token, mean per sequence."""
    mask = (labels != -100).to(torch.float32)
    per_token = (activations.float() - target.float()).pow(2).mean(dim=-1)  # [B, T]
    per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_sequence.mean()


def control_vector(dim: int, steering: float, seed: int) -> Tensor:
    """``c = s * u / ||u||`` with ``u`` uniform on ``[0, 1)^dim``, drawn from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(dim, generator=generator, dtype=torch.float64)
    return (steering * u / u.norm()).to(torch.float32)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a Hugging Face causal LM (Llama, Mistral, Qwen, GPT-2, ...)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers, "
        "transformer.h, gpt_neox.layers, model.decoder.layers); RMU needs a causal LM with one of them"
    )


@contextmanager
def tapped(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the hidden states ``module`` outputs during the forwards inside the block."""
    seen: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class RMU:
    """RMU's settings and state on one model: the tapped layer, the control vector, the originals.

    ``layer`` indexes the decoder layers (negative counts from the end); ``trained_layers``
    defaults to ``layer`` and the two below it. Call `trained_parameters` to freeze everything
    else and get the parameters to hand to the optimizer.
    """

    model: nn.Module
    layer: int
    steering: float = 20.0
    trained_layers: Sequence[int] | None = None
    trained: str = DEFAULT_TRAINED
    seed: int = 0
    _originals: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        layers = decoder_layers(self.model)
        n = len(layers)
        if not -n <= self.layer < n:
            raise ValueError(f"RMU layer {self.layer} is out of range: the model has {n} decoder layers")
        self.layer %= n
        if self.trained_layers is None:
            self.trained_layers = [i for i in (self.layer - 2, self.layer - 1, self.layer) if i >= 0]
        bad = [i for i in self.trained_layers if not -n <= i < n]
        if bad:
            raise ValueError(f"RMU trained layers {bad} are out of range: the model has {n} decoder layers")
        if not self.steering > 0 or self.steering == float("inf"):
            raise ValueError(f"the RMU steering coefficient must be a finite number > 0; got {self.steering}")
        self._tap = layers[self.layer]
        prefix = self._prefix(layers)
        names = [rf"{re.escape(prefix)}\.{i % n}\.{re.escape(self.trained)}" for i in self.trained_layers]
        chosen = {
            name: p for name, p in self.model.named_parameters() if any(re.fullmatch(x, name) for x in names)
        }
        if len(chosen) != len(set(i % n for i in self.trained_layers)):
            raise ValueError(
                f"RMU trains {self.trained!r} in layers {list(self.trained_layers)}, but the model has "
                f"{sorted(chosen) or 'none of them'}; pass trained= the name of a weight inside each layer"
            )
        self._trained = chosen
        self._originals = {name: p.detach().clone() for name, p in chosen.items()}
        self._control: Tensor | None = None  # drawn at the first forget batch, once its width is known

    def _prefix(self, layers: nn.ModuleList) -> str:
        for name, module in self.model.named_modules():
            if module is layers:
                return name
        raise ValueError("the decoder layers are not a submodule of the model")  # pragma: no cover

    def trained_parameters(self) -> list[nn.Parameter]:
        """Freeze every parameter but RMU's trained weights, and return those."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self._trained.values():
            p.requires_grad_(True)
        return list(self._trained.values())

    def activations(self, batch: dict[str, Tensor]) -> Tensor:
        """Hidden states of the tapped layer on ``batch`` (with the model's current weights)."""
        with tapped(self._tap) as seen:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return seen[0]

    @torch.no_grad()
    def reference_activations(self, batch: dict[str, Tensor]) -> Tensor:
        """``h_ref``: the tapped layer's hidden states with the trained weights as they were."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with tapped(self._tap) as seen:
            torch.func.functional_call(self.model, self._originals, args=(), kwargs=inputs, strict=False)
        return seen[0]

    def forget_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """``L_f``: steer the forget text's hidden states toward the control vector."""
        hidden = self.activations(batch)
        if self._control is None:
            self._control = control_vector(hidden.shape[-1], self.steering, self.seed)
        target = self._control.to(device=hidden.device, dtype=hidden.dtype).expand_as(hidden)
        return activation_loss(hidden, target, batch["labels"])

    def retain_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """``L_r``: keep the retain text's hidden states where the model before unlearning had them."""
        reference = self.reference_activations(batch)
        return activation_loss(self.activations(batch), reference, batch["labels"])
