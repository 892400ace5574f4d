"""Evaluation like the paper: multiple-choice questions from facts, lm-eval on a model in memory, ROUGE-L.

lm-eval runs offline here on task YAMLs and JSONL files the tests write (one multiple-choice
task, one generation task), on a tiny randomly initialised Llama with the CI world's tokenizer:
its answers are far from perfect, so agreement between two scorers is a real check.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gradsynth.unlearning.multiple_choice import chance_level, make_choices, mc_accuracy, write_lm_eval_task
from gradsynth.world import SIZES, build_world, split_world

SIZE = SIZES["ci"]


def _world_choices():
    world = build_world(SIZE, 0)
    values: dict[str, list[str]] = {}
    for fact in (*world.people, *world.sums):
        values.setdefault(fact.relation, []).append(fact.answer)
    splits = split_world(world, SIZE, 0).by_name()
    facts = {name: [(f.question, f.answer, f.relation) for f in fs] for name, fs in splits.items()}
    return world, values, facts


def test_each_fact_becomes_a_four_option_question_with_distractors_of_the_same_relation():
    _, values, facts = _world_choices()
    for name, split in facts.items():
        choices = make_choices(split, values)
        assert len(choices) == len(split)
        for (question, answer, relation), choice in zip(split, choices, strict=True):
            assert choice.context == f"{question} Answer:"
            assert choice.options[choice.answer] == answer
            expected = min(4, len(set(values[relation])))  # all values when the world has fewer
            assert len(choice.options) == expected and len(set(choice.options)) == expected, name
            assert set(choice.options) <= set(values[relation])
        # Deterministic, and a question does not depend on which other facts share its split.
        assert make_choices(split, values) == choices
        assert make_choices(split[1:], values) == choices[1:]
    positions = [c.answer for c in make_choices(facts["retain"], values)]
    assert len(set(positions)) == 4  # the true answer is not always in the same place
    assert any(len(c.options) == 4 for c in make_choices(facts["retain"], values))
    assert chance_level(make_choices(facts["general"], values)) == pytest.approx(0.25)


def test_a_relation_with_few_values_gives_fewer_options_and_one_value_is_refused():
    choices = make_choices([("Q?", "a", "r")], {"r": ["a", "b"]})
    assert sorted(choices[0].options) == ["a", "b"] and chance_level(choices) == 0.5
    with pytest.raises(ValueError, match="no distractor"):
        make_choices([("Q?", "a", "r")], {"r": ["a", "a"]})


@pytest.fixture(scope="module")
def tiny_model():
    """A random 2-layer Llama with the CI world's tokenizer: a model that knows nothing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsynth.world.cache import world_examples
    from gradsynth.world.tokenizer import train_tokenizer

    world = build_world(SIZE, 0)
    tokenizer = train_tokenizer([f"{e.prompt} {e.answer}" for e in world_examples(world)], SIZE.vocab_size)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<eos>", "?"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_in_process_accuracy_agrees_exactly_with_lm_eval_acc(tiny_model, tmp_path, monkeypatch):
    """Same questions, same model: mc_accuracy equals lm-eval's acc on the task files written for it;
    a generation task runs too, and --limit limits."""
    pytest.importorskip("lm_eval")
    import json

    from gradsynth.unlearning.benchmarks import evaluate_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = tiny_model
    _, values, facts = _world_choices()
    ours = {}
    for name, split in facts.items():
        choices = make_choices(split, values)
        ours[f"world_{name}"] = mc_accuracy(model, tokenizer, choices)
        write_lm_eval_task(choices, tmp_path, f"world_{name}")
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _ in facts["forget"]))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_TASK.format(data=json.dumps(str(data))))

    scores = evaluate_tasks(model, tokenizer, [*ours, "tiny_gen"], include_path=tmp_path)
    assert {task: scores[task]["acc"] for task in ours} == ours
    assert any(0 < acc < 1 for acc in ours.values())  # not a trivially perfect or null model
    assert scores["tiny_gen"] == {"exact_match": pytest.approx(scores["tiny_gen"]["exact_match"])}
    assert 0 <= scores["tiny_gen"]["exact_match"] <= 1
    assert not model.training


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    from gradsynth.unlearning.benchmarks import EvalExtraMissing, evaluate_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(EvalExtraMissing, match=r"pip install 'gradsynth\[eval\]'"):
        evaluate_tasks(object(), object(), ["mmlu"])


def _lcs_recall_before(reference: str, generated: str) -> float:
    """gradsynth's hand-written ROUGE-L recall before it used rouge-score: the oracle of the check."""
    ref, gen = reference.lower().split(), generated.lower().split()
    if not ref:
        return 0.0
    previous = [0] * (len(gen) + 1)
    for word in ref:
        current = [0]
        for j, other in enumerate(gen):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


FIXED_SET = [
    ("the oboe", "The oboe"),
    ("a b c d", "a x c y d"),
    ("a b c d", "d c b a"),
    ("rye bread", ""),
    ("", "anything"),
    ("smoked fish", "he eats smoked fish and figs"),
    ("64", "the sum is 64 or 46"),
    ("a heron", "an owl and a heron"),
    ("Tavik Orlune was born in Velmora", "born in Velmora was Tavik"),
]


@pytest.mark.parametrize(("reference", "generated"), FIXED_SET)
def test_rouge_l_by_rouge_score_gives_the_numbers_of_the_hand_written_one(reference, generated):
    pytest.importorskip("rouge_score")
    from gradsynth.unlearning.generation import rouge_l_recall

    assert rouge_l_recall(reference, generated) == _lcs_recall_before(reference, generated)


def test_rouge_l_drops_punctuation_unlike_the_old_whitespace_split():
    """The documented difference: rouge-score's words are runs of [a-z0-9]."""
    pytest.importorskip("rouge_score")
    from gradsynth.unlearning.generation import rouge_l_recall

    assert rouge_l_recall("Velmora", "Velmora.") == 1.0
    assert _lcs_recall_before("Velmora", "Velmora.") == 0.0


def test_share_kept_and_smoothing():
    from gradsynth.unlearning.report import general_kept, kept_shares, smooth

    before = {"general": {"nll": 0.1, "recall": 1.0, "mc_acc": 0.8}, "forget": {"nll": 0.1, "recall": 1.0}}
    after = {"general": {"nll": 0.5, "recall": 0.5, "mc_acc": 0.6}, "forget": {"nll": 9.0, "recall": 0.0}}
    assert kept_shares(before, after) == {
        "general": {"recall": 0.5, "mc_acc": pytest.approx(0.75)},
        "forget": {"recall": 0.0},
    }
    assert general_kept(before, after) == pytest.approx(0.75)
    assert general_kept({"forget": before["forget"]}, {"forget": after["forget"]}) is None
    nan = float("nan")
    assert smooth([1.0, 3.0, nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
