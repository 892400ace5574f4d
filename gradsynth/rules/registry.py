"""Rules by name: the built-in ones and any a user registers."""

from __future__ import annotations

from collections.abc import Callable

from gradsynth.rules.base import FunctionRule, Rule, RuleFunction
from gradsynth.rules.blur import Blur
from gradsynth.rules.pcgrad import PCGrad, PCGradGlobal
from gradsynth.rules.sago import Sago, SagoPreferRetain
from gradsynth.rules.weighted_sum import WeightedSum

_BUILTIN: dict[str, Rule] = {
    rule.name: rule for rule in (Sago(), SagoPreferRetain(), PCGrad(), PCGradGlobal(), WeightedSum(), Blur())
}
_REGISTRY: dict[str, Rule] = dict(_BUILTIN)

RuleLike = str | Rule | RuleFunction


def available_rules() -> list[str]:
    """Names of every rule that `get_rule` resolves, built-in ones first."""
    return list(_REGISTRY)


def get_rule(rule: RuleLike) -> Rule:
    """Resolve a rule given by name, as a `Rule`, or as a per-tensor function."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, type) and issubclass(rule, Rule):
        return rule()
    if isinstance(rule, str):
        try:
            return _REGISTRY[rule]
        except KeyError:
            known = ", ".join(repr(name) for name in _REGISTRY)
            raise ValueError(
                f"unknown rule {rule!r}; known rules: {known}. "
                "Register your own with gradsynth.register_rule(name, rule)."
            ) from None
    if callable(rule):
        return FunctionRule(rule)
    raise TypeError(
        f"a rule is a name, a gradsynth.Rule or a function fn(f, r, *, alpha, gamma) -> g; "
        f"got {type(rule).__name__}"
    )


def register_rule(
    name: str, rule: Rule | RuleFunction | None = None, *, overwrite: bool = False
) -> Rule | Callable[[Rule | RuleFunction], Rule | RuleFunction]:
    """Make ``rule`` usable by ``name``; without ``rule``, return a decorator.

    ``rule`` is a `Rule` (instance or class with a no-argument constructor) or a per-tensor
    function ``fn(f, r, *, alpha, gamma) -> g``. A name already taken is refused unless
    ``overwrite=True``; the built-in rules can never be replaced.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a rule name must be a non-empty string, got {name!r}")

    def add(candidate: Rule | RuleFunction) -> Rule | RuleFunction:
        if name in _BUILTIN:
            raise ValueError(f"{name!r} is a built-in rule and cannot be replaced; pick another name")
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"a rule named {name!r} is registered already; pass overwrite=True to replace it"
            )
        if isinstance(candidate, type) and issubclass(candidate, Rule):
            resolved: Rule = candidate()
        elif isinstance(candidate, Rule):
            resolved = candidate
        elif callable(candidate):
            resolved = FunctionRule(candidate, name)
        else:
            raise TypeError(
                f"cannot register {type(candidate).__name__} as a rule: pass a Rule or a function"
            )
        resolved.name = name
        _REGISTRY[name] = resolved
        return candidate

    if rule is None:
        return add
    add(rule)
    return _REGISTRY[name]


def unregister_rule(name: str) -> None:
    """Remove a rule that `register_rule` added."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in rule and cannot be removed")
    if name not in _REGISTRY:
        raise KeyError(f"no rule named {name!r} is registered")
    del _REGISTRY[name]
