"""Unlearning with the Hugging Face Trainer: ``SynthesizingTrainer`` on a tiny Llama, per rule.

What it shows
-------------
A tiny ``LlamaForCausalLM`` (built from a config, no download) memorises random token
sequences ("facts"). Then, for each rule, a copy of it is asked to forget a few facts by
gradient ascent while gradient descent on the others holds on to them, through
``gradsynth.integrations.hf_trainer.SynthesizingTrainer``: paired batches
``{"forget": ..., "retain": ...}``, gradient accumulation, ``max_grad_norm`` clipping (of the
synthesized gradient), a linear LR schedule, and the gradient geometry that the Trainer logs
(``geometry/cos_gr``, ...) next to ``forget_loss`` and ``retain_loss``.

It prints forget accuracy (lower is better), retain accuracy (higher is better) and the mean
logged geometry for each rule; the verdict is computed from the run's numbers.

Run::

    python examples/hf_trainer_unlearn.py            # full run
    python examples/hf_trainer_unlearn.py --quick    # a smoke-test variant (seconds)
    python examples/hf_trainer_unlearn.py --rules sum,pcgrad,sago --steps 60 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch
from tiny_facts import accuracy, make_facts, memorise, paired_examples, tiny_llama
from transformers import PrinterCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from gradsynth.integrations.hf_trainer import SynthesizingTrainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps, for a smoke test")
    parser.add_argument("--rules", default="sum,sago", help="comma-separated rule names")
    parser.add_argument("--steps", type=int, default=100, help="unlearning optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def unlearn(pretrained, rule: str, forget, retain, steps: int, lr: float, seed: int, out_dir: str):
    model = copy.deepcopy(pretrained)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],  # e.g. ["tensorboard"]: the geometry goes there too
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = SynthesizingTrainer(
        model, args, train_dataset=paired_examples(forget, retain, 8 * steps), rule=rule
    )
    trainer.remove_callback(PrinterCallback)  # the logs are read back below instead
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "geometry/cos_gr" in entry]
    geometry = {
        key: statistics.fmean(entry[f"geometry/{key}"] for entry in logs)
        for key in ("cos_fr", "cos_gr", "cos_gf")
    }
    return accuracy(model, forget), accuracy(model, retain), geometry


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    n_facts, hidden, pretrain_steps, steps = (16, 32, 60, 3) if args.quick else (64, 64, 150, args.steps)
    facts = make_facts(n_facts, 10, 64, args.seed)
    forget, retain = facts[:8], facts[8:]
    model = tiny_llama(64, hidden, 2, args.seed)
    memorise(model, facts, pretrain_steps, 1e-2)
    print(f"memorised: forget {accuracy(model, forget):.1%}, retain {accuracy(model, retain):.1%}\n")

    rules = args.rules.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for rule in rules:
            results[rule] = unlearn(model, rule, forget, retain, steps, args.lr, args.seed, out_dir)

    print(f"after {steps} steps (accuracy; cosines are means of the Trainer's logs):\n")
    print(f"{'rule':<20}{'forget':>8}{'retain':>8} | {'cos(f,r)':>9}{'cos(g,r)':>9}{'cos(g,f)':>9}")
    for rule, (acc_f, acc_r, geo) in results.items():
        cosines = "".join(f"{geo[key]:>9.3f}" for key in ("cos_fr", "cos_gr", "cos_gf"))
        print(f"{rule:<20}{acc_f:>8.1%}{acc_r:>8.1%} | {cosines}")
    if "sum" in results and "sago" in results:
        (f_sum, r_sum, _), (f_sago, r_sago, _) = results["sum"], results["sago"]
        print(
            f"\nVerdict: SAGO kept retain accuracy {100 * (r_sago - r_sum):+.1f} pts vs the sum baseline, "
            f"at forget accuracy {f_sago:.1%} (SAGO) vs {f_sum:.1%} (sum)."
        )


if __name__ == "__main__":
    main()
