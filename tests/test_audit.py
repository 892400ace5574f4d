"""The audit on the CI world: the never-learned reference sits at chance, the memorising model does
not, over-forgetting shows; ``unlearn --audit`` and ``gradsynth audit``; bad input is one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import copy_world_cache

from gradsynth.cli import main
from gradsynth.unlearning.audit import RelearnSettings, audit_model
from gradsynth.world.never_learned import (
    forget_facts,
    load_never_learned_model,
    non_member_twins,
    relation_values,
    retain_facts,
)


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    saved = os.environ.get("GRADSYNTH_CACHE")
    os.environ["GRADSYNTH_CACHE"] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop("GRADSYNTH_CACHE", None)
    else:
        os.environ["GRADSYNTH_CACHE"] = saved


@pytest.fixture(scope="module")
def never_learned(world_cache):
    model, tokenizer, info = load_never_learned_model("ci", 0, log=lambda _: None)
    return model, tokenizer, info


def test_twins_are_fresh_people_with_the_forget_facts_answers():
    forget, twins = forget_facts("ci", 0), non_member_twins("ci", 0)
    assert [f.answer for f in twins] == [f.answer for f in forget]
    assert [f.group for f in twins] == [f.group for f in forget]
    assert all(t.question != f.question for t, f in zip(twins, forget, strict=True))
    assert non_member_twins("ci", 0) == twins  # reproducible


def test_the_never_learned_model_is_at_chance_and_the_memorising_one_is_not(world_cache, never_learned):
    from gradsynth.world.cache import load_world_model

    reference, tokenizer, info = never_learned
    assert info["excluded_facts"] == len(forget_facts("ci", 0))
    model, *_ = load_world_model("ci", log=lambda _: None)
    result = audit_model(
        model,
        tokenizer,
        forget_facts("ci", 0),
        non_member_twins("ci", 0),
        retain=retain_facts("ci", 0),
        reference=reference,
        values=relation_values(),
        relearn=RelearnSettings(steps=(1, 5)),
    )
    # Never trained on the forget facts: their twins look the same to it (6 vs 6 facts: steps of 1/36).
    for name, mia in result["reference"]["mia"].items():
        assert abs(mia["auc"] - 0.5) <= 0.2, (name, mia)
    # The world model memorised them: the loss tells members from twins.
    assert result["model"]["mia"]["loss"]["auc"] == 1.0
    assert result["model"]["forget_recall"] == 1.0 > result["reference"]["forget_recall"]
    assert result["model"]["mean_log_truth_ratio"] < 0 < result["reference"]["mean_log_truth_ratio"]
    assert result["forget_quality"] < 0.05  # its truth ratios are not the never-learned model's
    assert set(result["relearning_minus_reference"]) == {"forget", "retain"}
    assert all(len(c) == 2 for c in result["model"]["relearning"].values())


def test_unlearn_audit_reports_the_over_forgetting_and_gradsynth_audit_reads_the_folder(
    world_cache, never_learned, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--steps", "12", "--lr", "2e-3", "--audit", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Forget quality (KS test" in printed and "| reference | forget |" in printed
    audit = json.loads((out / "report.json").read_text())["audit"]
    assert audit["world"] == "ci" and audit["forget"] == 6 == audit["non_members"]
    assert audit["model"]["forget_recall"] == 0.0
    # GA over-forgets: the true answers end below the never-learned model's (log truth ratio higher).
    assert audit["model"]["mean_log_truth_ratio"] > audit["reference"]["mean_log_truth_ratio"]

    scored = tmp_path / "audit"
    assert main(["audit", str(out), "--world", "ci", "--no-relearn", "--out", str(scored)]) == 0
    saved = json.loads((scored / "audit.json").read_text())
    assert saved["model"]["mia"] == audit["model"]["mia"] and "relearn_steps" not in saved


def test_audit_refusals_are_one_line(world_cache, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsynth.world.tokenizer import train_tokenizer

    argv = ["unlearn", "--model", str(tmp_path), "--forget", "f", "--retain", "r", "--audit"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--audit with --model needs --non-members FILE" in err, err
    assert not (tmp_path / "x").exists()

    other = tmp_path / "other"
    tokenizer = train_tokenizer(["an unrelated vocabulary of other words"] * 4, 300)
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    ).save_pretrained(other)  # fmt: skip
    tokenizer.save_pretrained(other)
    from gradsynth.world.cache import load_world_model

    model, world_tokenizer, *_ = load_world_model("ci", log=lambda _: None)
    mine = tmp_path / "mine"
    model.save_pretrained(mine)
    world_tokenizer.save_pretrained(mine)
    capsys.readouterr()
    assert main(["audit", str(mine), "--world", "ci", "--reference-model", str(other), "--no-relearn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gradsynth: error: --reference-model") and "vocabulary" in err[-1], err
    with pytest.raises(ValueError, match="at least 2 folds"):
        RelearnSettings(folds=1)
    assert RelearnSettings(steps=(5, 1, 5)).steps == (1, 5)
    with pytest.raises(ValueError, match="cannot make 3 folds"):
        audit_model(model, world_tokenizer, forget_facts("ci", 0)[:2], non_member_twins("ci", 0),
                    values=relation_values(), relearn=RelearnSettings())  # fmt: skip
    assert Path(mine).is_dir()


def test_forget_target_reference_stops_at_the_never_learned_recall(
    world_cache, never_learned, tmp_path, capsys
):
    from gradsynth.unlearning.encoding import Example, make_batches, prompt_of
    from gradsynth.unlearning.evaluate import split_metrics

    reference, tokenizer, _ = never_learned
    forget = [Example(prompt_of(f.question), f.answer) for f in forget_facts("ci", 0)]
    expected = split_metrics(reference, make_batches(tokenizer, forget, 64, 64))["recall"]
    assert 0 < expected < 1
    out = tmp_path / "run"
    argv = ["unlearn", "--world", "ci", "--forget-target", "reference", "--steps", "30", "--lr", "2e-3"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    protocol = json.loads((out / "report.json").read_text())["settings"]["protocol"]
    assert protocol["forget_target"] == pytest.approx(expected) and protocol["reached"]
    assert f"{100 * expected:.1f}%, the never-learned" in capsys.readouterr().out

    compared = tmp_path / "compare"
    argv = ["compare", "--world", "ci", "--rules", "sago", "--forget-target", "reference", "--steps", "30"]
    assert main([*argv, "--lrs", "2e-3", "--seeds", "0", "--no-progress", "--out", str(compared)]) == 0
    results = (compared / "results.md").read_text()
    assert f"the world model that never learned them (seed 0: {100 * expected:.1f}%)" in results

    argv = [
        "unlearn",
        "--model",
        str(tmp_path),
        "--forget",
        "f",
        "--retain",
        "r",
        "--forget-target",
        "reference",
    ]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "--forget-target reference needs a model that never learned" in capsys.readouterr().err


def test_compare_audit_adds_the_audit_of_every_run(world_cache, never_learned, tmp_path):
    out = tmp_path / "compare"
    argv = ["compare", "--world", "ci", "--rules", "sum,sago", "--forget-target", "0.1", "--steps", "20"]
    assert main([*argv, "--lrs", "2e-3", "--audit", "--no-relearn", "--no-progress", "--out", str(out)]) == 0
    results = (out / "results.md").read_text()
    assert "Audit of the forgetting (forget facts against fresh-name twins)" in results
    for row in ("| ga+sum |", "| ga+sago |", "| never-learned reference |"):
        assert row in results, row
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(set(r["audit"]) >= {"model", "reference", "forget_quality"} for r in runs)
