"""The unlearning toolkit: objectives (GA, NPO, SimNPO, RMU; NLL and KL retain), data, evaluation, the loop.

The comparable-forgetting protocol (stop at a forget target, learning-rate ladder) is in
`gradsynth.unlearning.protocol`, the paper's per-objective weights in `PAPER_WEIGHTS`.

Evaluation: per-split recall and NLL (`evaluate_splits`), multiple-choice accuracy scored like
lm-eval (`mc_accuracy`), and any lm-eval task on the model in memory (`evaluate_tasks`, needs the
``eval`` extra).

Data: a local file or folder, a saved ``datasets`` folder or a hub id in the offline cache
(`parse_source`, `read_dataset`), encoded for training (`encode_examples`) and paired forget with
retain for a Trainer (`pair_tasks`, `unlearning_dataset`).

Built on `gradsynth.optim.SynthesizingOptimizer`; needs the ``lm`` extra (transformers,
datasets). See `gradsynth.unlearning.objectives` for the formulas.
"""

from gradsynth.unlearning.benchmarks import EvalExtraMissing, evaluate_tasks
from gradsynth.unlearning.data_sources import Source, parse_source, read_dataset
from gradsynth.unlearning.encoding import Example, collate, encode, make_batches
from gradsynth.unlearning.evaluate import evaluate_splits, exact_match, split_metrics
from gradsynth.unlearning.loop import StepRecord, UnlearnSettings, steps_for_epochs, unlearn
from gradsynth.unlearning.multiple_choice import Choice, make_choices, mc_accuracy, write_lm_eval_task
from gradsynth.unlearning.objectives import (
    FORGET_LOSSES,
    RETAIN_LOSSES,
    ga_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    sequence_logprob,
    simnpo_loss,
)
from gradsynth.unlearning.paper_weights import PAPER_WEIGHTS, ObjectiveWeights
from gradsynth.unlearning.protocol import Rung, climb, ladder
from gradsynth.unlearning.rmu import RMU
from gradsynth.unlearning.task_datasets import PairWithRetain, encode_examples, pair_tasks, unlearning_dataset
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss

__all__ = [
    "PairWithRetain",
    "Source",
    "encode_examples",
    "pair_tasks",
    "parse_source",
    "read_dataset",
    "unlearning_dataset",
    "PAPER_WEIGHTS",
    "RMU",
    "ObjectiveWeights",
    "Rung",
    "climb",
    "ladder",
    "Choice",
    "EvalExtraMissing",
    "evaluate_tasks",
    "make_choices",
    "mc_accuracy",
    "write_lm_eval_task",
    "FORGET_LOSSES",
    "RETAIN_LOSSES",
    "Example",
    "LossSettings",
    "StepRecord",
    "UnlearnSettings",
    "collate",
    "encode",
    "evaluate_splits",
    "exact_match",
    "forget_loss",
    "ga_loss",
    "kl_loss",
    "make_batches",
    "nll_loss",
    "npo_loss",
    "retain_loss",
    "sequence_logprob",
    "simnpo_loss",
    "split_metrics",
    "steps_for_epochs",
    "unlearn",
]
