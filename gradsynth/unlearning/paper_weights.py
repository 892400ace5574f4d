"""Each forget objective's weights as the paper's public configs set them (see ``paper.md``).

``alpha`` weights the retain gradient, ``gamma`` the forget gradient; ``beta``/``delta`` are
NPO's/SimNPO's temperature and SimNPO's margin. The embedded world is RWKU-like (facts about
people), so where the WMDP and RWKU configs differ the RWKU ones are used:

| objective | alpha | gamma | beta | delta | source |
|---|---|---|---|---|---|
| GA (+GD) | 1 | 1 | - | - | every GD config |
| NPO | 1 | 1 | 1e-3 | - | RWKU NPO+SAGO (WMDP-Cyber NPO+SAGO also uses beta 1e-3) |
| SimNPO | 0.1 | 1 | 0.1 | 0.1 | RWKU SimNPO+SAGO (= WMDP-Cyber SimNPO+SAGO) |
| RMU | 1 | 1 | - | - | not in the configs: the rule's defaults |

``beta``/``delta`` of GA and RMU are unused; they keep the library defaults (0.1, 0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveWeights:
    """The rule's task weights and the objective's hyper-parameters."""

    alpha: float
    gamma: float
    beta: float
    delta: float


PAPER_WEIGHTS: dict[str, ObjectiveWeights] = {
    "ga": ObjectiveWeights(alpha=1.0, gamma=1.0, beta=0.1, delta=0.0),
    "npo": ObjectiveWeights(alpha=1.0, gamma=1.0, beta=1e-3, delta=0.0),
    "simnpo": ObjectiveWeights(alpha=0.1, gamma=1.0, beta=0.1, delta=0.1),
    "rmu": ObjectiveWeights(alpha=1.0, gamma=1.0, beta=0.1, delta=0.0),
}
