"""Where the model and the data come from: the embedded world, or ``--model`` with ``--forget``/``--retain``.

Both give a `Task`: the model and tokenizer, the forget and retain examples the run trains on,
and the evaluation splits (every split of the world's `Splits.by_name`; for a user's model, its
forget and retain sets).

``--loss-scope`` says which tokens of the training examples carry the loss: ``full`` (every
token) is the world's default, since the world model was pretrained with a loss on every token and
the answer-only loss made the forget gradient 10 to 10^4 times the retain one; ``answer`` is the
default for ``--model`` question/answer files, the TOFU / open-unlearning convention.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gradsynth.cli.errors import CliError
from gradsynth.cli.progress import phase
from gradsynth.unlearning.chat import NoChatTemplate, in_format, prompt_format_for
from gradsynth.unlearning.data import DataError, load_examples
from gradsynth.unlearning.encoding import Example, prompt_of, with_loss_scope
from gradsynth.unlearning.multiple_choice import Choice, make_choices
from gradsynth.unlearning.split_scores import answer_choices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORLD_LOSS_SCOPE = "full"
MODEL_LOSS_SCOPE = "answer"
MC_SPLITS = ("forget", "general")  # --facts: the splits also scored by multiple choice


@dataclass
class Task:
    """A model to unlearn from, its data and its evaluation splits."""

    model: Any
    tokenizer: Any
    forget: list[Example]
    retain: list[Example]
    splits: dict[str, list[Example]]
    max_length: int
    description: dict[str, Any] = field(default_factory=dict)
    generate_eval: bool = False  # also score greedy generations (ROUGE-L); the world's recall is exact
    choices: dict[str, list[Choice]] = field(default_factory=dict)  # multiple-choice form per split
    recall: str = "exact"  # exact: answer + eos teacher-forced; contains: in the greedy answer
    non_members: list[Example] | None = None  # the audit's negatives, where the source brings them


def world_choices(world: Any, splits: dict[str, list[Any]]) -> dict[str, list[Choice]]:
    """Each split's facts as 4-option questions; distractors are the relation's other values in the world."""
    values: dict[str, list[str]] = {}
    for fact in world.pretraining:
        values.setdefault(fact.relation, []).append(fact.answer)
    return {
        name: make_choices([(f.question, f.answer, f.relation) for f in facts], values)
        for name, facts in splits.items()
    }


def world_task(size: str, seed: int, log: Any = print) -> Task:
    """The embedded world of ``size`` with the forget targets chosen by ``seed``."""
    from gradsynth.world import SIZES, load_world_model, split_world
    from gradsynth.world.pretrain import MAX_LENGTH

    model, tokenizer, world, info = load_world_model(size, log=log)
    splits = split_world(world, SIZES[size], seed)
    examples = {
        name: [Example(prompt_of(f.question), f.answer) for f in facts]
        for name, facts in splits.by_name().items()
    }
    return Task(
        model=model,
        tokenizer=tokenizer,
        forget=examples["forget"],
        retain=examples["retain"],
        splits=examples,
        max_length=MAX_LENGTH,
        choices=world_choices(world, splits.by_name()),
        description={
            "source": f"embedded world ({size})",
            "model_parameters": info["parameters"],
            "model_path": info["path"],
            "targets": splits.targets,
            "neighbours": splits.neighbours,
            "loss_scope": WORLD_LOSS_SCOPE,
            "sizes": {name: len(facts) for name, facts in examples.items()},
        },
    )


def _check_weights_match(path: str, info: dict[str, Any]) -> None:
    """Refuse a model whose weights do not fill its architecture (some tensors left random)."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {label} (e.g. {sorted(map(str, keys))[0]})"
            for keys, label in (
                (missing, "weights missing, left random"),
                (unexpected, "weights unused"),
                (mismatched, "weights of the wrong shape"),
            )
            if keys
        ]
        raise CliError(
            f"--model {path}: its config does not match its weights ({'; '.join(parts)}); "
            "check that config.json belongs to these weights"
        )


def _check_tokenizer(path: str, model: Any, tokenizer: Any) -> None:
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise CliError(f"--model {path}: its tokenizer has no vocabulary; save the model's tokenizer with it")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise CliError(
            f"--model {path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
            "save the model's own tokenizer with it"
        )


def _load_model(path: str, dtype: str, gguf_file: str | None = None) -> tuple[Any, Any]:
    """The model and tokenizer of ``--model`` (see `gradsynth.cli.models` for what it may be)."""
    from gradsynth.cli import models
    from gradsynth.cli.memory import check_model_fits

    folder, gguf = models.resolve(path, gguf_file)
    if gguf is None:  # a GGUF's config is inside the file; it is checked by models.check_gguf
        check_model_fits(folder, DTYPES[dtype])  # before anything is allocated: a 70B config was OOM-killed
    try:
        model, tokenizer, info = models.load(path, DTYPES[dtype], gguf_file)
    except CliError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a bad model
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CliError(
            f"--model {path}: not a causal language model transformers can load ({reason[:200]}); "
            "give a local folder or Hub id of a causal LM"
        ) from err
    _check_weights_match(path, info)
    _check_tokenizer(path, model, tokenizer)
    return model, tokenizer


def held_out_names(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The ``--eval NAME=FILE`` pairs, each name once."""
    pairs = list(getattr(args, "eval", None) or [])
    names = [name for name, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CliError(f"--eval {twice[0]}=...: given twice; give each held-out split one file")
    return pairs


def held_out_choices(splits: dict[str, list[Example]]) -> dict[str, list[Choice]]:
    """Each question/answer split with two or more distinct answers as multiple-choice questions
    (`gradsynth.unlearning.split_scores.answer_choices`)."""
    return {name: found for name, examples in splits.items() if (found := answer_choices(examples, name))}


def read_splits(files: list[tuple[str, Any]]) -> dict[str, list[Example]]:
    """The examples of each ``(name, file)``, read before any model is loaded (errors come fast)."""
    try:
        return {
            name: load_examples(file, name if name.startswith("--") else f"--eval {name}")
            for name, file in files
        }
    except DataError as err:
        raise CliError(str(err)) from err


def formatted(
    splits: dict[str, list[Example]], tokenizer: Any, args: argparse.Namespace
) -> tuple[dict[str, list[Example]], str]:
    """``splits`` in ``--prompt-format`` (default: chat where the tokenizer has a template)."""
    prompt_format = prompt_format_for(tokenizer, getattr(args, "prompt_format", None))
    try:
        out = {name: in_format(examples, tokenizer, prompt_format) for name, examples in splits.items()}
    except NoChatTemplate as err:
        raise CliError(
            f"--prompt-format chat: the tokenizer of {args.model} has no chat template; "
            "use --prompt-format plain"
        ) from err
    return out, prompt_format


def model_task(args: argparse.Namespace) -> Task:
    """A user's model with the forget and retain files given on the command line."""
    if not args.forget or not args.retain:
        raise CliError(
            "--model needs --forget FILE and --retain FILE (files, datasets folders or hub: ids), "
            "or --facts real"
        )
    held_out = held_out_names(args)
    splits = read_splits([("--forget", args.forget), ("--retain", args.retain), *held_out])
    with phase(f"loading {args.model}"):
        model, tokenizer = _load_model(args.model, args.dtype, getattr(args, "gguf_file", None))
    splits, prompt_format = formatted(splits, tokenizer, args)
    forget, retain = splits.pop("--forget"), splits.pop("--retain")
    recall = getattr(args, "recall", None) or "contains"
    return Task(
        model=model,
        tokenizer=tokenizer,
        forget=forget,
        retain=retain,
        splits={"forget": forget, "retain": retain, **splits},
        max_length=args.max_length or 256,
        choices=held_out_choices(splits),
        generate_eval=True,
        recall=recall,
        description={
            "source": args.model,
            "prompt_format": prompt_format,
            "recall": recall,
            "forget_file": str(args.forget),
            "retain_file": str(args.retain),
            "loss_scope": MODEL_LOSS_SCOPE,
            "eval_files": {name: str(file) for name, file in held_out},
            "sizes": {"forget": len(forget), "retain": len(retain), **{n: len(e) for n, e in splits.items()}},
        },
    )


def _in_format(pairs: list[tuple[str, str]], tokenizer: Any, prompt_format: str) -> list[Example]:
    """(question, answer) pairs as examples in ``prompt_format``, as ``--forget`` files are put."""
    return in_format([Example(prompt_of(q), a) for q, a in pairs], tokenizer, prompt_format)


_LOADED: dict[tuple[Any, ...], tuple[Any, Any, list[Any], str]] = {}


def _known_facts(args: argparse.Namespace) -> tuple[Any, Any, list[Any], str]:
    """``--model`` with the shipped facts it knows in ``--prompt-format``: loaded and generated once
    per process, since every seed of a comparison splits the same known facts (runs copy the model)."""
    from gradsynth.unlearning import real_facts
    from gradsynth.unlearning.generation import greedy_answers

    key = (
        args.model,
        args.dtype,
        getattr(args, "gguf_file", None),
        getattr(args, "prompt_format", None),
        hash(real_facts.facts()),
    )
    if key not in _LOADED:
        with phase(f"loading {args.model}"):
            model, tokenizer = _load_model(args.model, args.dtype, getattr(args, "gguf_file", None))
        _, prompt_format = formatted({}, tokenizer, args)

        def said_to(questions: list[str]) -> list[str]:
            model.eval()
            asked = _in_format([(q, "") for q in questions], tokenizer, prompt_format)
            return greedy_answers(model, tokenizer, [e.prompt for e in asked])

        with phase(f"finding which of the {len(real_facts.facts())} shipped facts {args.model} knows"):
            known = real_facts.known_facts(said_to)
        _LOADED.clear()  # one model in memory at a time
        _LOADED[key] = (model, tokenizer, known, prompt_format)
    return _LOADED[key]


def facts_task(args: argparse.Namespace, seed: int) -> Task:
    """``--facts real``: the shipped facts ``--model`` knows, split by ``seed``
    (`gradsynth.unlearning.real_facts`); trained on the model's own answers, scored on the gold ones."""
    from gradsynth.unlearning import real_facts

    if args.forget or args.retain or getattr(args, "eval", None):
        raise CliError(f"--facts {args.facts} brings its own splits; drop --forget/--retain/--eval")
    model, tokenizer, known, prompt_format = _known_facts(args)
    try:
        parts = real_facts.split(known, seed)
    except real_facts.TooFewKnown as err:
        raise CliError(
            f"--facts {args.facts}: {err}; use a model that knows more of them, or --prompt-format "
            f"{'plain' if prompt_format == 'chat' else 'chat'}"
        ) from err

    def scored(items: list[Any]) -> list[Example]:
        return _in_format([(k.fact.question, k.fact.answer) for k in items], tokenizer, prompt_format)

    def trained(items: list[Any]) -> list[Example]:
        return _in_format([(k.fact.question, k.label) for k in items], tokenizer, prompt_format)

    splits = {name: scored(items) for name, items in parts.items()}
    splits["prose"] = [Example(text) for text in real_facts.prose()]
    relation = parts["forget"][0].fact.relation
    unknown = real_facts.non_members(known, seed, relation)
    values = real_facts.relation_values()
    # 4 options each, the distractors other answers of the fact's relation. Only forget (is the
    # knowledge still there, under another probe?) and general (the headline): 4 forwards per
    # question made multiple choice on every split the costliest part of an evaluation.
    choices = {}
    for name in MC_SPLITS:
        items = parts[name]
        made = make_choices([(k.fact.question, k.fact.answer, k.fact.relation) for k in items], values)
        choices[name] = [replace(c, context=e.prompt) for c, e in zip(made, splits[name], strict=True)]
    recall = getattr(args, "recall", None) or "contains"
    return Task(
        model=model,
        tokenizer=tokenizer,
        forget=trained(parts["forget"]),
        retain=trained(parts["retain"]),
        splits=splits,
        max_length=args.max_length or 256,
        choices=choices,
        generate_eval=True,
        recall=recall,
        non_members=_in_format([(f.question, f.answer) for f in unknown], tokenizer, prompt_format),
        description={
            "source": args.model,
            "prompt_format": prompt_format,
            "recall": recall,
            "labels": "the model's own answers, up to the first sentence containing the gold answer",
            **real_facts.describe(parts, known),
            "loss_scope": MODEL_LOSS_SCOPE,
            "sizes": {name: len(examples) for name, examples in splits.items()},
        },
    )


def require_lm_extra() -> None:
    """Fail clearly, not with a traceback, when the ``lm`` extra is not installed."""
    try:
        import datasets  # noqa: F401
        import matplotlib  # noqa: F401
        import transformers
    except ImportError as err:
        raise CliError(
            f"this needs the 'lm' extra ({err.name} is missing): pip install 'gradsynth[lm]'"
        ) from err
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_task(args: argparse.Namespace, seed: int, log: Any = print) -> Task:
    """The task the arguments describe; one-line `CliError` for anything unusable."""
    require_lm_extra()
    if args.model is None:
        if getattr(args, "facts", None):
            raise CliError(f"--facts {args.facts} goes with --model (e.g. --model smollm2)")
        if args.forget or args.retain:
            raise CliError("--forget/--retain go with --model; without --model the embedded world is used")
        if getattr(args, "gguf_file", None):
            raise CliError("--gguf-file goes with --model (the folder or Hub id that holds the file)")
        if getattr(args, "eval", None):
            raise CliError(
                "--eval NAME=FILE goes with --model; the embedded world has its own held-out splits"
            )
        if getattr(args, "prompt_format", None) == "chat":
            raise CliError(
                "--prompt-format chat: the embedded world's tokenizer has no chat template "
                "(its model was trained on '<question> Answer:'); drop it or use --model"
            )
        with phase(f"loading the embedded world ({args.world})"):
            task = world_task(args.world, seed, log)
        if getattr(args, "recall", None):
            task.recall = args.recall
            task.description["recall"] = args.recall  # `gradsynth audit` reads the run's measure
        # --dtype is honoured for the world too (it was ignored): the cached weights are float32.
        dtype = getattr(args, "dtype", "float32")
        task.model.to(DTYPES[dtype])
        task.description["dtype"] = dtype
    elif getattr(args, "facts", None):
        task = facts_task(args, seed)
    else:
        task = model_task(args)
    scope = getattr(args, "loss_scope", None)
    if scope is not None:
        task.description["loss_scope"] = scope
    scope = task.description["loss_scope"]
    task.forget, task.retain = with_loss_scope(task.forget, scope), with_loss_scope(task.retain, scope)
    return task
