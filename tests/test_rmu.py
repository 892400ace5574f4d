"""RMU: the activation loss by hand, the control vector, the tapped layer, and a reference with no copy."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import four_layer_llama  # noqa: E402

from gradsynth import SynthesizingOptimizer  # noqa: E402
from gradsynth.unlearning.rmu import RMU, activation_loss, control_vector  # noqa: E402

_model = four_layer_llama


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (3, 6), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # the prompt
    labels[2, 4:] = -100  # a shorter answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_activation_loss_by_hand():
    # Sequence 0: tokens 1 and 2 labelled, squared errors per token (mean over d=2): 1.0 and 4.0.
    # Sequence 1: token 0 labelled only, mean squared error 9.0; its token 2 (unlabelled) is ignored.
    a = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [2.0, 2.0]], [[3.0, -3.0], [0.0, 0.0], [100.0, 0.0]]])
    b = torch.zeros_like(a)
    labels = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    assert float(activation_loss(a, b, labels)) == pytest.approx(((1.0 + 4.0) / 2 + 9.0) / 2)


def test_control_vector_has_the_steering_norm_and_is_reproducible():
    c = control_vector(64, 20.0, seed=3)
    assert float(c.norm()) == pytest.approx(20.0, rel=1e-6)
    assert bool((c >= 0).all())
    assert torch.equal(c, control_vector(64, 20.0, seed=3))
    assert not torch.equal(c, control_vector(64, 20.0, seed=4))


def test_trains_only_the_chosen_weights():
    model = _model()
    rmu = RMU(model, layer=2)
    params = rmu.trained_parameters()
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if p.requires_grad}


def test_tapped_hidden_states_are_the_layer_outputs():
    model = _model()
    rmu = RMU(model, layer=1)
    batch = _batch(0)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        tapped = rmu.activations(batch)
    # hidden_states[0] is the embedding output; [i + 1] what layer i outputs.
    torch.testing.assert_close(tapped, hidden[2], rtol=0, atol=0)


def test_reference_without_a_copy_equals_a_frozen_copy_after_training():
    model = _model()
    frozen = copy.deepcopy(model)
    rmu = RMU(model, layer=2, steering=5.0)
    opt = SynthesizingOptimizer(torch.optim.SGD(rmu.trained_parameters(), lr=0.5), "sago")
    forget, retain = _batch(1), _batch(2)
    assert float(rmu.retain_loss(retain).detach()) == 0.0  # nothing has moved yet
    first = float(rmu.forget_loss(forget).detach())
    for _ in range(5):
        opt.zero_grad()
        opt.backward_forget(rmu.forget_loss(forget))
        opt.backward_retain(rmu.retain_loss(retain))
        opt.step()
    assert float(rmu.forget_loss(forget).detach()) < first  # the hidden states move toward the control vector
    with torch.no_grad():
        want = frozen(input_ids=retain["input_ids"], output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(rmu.reference_activations(retain), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rmu.activations(retain), want)  # the model itself did move
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen.get_parameter(n))}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    retain_value = float(rmu.retain_loss(retain).detach())
    assert math.isfinite(retain_value) and retain_value > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer": 4}, r"layer 4 is out of range: the model has 4 decoder layers"),
        ({"layer": 1, "trained": "mlp.nope.weight"}, r"pass trained= the name of a weight"),
        ({"layer": 1, "steering": float("nan")}, r"steering coefficient must be a finite number > 0"),
        ({"layer": 1, "trained_layers": [9]}, r"trained layers \[9\] are out of range"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMU(_model(), **kwargs)
