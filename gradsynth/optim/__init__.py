"""The optimizer shell: task-gradient bookkeeping, synthesis and delegation to a base optimizer."""

from gradsynth.optim.geometry import GeometryAccumulator, GradientGeometry
from gradsynth.optim.synthesizing_optimizer import SynthesizingOptimizer

__all__ = ["GeometryAccumulator", "GradientGeometry", "SynthesizingOptimizer"]
