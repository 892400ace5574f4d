"""Integrations: the optimizer shell fitted to the training stacks people already use.

Sits above `gradsynth.optim`; its modules import their third-party packages (transformers,
accelerate, torch.distributed engines) themselves, so ``import gradsynth`` never needs them.
"""
