"""``--lora-rank`` and ``--gradient-checkpointing``: LoRA adapters and recomputed activations for `unlearn`.

LoRA (peft): every chosen linear layer ``W`` becomes ``W + (alpha / r) * B A`` with ``A`` (r x in)
drawn at random from the run's seed and ``B`` (out x r) zero, so the model starts as it was; only
``A`` and ``B`` train, and the synthesis (`gradsynth.optim.SynthesizingOptimizer`) sees exactly those
parameters. The references of NPO and KL are the same model with its adapters disabled
(`gradsynth.unlearning.reference`): no copy. The output folder holds the merged model
(``W + (alpha / r) B A`` written into ``W``, a plain transformers model) or, with ``--save-adapter``,
the adapter alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

Gradient checkpointing is transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
before transformers 5) with the non-reentrant
form (no input needs a gradient, which matters when only adapters train): each decoder layer's
activations are recomputed in the backward passes instead of being kept.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch

from gradsynth.cli.errors import CliError
from gradsynth.cli.parser import LORA_ALL_LINEAR


def check_scale_flags(args: argparse.Namespace) -> None:
    """Refuse flags of a run at scale that do not fit together, before any work."""
    if args.lora_rank is None:
        given = [
            flag
            for flag, value in (
                ("--lora-alpha", args.lora_alpha),
                ("--lora-target-modules", args.lora_target_modules),
                ("--save-adapter", args.save_adapter),
            )
            if value
        ]
        if given:
            raise CliError(
                f"{given[0]} goes with --lora-rank R (the adapters' rank); add it or drop {given[0]}"
            )
    elif args.forget_loss == "rmu":
        raise CliError(
            "--lora-rank with --forget-loss rmu: RMU trains its chosen layers' own weights, not adapters; "
            "drop --lora-rank or choose another --forget-loss"
        )
    if (args.save_every or args.resume) and (args.min_steps or 1) > 1:
        flag = "--save-every" if args.save_every else "--resume"
        raise CliError(
            f"{flag} with --min-steps: a descending ladder keeps a faster rung's model, which a checkpoint "
            "does not hold; drop --min-steps or run without checkpoints"
        )


def lora_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The adapters' settings for the report (None without ``--lora-rank``)."""
    if args.lora_rank is None:
        return None
    return {
        "rank": args.lora_rank,
        "alpha": args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        "target_modules": args.lora_target_modules,
        "saved": "adapter" if args.save_adapter else "merged",
    }


def with_lora(model: Any, args: argparse.Namespace, seed: int) -> Any:
    """``model`` with LoRA adapters (peft), or a `CliError` naming why peft cannot add them."""
    settings = lora_settings(args)
    if settings is None:
        return model
    try:
        import peft
    except ImportError as err:
        raise CliError("--lora-rank needs the peft package (pip install peft); it is not installed") from err
    targets = settings["target_modules"]
    config = peft.LoraConfig(
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        target_modules=targets,
        lora_dropout=0.0,  # no randomness in the step: a resumed run repeats it exactly
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # A's draw: the same adapters for the same --seed
    try:
        with warnings.catch_warnings():  # peft itself still asks transformers the pre-v5 question
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return peft.get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, NotImplementedError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if targets is None:
            raise CliError(
                f"--lora-rank: peft cannot add adapters to {type(model).__name__} ({reason}); name the "
                f"layers with --lora-target-modules (e.g. q_proj,v_proj, or {LORA_ALL_LINEAR})"
            ) from err
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise CliError(
            f"--lora-target-modules {shown}: peft cannot add adapters there ({reason}); name modules "
            f"the model has (print(model) lists them) or use {LORA_ALL_LINEAR}"
        ) from err


def saved_model(model: Any, folder: Path, save_adapter: bool) -> Any:
    """The plain model to audit and save: a LoRA model merged (after writing its adapter to
    ``folder`` with ``save_adapter``); any other model as it is."""
    if not callable(getattr(model, "merge_and_unload", None)):
        return model
    if save_adapter:
        model.save_pretrained(folder, safe_serialization=True)
    return model.merge_and_unload()


def enable_gradient_checkpointing(model: Any) -> None:
    """Turn on transformers' gradient checkpointing (non-reentrant), or refuse a model without it."""
    if not getattr(model, "supports_gradient_checkpointing", False) and not hasattr(model, "base_model"):
        raise CliError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing "
            "in transformers; drop the flag"
        )
    kwargs = {"use_reentrant": False}
    try:
        if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except (ValueError, AttributeError, NotImplementedError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CliError(f"--gradient-checkpointing: {reason}; drop the flag") from err
