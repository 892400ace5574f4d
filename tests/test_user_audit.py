"""The audit of a user's model (``--forget`` against ``--non-members``, beside ``--reference-model``)
on tiny Llamas trained here: the model that learned the forget facts is told apart from one that
did not; ``--forget-target reference`` stops at the reference's recall; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from helpers import one_line

from gradsynth.cli import main
from gradsynth.cli.user_audit import perturbation_values
from gradsynth.unlearning.audit import AuditFact

COLOURS = ["red", "blue", "green"]
PEOPLE = ["Ann", "Bob", "Cyd", "Dan", "Eve", "Fay"]
FORGET = [(f"What colour does {n} like?", COLOURS[i % 3]) for i, n in enumerate(PEOPLE)]
NON_MEMBERS = [
    (f"What colour does {n} like?", COLOURS[i % 3])
    for i, n in enumerate(["Gus", "Hal", "Ivy", "Jon", "Kim", "Lou"])
]
RETAIN = [(f"Which city is {n} from?", c) for n, c in zip(PEOPLE, ["Rome", "Oslo", "Lima"] * 2, strict=True)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _qa(facts: list[tuple[str, str]]) -> list[dict]:
    return [{"question": q, "answer": a} for q, a in facts]


def _trained(tokenizer, facts: list[tuple[str, str]], folder: Path, model_type: str = "llama") -> Path:
    """A tiny model of one fixed initialisation, fine-tuned until it recalls ``facts`` (if any)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from gradsynth.unlearning.encoding import Example, make_batches, prompt_of
    from gradsynth.unlearning.objectives import nll_loss

    torch.manual_seed(0)
    if model_type == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
        )
    if facts:
        (batch,) = make_batches(tokenizer, [Example(prompt_of(q), a) for q, a in facts], 64, 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(150):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            optimizer.zero_grad()
            nll_loss(logits, batch["labels"]).backward()
            optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from gradsynth.world.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("user-audit")
    texts = [f"{q} Answer: {a}" for q, a in (*FORGET, *NON_MEMBERS, *RETAIN)]
    tokenizer = train_tokenizer(texts * 4, 300)
    other_tokenizer = train_tokenizer(["an unrelated vocabulary of other words"] * 4, 280)
    return {
        # learned the forget and retain facts: the model to audit
        "model": _trained(tokenizer, FORGET + RETAIN, root / "model"),
        # never saw the forget facts: the reference
        "reference": _trained(tokenizer, RETAIN, root / "reference"),
        # learned half the forget facts: a reference whose recall is known (50%)
        "half": _trained(tokenizer, FORGET[:3] + RETAIN, root / "half"),
        "other_vocabulary": _trained(other_tokenizer, [], root / "other-vocabulary"),
        "other_architecture": _trained(tokenizer, [], root / "gpt2", model_type="gpt2"),
        "forget": _write(root / "forget.jsonl", _qa(FORGET)),
        "non_members": _write(root / "non-members.jsonl", _qa(NON_MEMBERS)),
        "retain": _write(root / "retain.jsonl", _qa(RETAIN)),
        "text_only": _write(root / "text.jsonl", [{"text": f"{q} {a}"} for q, a in NON_MEMBERS]),
        "no_answer": _write(root / "no-answer.jsonl", [{"question": q} for q, _ in NON_MEMBERS]),
        "empty": _write(root / "empty.jsonl", []),
        "two": _write(root / "two.jsonl", _qa(FORGET[:2])),
    }


def test_perturbations_are_the_other_answers_drawn_per_fact():
    facts = [AuditFact("q1", "a"), AuditFact("q2", "b"), AuditFact("q3", "a")]
    grouped, values = perturbation_values(facts, ["a", "b", "c", "b"])
    assert [f.group for f in grouped] == ["#0", "#1", "#2"]
    assert values == {"#0": ["a", "b", "c"], "#1": ["b", "a", "c"], "#2": ["a", "b", "c"]}
    grouped, values = perturbation_values(facts, ["a", "b", "c", "d"], per_fact=1)
    assert all(
        len(v) == 2 and v[0] == f.answer and v[1] != f.answer
        for f, v in zip(facts, values.values(), strict=True)
    )


def test_gradsynth_audit_tells_the_learned_facts_from_non_members(files, tmp_path, capsys):
    out = tmp_path / "audit"
    argv = ["audit", str(files["model"]), "--forget", str(files["forget"])]
    argv += ["--non-members", str(files["non_members"]), "--retain", str(files["retain"])]
    assert main([*argv, "--reference-model", str(files["reference"]), "--out", str(out)]) == 0
    assert "| reference | forget |" in capsys.readouterr().out
    audit = json.loads((out / "audit.json").read_text())
    assert audit["source"] == "files" and audit["forget"] == 6 == audit["non_members"]
    model, reference = audit["model"], audit["reference"]
    assert model["forget_recall"] == 1.0 and reference["forget_recall"] == 0.0
    # Learned: every member is more likely than every non-member of the same answer set.
    assert model["mia"]["loss"]["auc"] == 1.0
    assert model["mean_log_truth_ratio"] < 0 and model["ranks_last"] == 0
    assert model["mean_log_truth_ratio"] < reference["mean_log_truth_ratio"]
    assert 0 < audit["forget_quality"] < 1
    assert model["relearning"]["forget"][-1] == 1.0 > reference["relearning"]["forget"][-1]
    assert set(audit["relearning_minus_reference"]) == {"forget", "retain"}

    itself = tmp_path / "itself"
    assert main([*argv, "--reference-model", str(files["model"]), "--no-relearn", "--out", str(itself)]) == 0
    same = json.loads((itself / "audit.json").read_text())
    assert same["reference"] == same["model"] and same["forget_quality"] == 1.0  # KS of a sample with itself

    alone = tmp_path / "alone"
    assert main([*argv, "--no-relearn", "--out", str(alone)]) == 0
    found = json.loads((alone / "audit.json").read_text())
    assert "reference" not in found and found["model"]["mia"] == model["mia"]


def test_the_relearning_attacks_steps_and_folds_are_flags(files, tmp_path, capsys):
    out = tmp_path / "audit"
    argv = ["audit", str(files["model"]), "--forget", str(files["forget"])]
    argv += ["--non-members", str(files["non_members"]), "--relearn-steps", "3,1", "--relearn-folds", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| k=1 | k=3 |" in printed and "k=20" not in printed
    relearned = json.loads((out / "audit.json").read_text())["model"]["relearning"]["forget"]
    assert len(relearned) == 2 and all(0 <= r <= 1 for r in relearned)


def test_unlearn_and_compare_audit_a_users_model(files, tmp_path, capsys):
    data = ["--forget", str(files["forget"]), "--retain", str(files["retain"])]
    data += ["--non-members", str(files["non_members"]), "--reference-model", str(files["reference"])]
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(files["model"]), *data, "--steps", "2", "--lr", "1e-3", "--audit"]
    assert main([*argv, "--no-relearn", "--no-progress", "--out", str(out)]) == 0
    assert f"forget facts against --non-members {files['non_members']}" in capsys.readouterr().out
    audit = json.loads((out / "report.json").read_text())["audit"]
    assert audit["source"] == "files" and audit["reference"]["forget_recall"] == 0.0
    assert audit["recall"] == "contains"  # the run's own measure (unlearn --model's default)
    assert 0 <= audit["forget_quality"] <= 1

    compared = tmp_path / "compare"
    argv = ["compare", "--model", str(files["model"]), *data, "--rules", "sum,sago", "--lrs", "1e-3"]
    assert main([*argv, "--steps", "2", "--audit", "--no-progress", "--out", str(compared)]) == 0
    results = (compared / "results.md").read_text()
    assert "forget facts against the non-member facts" in results
    assert "| relearned % (k=20, forget) | relearned % (k=20, retain) |" in results
    for row in ("| ga+sum |", "| ga+sago |", "| never-learned reference |"):
        assert row in results, row


def test_forget_target_reference_is_the_reference_models_recall(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradsynth.unlearning.encoding import Example, make_batches, prompt_of
    from gradsynth.unlearning.evaluate import split_metrics

    half = AutoModelForCausalLM.from_pretrained(files["half"])
    examples = [Example(prompt_of(q), a) for q, a in FORGET]
    batches = make_batches(AutoTokenizer.from_pretrained(files["half"]), examples, 64, 256)
    expected = split_metrics(half, batches)["recall"]
    assert 0 < expected < 1  # it learned 3 of the 6 (and may guess others' colours)
    out = tmp_path / "run"
    argv = ["unlearn", "--model", str(files["model"]), "--forget", str(files["forget"])]
    argv += ["--retain", str(files["retain"]), "--forget-target", "reference", "--steps", "3"]
    assert main([*argv, "--reference-model", str(files["half"]), "--no-progress", "--out", str(out)]) == 0
    assert f"Forget target: {100 * expected:.1f}%, --reference-model's recall" in capsys.readouterr().out
    protocol = json.loads((out / "report.json").read_text())["settings"]["protocol"]
    assert protocol["forget_target"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("flags", "parts"),
    [
        (["--reference-model", "other_vocabulary"], ["--reference-model", "another vocabulary"]),
        (["--reference-model", "other_architecture"], ["a gpt2 model, the audited one is llama"]),
        (["--non-members", "text_only"], ["--non-members", "has 'text' rows", "'question' and 'answer'"]),
        (["--non-members", "no_answer"], ["--non-members", "has columns ['question']"]),
        (["--non-members", "empty"], ["--non-members", "no rows"]),
    ],
)
def test_bad_audit_inputs_are_one_line(files, tmp_path, capsys, flags, parts):
    chosen = {"--non-members": "non_members", **dict(zip(flags[::2], flags[1::2], strict=True))}
    given = [x for flag, name in chosen.items() for x in (flag, str(files[name]))]
    for command in (
        ["audit", str(files["model"]), "--forget", str(files["forget"]), "--no-relearn"],
        ["unlearn", "--model", str(files["model"]), "--forget", str(files["forget"]), "--audit"],
    ):
        out = tmp_path / command[0]
        extra = (
            ["--retain", str(files["retain"]), "--steps", "1", "--no-progress"]
            if command[0] == "unlearn"
            else []
        )
        assert main([*command, *given, *extra, "--out", str(out)]) == 2
        one_line(capsys, *parts)
        assert not out.exists()


def test_flags_that_do_not_fit_together_are_one_line(files, tmp_path, capsys):
    model, forget, non = str(files["model"]), str(files["forget"]), str(files["non_members"])
    user = ["unlearn", "--model", model, "--forget", forget, "--retain", str(files["retain"])]
    cases = [
        ([*user, "--audit"], ["--audit with --model needs --non-members FILE"]),
        ([*user, "--non-members", non], ["--non-members goes with --audit"]),
        ([*user, "--forget-target", "reference"], ["--forget-target reference needs", "--reference-model"]),
        (["unlearn", "--world", "ci", "--audit", "--non-members", non], ["--non-members goes with --model"]),
        (["compare", "--audit", "--reference-model", model], ["--reference-model goes with --model"]),
        (["audit", model, "--forget", forget], ["--forget needs --non-members FILE too"]),
        (["audit", model, "--non-members", non], ["--non-members needs --forget FILE too"]),
        (["audit", model, "--forget", forget, "--non-members", non, "--seed", "1"], ["--seed goes with"]),
        (["audit", model, "--retain", forget], ["--retain goes with --forget"]),
        (
            [*user[:3], "--forget", str(files["two"]), *user[5:], "--audit", "--non-members", non],
            ["--forget: 2 facts cannot make the relearning attack's 3 folds", "--no-relearn"],
        ),
        (["audit", model, "--prompt-format", "plain"], ["--prompt-format goes with --forget"]),
        (["audit", model, "--relearn-steps", "1,x"], ["--relearn-steps '1,x'", "list of int"]),
        (["audit", model, "--relearn-steps", "0,5"], ["--relearn-steps '0,5'", "at least 1"]),
        (["audit", model, "--relearn-folds", "1"], ["--relearn-folds 1", "at least 2"]),
        (
            [*user, "--audit", "--non-members", non, "--relearn-folds", "7"],
            ["--forget: 6 facts cannot make the relearning attack's 7 folds", "fewer --relearn-folds"],
        ),
        (
            ["unlearn", "--world", "ci", "--audit", "--relearn-folds", "1000"],
            ["the forget set:", "cannot make the relearning attack's 1000 folds"],
        ),
        (["compare", "--world", "ci", "--audit", "--relearn-folds", "1", "--jobs", "2"], ["--relearn-folds"]),
    ]  # fmt: skip
    for argv, parts in cases:
        out = tmp_path / "out"
        assert main([*argv, "--out", str(out)]) == 2, argv
        one_line(capsys, *parts)
        assert not out.exists()


def test_auditing_a_saved_run_against_another_seed_or_world_is_refused(files, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(files["model"], run)
    report = {"settings": {"seed": 3, "task": {"source": "embedded world (ci)"}}}
    (run / "report.json").write_text(json.dumps(report))
    for flags, parts in (
        (["--seed", "1"], ["--seed 3 (report.json), not 1", "pass --seed 3"]),
        (["--world", "default"], ["the 'ci' world", "pass --world ci"]),
    ):
        assert main(["audit", str(run), *flags, "--out", str(tmp_path / "out")]) == 2
        one_line(capsys, *parts)
        assert not (tmp_path / "out").exists()
    report["settings"]["task"]["source"] = str(files["model"])
    (run / "report.json").write_text(json.dumps(report))
    assert main(["audit", str(run), "--world", "ci"]) == 2
    one_line(capsys, "unlearned on files, not the embedded world", "--forget FILE --non-members FILE")


def test_forget_recall_is_read_as_the_run_reads_it(tmp_path, capsys):
    """A model that answers in a sentence ("It is red.") recalls every forget fact by ``contains``
    and none by ``exact`` (which asks for "red" and the end right after the prompt); the audit reads
    recall, before the attack and along its curve, by the measure it is given (contains for a
    model's files, as unlearn --model stops by it) and says which in its table."""
    from gradsynth.world.tokenizer import train_tokenizer

    sentences = [(q, f"It is {a}.") for q, a in FORGET]
    texts = [f"{q} Answer: {a}" for q, a in (*sentences, *NON_MEMBERS)]
    folder = _trained(train_tokenizer(texts * 4, 300), sentences, tmp_path / "sentences")
    forget = _write(tmp_path / "forget.jsonl", _qa(FORGET))
    non_members = _write(tmp_path / "non-members.jsonl", _qa(NON_MEMBERS))
    # One step at a negligible rate: the curve must read what the model recalls before the attack.
    argv = ["audit", str(folder), "--forget", str(forget), "--non-members", str(non_members)]
    argv += ["--relearn-steps", "1", "--relearn-folds", "2", "--relearn-lr", "1e-12"]
    found = {}
    for recall in ("contains", "exact"):
        out = tmp_path / recall
        flags = [] if recall == "contains" else ["--recall", "exact"]  # contains: the default
        assert main([*argv, *flags, "--out", str(out)]) == 0
        found[recall] = json.loads((out / "audit.json").read_text())
        printed = capsys.readouterr().out
        words = "answer in the greedy generation" if recall == "contains" else "answer and end teacher-forced"
        assert f"forget recall ({words})" in printed, printed
    assert found["contains"]["recall"] == "contains" and found["exact"]["recall"] == "exact"
    assert found["contains"]["model"]["forget_recall"] == 1.0
    assert found["exact"]["model"]["forget_recall"] == 0.0
    assert found["contains"]["model"]["relearning"]["forget"] == [1.0]
    assert found["exact"]["model"]["relearning"]["forget"] == [0.0]


def test_audit_reads_the_recall_a_saved_run_recorded(tmp_path):
    from gradsynth.cli.audit_command import _recorded_recall

    run = tmp_path / "run"
    run.mkdir()
    assert _recorded_recall(str(run)) is None  # no report: the audit's own default
    for recorded, read in (("contains", "contains"), ("exact", "exact"), ("other", None)):
        (run / "report.json").write_text(json.dumps({"settings": {"task": {"recall": recorded}}}))
        assert _recorded_recall(str(run)) == read


def test_relearning_labels_are_the_runs_training_answers_of_the_same_facts():
    from gradsynth.cli.user_audit import audit_facts, with_labels
    from gradsynth.unlearning.audit import _trained_examples
    from gradsynth.unlearning.encoding import Example

    scored = [Example("Q: where? A:", "Paris", separator=""), Example("Q: who? A:", "Ann", separator="")]
    trained = [Example(e.prompt, f"It is {e.answer}.", separator="") for e in scored]
    facts = with_labels(audit_facts(scored, "--forget"), trained)
    assert [f.answer for f in facts] == ["Paris", "Ann"]  # what every score reads
    assert [e.answer for e in _trained_examples(facts)] == ["It is Paris.", "It is Ann."]
    assert [e.prompt for e in _trained_examples(facts)] == [e.prompt for e in scored]
    with pytest.raises(ValueError, match="same order"):
        with_labels(audit_facts(scored, "--forget"), trained[::-1])
