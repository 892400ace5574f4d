"""The shipped real-knowledge benchmark (`gradsynth.unlearning.real_facts`): the fact file, the
model's own labels, the split by seed, and the command line's ``--facts real`` refusals. No real
model here (tests/test_real_model.py runs it on SmolLM2)."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import one_line

from gradsynth.cli import main
from gradsynth.unlearning import real_facts
from gradsynth.unlearning.answers import contains
from gradsynth.unlearning.real_facts import (
    FORGET_SIZE,
    GENERAL_SIZE,
    MIN_NEIGHBOURS,
    NEIGHBOURS,
    NON_MEMBERS,
    RETAIN_SIZE,
    KnownFact,
    TooFewKnown,
    known_facts,
    non_members,
    own_label,
    split,
)


def test_the_shipped_facts_are_well_formed():
    facts = real_facts.facts()
    assert len(facts) == 248
    assert len({f.question for f in facts}) == len(facts)  # no question twice
    for f in facts:
        assert f.question.endswith("?") and f.answer.strip() and f.relation and f.domain
        assert f.answer.lower() not in f.question.lower().split(), f  # the question gives no answer away
    counts = Counter(f.relation for f in facts)
    assert len(counts) == 13 and min(counts.values()) >= 10
    # Every relation offers distractors for 4-option questions.
    assert all(len(set(v)) >= 4 for v in real_facts.relation_values().values())
    assert len(real_facts.prose()) == 12 and all(len(p.split()) >= 20 for p in real_facts.prose())


@pytest.mark.parametrize(
    ("answer", "said", "label"),
    [
        ("Paris", "The capital of France is Paris.", "The capital of France is Paris."),
        ("Paris", "The Tower is in Paris, France. It was built in 1889.", "The Tower is in Paris, France."),
        # The gold answer first appears in the second sentence: both are kept.
        ("Oslo", "Norway is cold. Its capital is Oslo. Cold.", "Norway is cold. Its capital is Oslo."),
        ("7", "A week has seven days!\nMore text", "A week has seven days!"),
        ("Canberra", "  I do not know  ", "I do not know"),  # not contained: all of it
    ],
)  # fmt: skip
def test_own_label_is_the_answer_up_to_the_first_sentence_that_contains_the_gold_one(answer, said, label):
    assert own_label(answer, said) == label


def _fact(relation: str, i: int) -> real_facts.RealFact:
    return real_facts.RealFact(f"q {relation} {i}?", f"a{relation}{i}", relation, "d")


def _known(sizes: dict[str, int]) -> list[KnownFact]:
    return [KnownFact(_fact(r, i), f"it is a{r}{i}.") for r, n in sizes.items() for i in range(n)]


def test_known_facts_keeps_the_facts_whose_answer_the_model_said():
    candidates = (_fact("x", 0), _fact("x", 1), _fact("y", 0))
    said = {"q x 0?": "Surely ax0.", "q x 1?": "No idea.", "q y 0?": "It is ay0, I think"}
    asked = []

    def said_to(questions):
        asked.append(list(questions))
        return [said[q] for q in questions]

    known = known_facts(said_to, candidates)
    assert asked == [[c.question for c in candidates]]  # one batch of generations
    assert [k.fact for k in known] == [candidates[0], candidates[2]]
    assert known[1].label == "It is ay0, I think"


def test_split_deals_out_disjoint_sets_by_relation():
    known = _known({"big": 30, "mid": 16, "small": 13, "other": 40})  # small: < forget + neighbours
    relations = []
    for seed in range(4):
        parts = split(known, seed)
        assert split(known, seed) == parts  # deterministic
        ids = [k.fact.question for p in parts.values() for k in p]
        assert len(ids) == len(set(ids))  # disjoint
        forget_rel = {k.fact.relation for k in parts["forget"]}
        assert len(forget_rel) == 1 and len(parts["forget"]) == FORGET_SIZE
        (rel,) = forget_rel
        relations.append(rel)
        assert {k.fact.relation for k in parts["neighbour"]} == {rel}
        assert MIN_NEIGHBOURS <= len(parts["neighbour"]) <= NEIGHBOURS
        assert rel not in {k.fact.relation for k in parts["retain"] + parts["general"]}
        assert len(parts["retain"]) == RETAIN_SIZE and 1 <= len(parts["general"]) <= GENERAL_SIZE
    # Eligible relations, most known first, taken in turn by the seeds; "small" never.
    assert relations == ["other", "big", "mid", "other"]
    assert split(known, 0)["forget"] != split(known, 3)["forget"]  # same relation, other facts


def test_non_members_are_unknown_facts_of_the_forget_relation_first():
    shipped = real_facts.facts()
    relation = "capital"
    known = [KnownFact(f, f.answer) for f in shipped if f.relation == relation][:40]
    known += [KnownFact(f, f.answer) for f in shipped if f.relation != relation][::2]
    picked = non_members(known, 0, relation)
    recalled = {k.fact for k in known}
    assert len(picked) == NON_MEMBERS and not recalled & set(picked)
    unknown_same = [f for f in shipped if f.relation == relation and f not in recalled]
    head = picked[: len(unknown_same)]
    assert 0 < len(unknown_same) < NON_MEMBERS and set(head) == set(unknown_same)
    assert relation not in {f.relation for f in picked[len(unknown_same) :]}
    assert non_members(known, 0, relation) == picked and non_members(known, 1, relation) != picked


def test_audit_with_the_shipped_facts_needs_no_non_members_file(tmp_path, capsys):
    # Refused for another reason (the model folder is missing), not for the lack of --non-members.
    code = main(["unlearn", "--model", str(tmp_path / "none"), "--facts", "real", "--audit", "--steps", "1"])
    assert code == 2
    assert "--non-members" not in one_line(capsys, "--model")


def test_split_refuses_too_few_known_facts():
    with pytest.raises(TooFewKnown, match="no relation has 14 known"):
        split(_known({"a": 13, "b": 13}), 0)
    with pytest.raises(TooFewKnown, match="retain set needs 24"):
        split(_known({"a": 20, "b": 10}), 0)


def test_shipped_answers_are_contained_in_their_own_sentences():
    # The scoring rule and the labels agree: a label made from a containing answer contains it.
    for f in real_facts.facts()[:40]:
        label = own_label(f.answer, f"Well. The answer is {f.answer}. Done.")
        assert contains(f.answer, label) and label == f"Well. The answer is {f.answer}."


def test_facts_without_a_model_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["unlearn", "--facts", "real", "--out", str(out), "--no-progress"]) == 2
    one_line(capsys, "--facts real goes with --model")
    assert not out.exists()


def test_facts_with_files_is_refused(tmp_path, capsys):
    forget = tmp_path / "f.jsonl"
    forget.write_text('{"question": "q?", "answer": "a"}\n')
    out = tmp_path / "out"
    args = [
        "unlearn",
        "--model",
        "smollm2",
        "--facts",
        "real",
        "--forget",
        str(forget),
        "--retain",
        str(forget),
    ]
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    one_line(capsys, "--facts real brings its own splits", "drop --forget/--retain/--eval")
    assert not out.exists()


def test_the_package_data_globs_ship_the_benchmark_files():
    import fnmatch
    from pathlib import Path

    import tomllib

    import gradsynth.unlearning

    root = Path(gradsynth.unlearning.__file__).parent
    pyproject = root.parents[1] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][
        "gradsynth.unlearning"
    ]
    files = sorted(p.relative_to(root).as_posix() for p in (root / "data_files").iterdir())
    assert files == ["data_files/real_facts.jsonl", "data_files/real_prose.txt"]
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
