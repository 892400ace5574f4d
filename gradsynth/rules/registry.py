"""Rules by name: the built-in ones and any a user registers.

The registry holds *factories* (a `Rule` class, or a function that builds the rule), never
shared instances that registering could change: ``register_rule("mine", get_rule("sago"))``
registers a copy named ``"mine"``, and the built-in SAGO keeps its name (a checkpoint of
``"sago"`` records ``"sago"``). Each name's rule is built once, on first use, so that every
lookup of a name gives the same object: a scope-wide rule (``pcgrad_global``) named by several
param groups spans them all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from gradsynth.rules.base import FunctionRule, Rule, RuleFunction
from gradsynth.rules.blur import Blur
from gradsynth.rules.pcgrad import PCGrad, PCGradGlobal
from gradsynth.rules.sago import Sago, SagoPreferRetain
from gradsynth.rules.weighted_sum import WeightedSum

RuleFactory = Callable[[], Rule]

_BUILTIN: dict[str, RuleFactory] = {
    cls.name: cls for cls in (Sago, SagoPreferRetain, PCGrad, PCGradGlobal, WeightedSum, Blur)
}
_REGISTRY: dict[str, RuleFactory] = dict(_BUILTIN)
# The rule each name resolves to, built by its factory on first use.
_BUILT: dict[str, Rule] = {}

RuleLike = str | Rule | RuleFunction


def available_rules() -> list[str]:
    """Names of every rule that `get_rule` resolves, built-in ones first."""
    return list(_REGISTRY)


def _by_name(name: str) -> Rule:
    rule = _BUILT.get(name)
    if rule is None:
        rule = _BUILT[name] = _REGISTRY[name]()
    return rule


def get_rule(rule: RuleLike) -> Rule:
    """Resolve a rule given by name, as a `Rule`, or as a per-tensor function."""
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, type) and issubclass(rule, Rule):
        return rule()
    if isinstance(rule, str):
        if rule not in _REGISTRY:
            known = ", ".join(repr(name) for name in _REGISTRY)
            raise ValueError(
                f"unknown rule {rule!r}; known rules: {known}. "
                "Register your own with gradsynth.register_rule(name, rule)."
            )
        return _by_name(rule)
    if callable(rule):
        return FunctionRule(rule)
    raise TypeError(
        f"a rule is a name, a gradsynth.Rule or a function fn(f, r, *, alpha, gamma) -> g; "
        f"got {type(rule).__name__}"
    )


def _named(rule: Rule, name: str) -> Rule:
    """``rule`` under ``name``: itself if it has that name already, else a shallow copy renamed."""
    if rule.name == name:
        return rule
    renamed = copy.copy(rule)
    renamed.name = name
    return renamed


def _factory(name: str, candidate: Rule | type[Rule] | RuleFunction) -> RuleFactory:
    if isinstance(candidate, type) and issubclass(candidate, Rule):
        return lambda: _named(candidate(), name)
    if isinstance(candidate, Rule):
        # Copied now: a rule registered under a second name (or later changed) stays as it was.
        named = _named(candidate, name)
        return lambda: named
    if callable(candidate):
        return lambda: FunctionRule(candidate, name)
    raise TypeError(f"cannot register {type(candidate).__name__} as a rule: pass a Rule or a function")


def _describe(candidate: object) -> str:
    if isinstance(candidate, type):
        return f"class {candidate.__name__}"
    if isinstance(candidate, Rule):
        return repr(candidate)
    return f"function {getattr(candidate, '__qualname__', repr(candidate))}"


def register_rule(
    name: str, rule: Rule | RuleFunction | None = None, *, overwrite: bool = False
) -> Rule | Callable[[Rule | RuleFunction], Rule | RuleFunction]:
    """Make ``rule`` usable by ``name``; without ``rule``, return a decorator.

    ``rule`` is a `Rule` (instance or class with a no-argument constructor) or a per-tensor
    function ``fn(f, r, *, alpha, gamma) -> g``. The object passed is never changed: an
    instance named otherwise is registered as a renamed copy. A name already taken is refused
    (the error names both rules) unless ``overwrite=True``; the built-in rules can never be
    replaced. Returns the rule that ``get_rule(name)`` now gives.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a rule name must be a non-empty string, got {name!r}")

    def add(candidate: Rule | RuleFunction) -> Rule | RuleFunction:
        if name in _BUILTIN:
            raise ValueError(
                f"cannot register {_describe(candidate)} as {name!r}: {name!r} is the built-in rule "
                f"{_by_name(name)!r} and cannot be replaced; pick another name"
            )
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"cannot register {_describe(candidate)} as {name!r}: a rule named {name!r} is "
                f"registered already ({_by_name(name)!r}); pass overwrite=True to replace it, or "
                "pick another name"
            )
        factory = _factory(name, candidate)
        _REGISTRY[name] = factory
        _BUILT.pop(name, None)
        return candidate

    if rule is None:
        return add
    add(rule)
    return _by_name(name)


def unregister_rule(name: str) -> None:
    """Remove a rule that `register_rule` added."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in rule and cannot be removed")
    if name not in _REGISTRY:
        raise KeyError(f"no rule named {name!r} is registered")
    del _REGISTRY[name]
    _BUILT.pop(name, None)
