"""gradsynth: LLM unlearning by retention-prioritized gradient synthesis (SAGO, one-sided PCGrad).

Layers, lowest first: `gradsynth.rules` (pure maths on tensors) and
`gradsynth.optim` (the optimizer shell).
"""

from gradsynth.allocator import keep_freed_memory
from gradsynth.optim import GradientGeometry, SynthesizingOptimizer
from gradsynth.rules import (
    FunctionRule,
    Rule,
    available_rules,
    get_backend,
    get_rule,
    pcgrad,
    register_rule,
    sago,
    sago_prefer_retain,
    set_backend,
    unregister_rule,
    use_backend,
    weighted_sum,
)

__version__ = "0.1.0"

__all__ = [
    "FunctionRule",
    "GradientGeometry",
    "Rule",
    "SynthesizingOptimizer",
    "__version__",
    "available_rules",
    "get_backend",
    "get_rule",
    "keep_freed_memory",
    "pcgrad",
    "register_rule",
    "sago",
    "sago_prefer_retain",
    "set_backend",
    "unregister_rule",
    "use_backend",
    "weighted_sum",
]
