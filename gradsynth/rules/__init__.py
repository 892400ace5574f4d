"""Pure synthesis rules: functions on tensors that turn (f, r) into one update g.

This layer holds the maths only: no optimizer state, no hooks. See `gradsynth.rules.base`
for the protocol a rule follows.
"""

from gradsynth.rules.base import FunctionRule, Rule, RuleFunction
from gradsynth.rules.blur import Blur, blur_coefficient
from gradsynth.rules.kernels import get_backend, set_backend, use_backend
from gradsynth.rules.pcgrad import PCGrad, PCGradGlobal, pcgrad, projection_coefficient
from gradsynth.rules.reductions import dot64, sign_conflict
from gradsynth.rules.registry import RuleLike, available_rules, get_rule, register_rule, unregister_rule
from gradsynth.rules.sago import Sago, SagoPreferRetain, sago, sago_prefer_retain
from gradsynth.rules.weighted_sum import WeightedSum, weighted_sum

__all__ = [
    "Blur",
    "FunctionRule",
    "PCGrad",
    "PCGradGlobal",
    "Rule",
    "RuleFunction",
    "RuleLike",
    "Sago",
    "SagoPreferRetain",
    "WeightedSum",
    "available_rules",
    "blur_coefficient",
    "dot64",
    "get_backend",
    "get_rule",
    "pcgrad",
    "projection_coefficient",
    "register_rule",
    "sago",
    "sago_prefer_retain",
    "set_backend",
    "sign_conflict",
    "unregister_rule",
    "use_backend",
    "weighted_sum",
]
