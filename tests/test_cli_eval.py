"""``unlearn --eval-tasks/--eval-every``, ``gradsynth eval`` and ``compare --rank-by`` on the CI world.

lm-eval runs offline on the world's own multiple-choice tasks (written at run time) and on a
multiple-choice and a generation task whose YAML and JSONL the test writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import copy_world_cache

from gradsynth.cli import main
from gradsynth.world.splits import SPLIT_NAMES


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    """A private cache with a copy of the session's CI world model."""
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    saved = {k: os.environ.get(k) for k in ("GRADSYNTH_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(GRADSYNTH_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def user_tasks(tmp_path):
    """One multiple-choice and one generation task over a few of the world's facts."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [
        {"question": "What is 10 plus 10?", "answer": "20", "options": ["20", "30", "40", "50"], "label": 0},
        {"question": "What is 12 plus 13?", "answer": "25", "options": ["35", "25", "45", "15"], "label": 1},
    ]
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
    )
    (folder / "my_mc.yaml").write_text(
        "task: my_mc\n" + head + "output_type: multiple_choice\ndoc_to_text: '{{question}} Answer:'\n"
        "doc_to_choice: options\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "my_gen.yaml").write_text(
        "task: my_gen\n" + head + "output_type: generate_until\ndoc_to_text: '{{question}} Answer:'\n"
        "doc_to_target: ' {{answer}}'\ngeneration_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 4\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


def test_unlearn_evaluates_tasks_and_curves_and_eval_scores_the_saved_model(
    world_cache, user_tasks, tmp_path
):
    pytest.importorskip("lm_eval")
    out = tmp_path / "run"
    args = ["unlearn", "--world", "ci", "--steps", "4", "--lr", "3e-3", "--out", str(out), "--no-progress"]
    tasks = ["--eval-tasks", "world_forget,world_general,my_mc,my_gen", "--include-path", str(user_tasks)]
    assert main([*args, *tasks, "--eval-every", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    metrics, bench = report["metrics"], report["benchmarks"]
    # The world's questions through lm-eval give exactly the in-process accuracy, before and after.
    for when in ("before", "after"):
        for split in ("forget", "general"):
            assert bench[when][f"world_{split}"]["acc"] == metrics[when][split]["mc_acc"]
        assert set(bench[when]["my_gen"]) == {"exact_match"}
    assert metrics["before"]["forget"]["mc_acc"] == 1.0
    assert report["general_score_kept"] == pytest.approx(
        metrics["after"]["general"]["mc_acc"] / metrics["before"]["general"]["mc_acc"]
    )
    acc_before, acc_after = bench["before"]["my_mc"]["acc"], bench["after"]["my_mc"]["acc"]
    assert report["benchmarks_kept"]["my_mc"]["acc"] == (acc_after / acc_before if acc_before else None)
    curve = report["eval_curve"]
    assert [c["step"] for c in curve] == [0, 2, 4]
    assert curve[0]["splits"] == metrics["before"] and curve[-1]["splits"] == metrics["after"]
    assert list(curve[1]["splits"]) == list(SPLIT_NAMES)
    assert set(curve[1]["benchmarks"]) == set(bench["after"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # `gradsynth eval` on the saved folder: same weights, same numbers.
    scored = tmp_path / "scored"
    code = main(
        ["eval", str(out), "--tasks", "my_mc,my_gen", "--include-path", str(user_tasks), "--out", str(scored)]
    )
    assert code == 0
    results = json.loads((scored / "eval.json").read_text())["results"]
    assert results == {k: bench["after"][k] for k in ("my_mc", "my_gen")}


def test_compare_ranks_by_a_metric_and_draws_the_tradeoff(world_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--quick", "--rules", "sum,sago", "--lrs", "3e-3", "--steps", "3", "--no-progress"]
    assert main([*base, "--rank-by", "general.nope", "--out", str(out)]) == 2
    assert "not a metric of these runs" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--rank-by", "forget.mc_acc", "--out", str(out)]) == 0
    results = (out / "results.md").read_text()
    assert "Ranked by forget.mc_acc (lower is better)" in results
    ranked = [
        line.split("|")[3].strip() for line in results.split("Ranked by")[1].splitlines() if "| 0.003" in line
    ]
    runs = json.loads((out / "results.json").read_text())["runs"]
    by_rule = {r["rule"]: r["after"]["forget"]["mc_acc"] for r in runs}
    assert ranked == sorted(by_rule, key=by_rule.get)
    assert all(r["utility_kept"] is not None for r in runs)
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv",
    [
        ["unlearn", "--world", "ci", "--eval-tasks", "mmlu"],
        ["eval", "somewhere", "--tasks", "mmlu"],
    ],
)
def test_without_the_eval_extra_one_line_names_it(argv, world_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'gradsynth[eval]'" in err
    assert not (tmp_path / "o").exists()


def test_include_path_must_be_a_folder(world_cache, tmp_path, capsys):
    missing = Path(tmp_path / "none")
    code = main(["unlearn", "--world", "ci", "--eval-tasks", "x", "--include-path", str(missing)])
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_eval_with_few_shot_and_the_chat_template(world_cache, user_tasks, tmp_path, capsys):
    """``--num-fewshot`` and ``--chat-template`` reach lm-eval; a tokenizer without a template is refused."""
    pytest.importorskip("lm_eval")
    from gradsynth.world.cache import load_world_model

    model, tokenizer, *_ = load_world_model("ci", log=lambda _: None)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    args = ["eval", "--tasks", "my_mc", "--include-path", str(user_tasks)]
    assert main([*args, str(plain), "--chat-template"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (transformers' weight-loading bar above it)
    assert err[-1].startswith("gradsynth: error: --chat-template") and "has no chat template" in err[-1], err

    chat = tmp_path / "chat"
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model.save_pretrained(chat)
    tokenizer.save_pretrained(chat)
    out = tmp_path / "scored"
    assert main([*args, str(chat), "--chat-template", "--num-fewshot", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["num_fewshot"] == 1 and saved["chat_template"] is True
    assert 0.0 <= saved["results"]["my_mc"]["acc"] <= 1.0
