"""``gradsynth unlearn`` at scale: --lora-rank (adapters, merged or adapter-only saving) and
--gradient-checkpointing, on the CI world; every bad input refused with one line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_world_cache
from helpers import cache_env

from gradsynth.cli import main

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402  (comes with transformers)

LORA = ["--lora-rank", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    with cache_env(cache):
        yield cache / Path(ci_world_master).name


def _unlearn(out: Path, *flags: str) -> dict:
    code = main(["unlearn", "--world", "ci", "--steps", "3", "--out", str(out), "--no-progress", *flags])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def _rescore(model) -> dict:
    """The CI world's splits scored on ``model`` as the run scores them."""
    from gradsynth.cli.run_one import evaluate, evaluation_batches
    from gradsynth.cli.sources import world_task

    task = world_task("ci", 0, log=lambda _: None)
    return evaluate(model.eval(), evaluation_batches(task), task)


def _close(scores: dict, reported: dict) -> None:
    for split, metrics in reported.items():
        for name, value in metrics.items():
            if isinstance(value, float):
                # The merged weights round W + s*B@A once; the run's forward rounded the two terms apart.
                assert scores[split][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, name)


def test_lora_trains_only_the_adapters_and_the_merged_model_reloads_and_rescores(world_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    report = _unlearn(tmp_path / "run", *LORA, "--lora-target-modules", "q_proj,v_proj")
    assert report["settings"]["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "saved": "merged",
    }
    saved = load_file(tmp_path / "run" / "model.safetensors")
    original = load_file(world_cache / "model.safetensors")
    assert set(saved) == set(original)  # a plain model: no lora_ tensors, no base_model prefix
    changed = {name for name in saved if not torch.equal(saved[name], original[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    _close(_rescore(reloaded), report["metrics"]["after"])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's
def test_save_adapter_writes_the_peft_adapter_alone_which_reloads_onto_the_base(world_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    report = _unlearn(
        tmp_path / "run",
        *LORA,
        "--save-adapter",
        "--lora-target-modules",
        "all-linear",
        "--gradient-checkpointing",
    )
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    base = AutoModelForCausalLM.from_pretrained(world_cache, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "run")
    _close(_rescore(model), report["metrics"]["after"])


def test_lora_npo_and_kl_references_are_the_model_with_adapters_disabled(world_cache, tmp_path):
    # B = 0 at the start: at step 1 the model is its reference, so NPO's loss is (2/beta) log 2
    # and the KL to the reference is 0; both only if the references are the adapters-off model.
    report = _unlearn(tmp_path / "run", *LORA, "--forget-loss", "npo", "--retain-loss", "kl", "--beta", "0.5")
    first = report["steps"][0]
    assert first["forget_loss"] == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    assert abs(first["retain_loss"]) < 1e-6
    assert report["steps"][1]["retain_loss"] > 1e-7  # the adapters moved the model away from it


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lora-rank", "0"], "--lora-rank: must be at least 1"),
        (["--lora-rank", "4", "--lora-target-modules", "nope"], "--lora-target-modules nope: peft cannot"),
        (["--lora-alpha", "8"], "--lora-alpha goes with --lora-rank"),
        (["--save-adapter"], "--save-adapter goes with --lora-rank"),
        (["--lora-rank", "4", "--forget-loss", "rmu"], "--lora-rank with --forget-loss rmu"),
    ],
    ids=["rank-0", "unknown-module", "alpha-alone", "save-adapter-alone", "rmu"],
)
def test_bad_lora_flags_are_one_line_and_exit_2(world_cache, tmp_path, capsys, flags, says):
    code = main(["unlearn", "--world", "ci", "--steps", "1", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_lora_without_peft_is_one_line(world_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    code = main(["unlearn", "--world", "ci", "--steps", "1", "--out", str(tmp_path / "run"), *LORA])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and "needs the peft package" in err, err


def test_gradient_checkpointing_gives_the_same_update(world_cache, tmp_path):
    plain = _unlearn(tmp_path / "plain")
    checkpointed = _unlearn(tmp_path / "ckpt", "--gradient-checkpointing")
    assert checkpointed["settings"]["gradient_checkpointing"] is True
    a, b = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "ckpt" / "model.safetensors"),
    )
    original = load_file(world_cache / "model.safetensors")
    for name in a:
        moved = (a[name] - original[name]).abs().max()
        # The recomputed forward is the same arithmetic; allow float32 rounding of the step only.
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    assert moved > 0
    assert [s["forget_loss"] for s in plain["steps"]] == pytest.approx(
        [s["forget_loss"] for s in checkpointed["steps"]], rel=1e-5
    )


def test_gradient_checkpointing_is_enabled_and_recomputes_each_layer():
    from hf_helpers import tiny_llama

    from gradsynth.cli.scale import enable_gradient_checkpointing
    from gradsynth.unlearning.loop import UnlearnSettings, unlearn

    examples = [
        ([1, 5, 7, 9, 11, 2], [-100, 5, 7, 9, 11, 2]),
        ([1, 6, 8, 10, 12, 2], [-100, 6, 8, 10, 12, 2]),
    ]
    settings = UnlearnSettings(steps=1, batch_size=2)
    calls = {}
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing
        count = [0]
        act = model.model.layers[0].mlp.act_fn
        forward = act.forward

        def counted(x, forward=forward, count=count):
            count[0] += 1
            return forward(x)

        act.forward = counted  # inside the layer: what the backward's recomputation runs again
        unlearn(model, examples, examples, 0, settings)
        calls[checkpointing] = count[0]
    # One forward per task without checkpointing; each backward runs the layer's forward once more.
    assert calls == {False: 2, True: 4}
