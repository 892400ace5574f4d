"""The rule registry: factories by name; registering never changes a built-in or the object passed."""

from __future__ import annotations

import pytest
import torch
from helpers import linear_loss, zero_params

import gradsynth
from gradsynth import Rule, SynthesizingOptimizer, get_rule, register_rule, unregister_rule
from gradsynth.rules import Sago


@pytest.fixture
def registered():
    names: list[str] = []
    yield names
    for name in names:
        unregister_rule(name)


def test_registering_a_built_in_under_another_name_leaves_it_alone(registered):
    builtin = get_rule("sago")
    mine = register_rule("mine", builtin)
    registered.append("mine")
    assert builtin.name == "sago" and get_rule("sago") is builtin and get_rule("sago").name == "sago"
    assert mine is not builtin and isinstance(mine, Sago) and mine.name == "mine"
    assert get_rule("mine") is mine
    assert "name='mine'" in repr(mine) and repr(builtin) == "Sago()"


def test_a_checkpoint_of_sago_records_sago_after_a_registration(registered):
    register_rule("mine", get_rule("sago"))
    registered.append("mine")
    params = zero_params([(3,)])
    for rule, saved in [("sago", "sago"), ("mine", "mine")]:
        opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=0.1), rule)
        opt.backward_forget(linear_loss(params, [torch.ones(3)]))
        opt.backward_retain(linear_loss(params, [-torch.ones(3)]))
        opt.step()
        assert opt.state_dict()["gradsynth"]["rule"] == saved


def test_a_user_instance_is_never_renamed(registered):
    class Halve(Rule):
        name = "halve"

        def combine(self, forget, retain, *, alpha, gamma, out, context=None):
            out.copy_(0.5 * (gamma * forget + alpha * retain))

    mine = Halve()
    assert register_rule("halve", mine) is mine  # its own name: the instance itself
    registered.append("halve")
    other = register_rule("halve_again", mine)
    registered.append("halve_again")
    assert mine.name == "halve" and other.name == "halve_again" and other is not mine


def test_classes_are_factories_built_once_per_name(registered):
    class RetainOnly(Rule):
        def combine(self, forget, retain, *, alpha, gamma, out, context=None):
            out.copy_(retain)

    register_rule("retain_only", RetainOnly)
    registered.append("retain_only")
    first = get_rule("retain_only")
    assert first is get_rule("retain_only") and first.name == "retain_only"
    assert RetainOnly.name == ""  # the class itself is untouched


def test_name_collisions_name_both_rules(registered):
    def halfway(f, r, *, alpha, gamma):
        return 0.5 * (f + r)

    with pytest.raises(ValueError, match=r"function .*halfway as 'sago'.*built-in rule Sago\(\)"):
        register_rule("sago", halfway)
    register_rule("halfway", halfway)
    registered.append("halfway")
    with pytest.raises(
        ValueError, match=r"class Sago as 'halfway'.*registered already \(FunctionRule\('halfway'\)\)"
    ):
        register_rule("halfway", Sago)
    replaced = register_rule("halfway", Sago, overwrite=True)
    assert isinstance(replaced, Sago) and replaced.name == "halfway"
    assert get_rule("sago").name == "sago"
    assert gradsynth.available_rules()[:6] == [
        "sago",
        "sago_prefer_retain",
        "pcgrad",
        "pcgrad_global",
        "sum",
        "blur",
    ]


def test_unregistering_forgets_the_built_rule(registered):
    register_rule("tmp", get_rule("sum"))
    unregister_rule("tmp")
    with pytest.raises(ValueError, match="unknown rule 'tmp'"):
        get_rule("tmp")
    with pytest.raises(ValueError, match="built-in"):
        unregister_rule("sum")
