"""``torchrun --nproc-per-node 2 -m gradsynth.cli unlearn``: the same run as one process, on 2 CPU ranks
(gloo), rank 0 alone writing; and what a multi-process run refuses."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_world_cache
from helpers import cache_env

from gradsynth.cli import main

pytest.importorskip("transformers")
from cli_ddp_cases import (
    BATCH,
    PARTITION_ALL,
    ddp_loop_case,
    deepspeed_diverging_case,
    deepspeed_loop_case,
    deepspeed_partition_case,
    diverging_run,
    fsdp2_loop_case,
    non_finite_case,
    run_loop,
    unweighted_case,
)
from distributed_cases import spawn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gradsynth.cli.run_one import evaluate, evaluation_batches
from gradsynth.cli.sources import world_task

ROOT = Path(__file__).resolve().parent.parent
# AdamW's first steps move a coordinate by about lr * sign(g) however small g is, so a coordinate
# whose gradient is ~0 carries the float32 rounding of the reduction into the weights: per tensor,
# up to 3e-4 of its largest value was measured; over the whole model, 2e-7 to 7e-7.
WHOLE_MODEL_RTOL = 2e-6


def _relative(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    return float(num / sum((a[k].double() ** 2).sum() for k in a) ** 0.5)


@pytest.mark.parametrize("forget_loss", ["ga", "npo"])
def test_two_ranks_of_the_loop_are_the_one_process_run(tmp_path, forget_loss):
    spawn(functools.partial(ddp_loop_case, str(tmp_path / "rank"), forget_loss), tmp_path)
    whole = run_loop(None, forget_loss)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank.{rank}", weights_only=True)
        assert got["seen"][-12:] == [BATCH // 2] * 12  # 3 steps x 2 micro-batches x 2 tasks: half each
        assert _relative(got["weights"], whole["weights"]) < WHOLE_MODEL_RTOL
        for mine, one in zip(got["records"], whole["records"], strict=True):
            assert mine == pytest.approx(one, rel=1e-5, abs=1e-6)
    moved = _relative(whole["weights"], run_loop(None, forget_loss)["weights"])
    assert moved == 0.0  # the one-process reference itself is deterministic


def test_without_the_token_weights_the_two_ranks_would_differ(tmp_path):
    """The test above can fail: the ranks' slices hold different numbers of loss tokens."""
    spawn(functools.partial(unweighted_case, str(tmp_path / "rank")), tmp_path)
    got = torch.load(tmp_path / "rank.0", weights_only=True)
    assert _relative(got["weights"], run_loop(None, "ga")["weights"]) > 10 * WHOLE_MODEL_RTOL


def test_a_non_finite_shard_on_one_rank_is_seen_by_every_rank(tmp_path):
    spawn(functools.partial(non_finite_case, str(tmp_path / "rank")), tmp_path)
    got = [torch.load(tmp_path / f"rank.{rank}", weights_only=True) for rank in range(2)]
    assert [g["clean"] for g in got] == [None, None]
    assert got[1]["bad"] == "model.layers.1.mlp.up_proj.weight"
    assert got[0]["bad"] == "a parameter sharded on another rank"


def test_a_non_finite_weight_is_named_in_one_process():
    from hf_helpers import tiny_llama

    from gradsynth.unlearning.sharding import non_finite_parameter

    model = tiny_llama()
    assert non_finite_parameter(model) is None
    with torch.no_grad():
        model.get_parameter("model.norm.weight")[3] = float("inf")
    assert non_finite_parameter(model) == "model.norm.weight"


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory, ci_world_master):
    cache = copy_world_cache(tmp_path_factory, ci_world_master)
    with cache_env(cache):
        yield cache


@pytest.mark.parametrize("sharding", [None, "fsdp2", "deepspeed"], ids=["ddp", "fsdp2", "deepspeed"])
def test_torchrun_unlearn_on_two_ranks_matches_one_process_and_only_rank_0_writes(
    world_cache, tmp_path, sharding
):
    """DeepSpeed runs its default ZeRO-3 here, every parameter partitioned (the stage that gathers
    the weights to save and evaluates a partitioned model); the first DeepSpeed run on a machine
    also builds DeepSpeed's shared-memory op (minutes on a loaded machine, then cached), hence the
    generous timeout."""
    if sharding == "deepspeed":
        pytest.importorskip("deepspeed")
    flags = ["unlearn", "--world", "ci", "--steps", "3", "--no-progress"]
    two, one = tmp_path / "two" / "run", tmp_path / "one" / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    how = ["--sharding", sharding] if sharding else []
    if sharding == "deepspeed":
        config = tmp_path / "zero.json"
        config.write_text(json.dumps({"zero_optimization": PARTITION_ALL}))
        how += ["--deepspeed-config", str(config)]
    done = subprocess.run(
        [*launch, "-m", "gradsynth.cli", *flags, *how, "--out", str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*flags, "--out", str(one)]) == 0
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]  # no other rank's folder, nothing hidden
    assert done.stdout.count("Wrote ") == 1  # rank 0 alone prints
    assert (
        _relative(load_file(two / "model.safetensors"), load_file(one / "model.safetensors"))
        < WHOLE_MODEL_RTOL
    )
    reports = [json.loads((f / "report.json").read_text()) for f in (two, one)]
    for mine, theirs in zip(reports[0]["steps"], reports[1]["steps"], strict=True):
        for key in ("forget_loss", "retain_loss", "cos_fr", "cos_gr"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert reports[0]["settings"]["sharding"] == (sharding or "ddp")
    assert reports[0]["settings"]["processes"] == 2
    zero = {"stage": 3, **PARTITION_ALL} if sharding == "deepspeed" else None
    assert reports[0]["settings"]["zero_optimization"] == zero
    # The saved folder (gathered from the shards under FSDP2 and ZeRO-3) is a plain transformers model:
    # reloaded in one process it scores what the ranks measured on the model in memory.
    reloaded = AutoModelForCausalLM.from_pretrained(two, dtype=torch.float32)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    task = world_task("ci", 0, log=lambda _: None)
    scores = evaluate(reloaded.eval(), evaluation_batches(task), task)
    for split, metrics in reports[0]["metrics"]["after"].items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert scores[split][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, name)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--batch-size", "15"], "--batch-size 15: not a multiple of the 2 processes"),
        (["--lora-rank", "2"], "--lora-rank is not offered under 2 processes"),
        (["--save-every", "2"], "--save-every is not offered under 2 processes"),
        (["--audit"], "--audit is not offered under 2 processes"),
        (["--sharding", "deepspeed", "--lora-rank", "2"], "--lora-rank is not offered under 2 processes"),
        (
            ["--sharding", "deepspeed", "--dtype", "bfloat16"],
            "--dtype bfloat16 is not offered with --sharding deepspeed",
        ),
        (["--zero-stage", "2"], "--zero-stage 2 is a DeepSpeed setting; add --sharding deepspeed"),
        (["--deepspeed-config", "{}"], "is a DeepSpeed setting; add --sharding deepspeed"),
        (
            [
                "--sharding",
                "deepspeed",
                "--deepspeed-config",
                '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}',
            ],
            "offload_optimizer is refused: each task's gradient",
        ),
        (
            [
                "--sharding",
                "deepspeed",
                "--deepspeed-config",
                '{"zero_optimization": {}, "bf16": {"enabled": true}}',
            ],
            "bf16 set by the command itself",
        ),
        (
            [
                "--sharding",
                "deepspeed",
                "--zero-stage",
                "1",
                "--deepspeed-config",
                '{"zero_optimization": {"stage": 2}}',
            ],
            "--zero-stage 1 and --deepspeed-config's stage 2 disagree",
        ),
        (["--sharding", "deepspeed", "--deepspeed-config", "not json"], "not a readable JSON file"),
    ],
    ids=[
        "batch",
        "lora",
        "checkpoints",
        "audit",
        "deepspeed-lora",
        "deepspeed-dtype",
        "zero-stage-alone",
        "config-alone",
        "offload",
        "precision",
        "stages-disagree",
        "not-json",
    ],
)
def test_what_several_processes_refuse_is_one_line(tmp_path, capsys, monkeypatch, flags, says):
    if "deepspeed" in flags:
        pytest.importorskip("deepspeed")  # without it, the refusal below is said first
    if "--deepspeed-config" in flags:  # the JSON text given goes into a file
        at = flags.index("--deepspeed-config") + 1
        (tmp_path / "ds.json").write_text(flags[at])
        flags = [*flags[:at], str(tmp_path / "ds.json"), *flags[at + 1 :]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["unlearn", "--world", "ci", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and says in err, err


def test_deepspeed_sharding_without_deepspeed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["unlearn", "--world", "ci", "--out", str(tmp_path / "run"), "--sharding", "deepspeed"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err], err
    assert "--sharding deepspeed: DeepSpeed is not installed; pip install deepspeed" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("forget_loss, retain_loss", [("ga", "nll"), ("npo", "kl")])
def test_two_fsdp2_ranks_of_the_loop_are_the_one_process_run(tmp_path, forget_loss, retain_loss):
    """FSDP2: sharded parameters, gradients and AdamW state (and, for KL, a sharded reference)."""
    spawn(functools.partial(fsdp2_loop_case, str(tmp_path / "rank"), forget_loss, retain_loss), tmp_path)
    whole = run_loop(None, forget_loss, retain_loss=retain_loss)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank.{rank}", weights_only=True)
        assert sorted(got["sharded"]) == sorted(whole["weights"])  # every parameter was a DTensor shard
        assert got["seen"][-12:] == [BATCH // 2] * 12
        assert _relative(got["weights"], whole["weights"]) < WHOLE_MODEL_RTOL
        for mine, one in zip(got["records"], whole["records"], strict=True):
            assert mine == pytest.approx(one, rel=1e-5, abs=1e-6)


# NPO's per-example weights carry more of the ranks' reduction rounding: 1.8e-6 under FSDP2 and
# 1.9e-6 under ZeRO-3 were measured for NPO + KL (GA + NLL: 2.9e-7 and 3.7e-7).
NPO_KL_RTOL = 5e-6
DEEPSPEED_RUNS = [("ga", "nll", 0), ("ga", "nll", 1), ("ga", "nll", 2), ("ga", "nll", 3), ("npo", "kl", 3)]


def test_deepspeed_ranks_of_the_loop_are_the_one_process_run(tmp_path):
    """A DeepSpeed engine at every ZeRO stage (ZeRO-3: every parameter a partition; with KL, the
    reference whole on each rank) against one process; one process start for all of them."""
    pytest.importorskip("deepspeed")
    spawn(
        functools.partial(deepspeed_loop_case, str(tmp_path / "rank"), DEEPSPEED_RUNS), tmp_path, timeout=600
    )
    wholes = {(f, r): run_loop(None, f, retain_loss=r) for f, r in {(f, r) for f, r, _ in DEEPSPEED_RUNS}}
    for rank in range(2):
        runs = torch.load(tmp_path / f"rank.{rank}", weights_only=True)
        for forget_loss, retain_loss, stage in DEEPSPEED_RUNS:
            where = f"rank {rank}, {forget_loss} + {retain_loss}, ZeRO-{stage}"
            got, whole = runs[(forget_loss, retain_loss, stage)], wholes[(forget_loss, retain_loss)]
            assert sorted(got["sharded"]) == (sorted(whole["weights"]) if stage == 3 else []), where
            assert sorted(got["partitioned"]) == sorted(got["sharded"]), where
            assert got["seen"][-12:] == [BATCH // 2] * 12, where
            rtol = WHOLE_MODEL_RTOL if forget_loss == "ga" else NPO_KL_RTOL
            assert _relative(got["weights"], whole["weights"]) < rtol, where
            for mine, one in zip(got["records"], whole["records"], strict=True):
                assert mine == pytest.approx(one, rel=1e-5, abs=1e-6), where


def test_zero3_partitions_are_gathered_for_saving_and_checked_on_every_rank(tmp_path):
    pytest.importorskip("deepspeed")
    spawn(functools.partial(deepspeed_partition_case, str(tmp_path / "rank")), tmp_path, timeout=300)
    got = [torch.load(tmp_path / f"rank.{rank}", weights_only=True) for rank in range(2)]
    assert [g["partitioned"] for g in got] == [True, True]  # no parameter whole on a rank
    before = got[0]["before"]
    assert "lm_head.weight" in before  # tied: the module's state dict names it twice
    assert sorted(got[0]["gathered"]) == sorted(set(before) - {"lm_head.weight"})
    for name, tensor in got[0]["gathered"].items():
        assert torch.equal(tensor, before[name]), name
    assert got[1]["gathered"] == {}  # rank 0 alone keeps the weights
    assert [g["clean"] for g in got] == [None, None]
    assert got[1]["bad"] == "model.layers.1.mlp.up_proj.weight"
    assert got[0]["bad"] == "a parameter sharded on another rank"


def test_a_diverging_deepspeed_run_stops_on_every_rank_as_one_process_does(tmp_path):
    """ZeRO-1/2/3 skip a step whose gradient is not finite (one process would apply it and end on
    NaN weights): the loop must stop there, on every rank, not carry on from the skipped step."""
    pytest.importorskip("deepspeed")
    stages = [0, 1, 2, 3]
    spawn(functools.partial(deepspeed_diverging_case, str(tmp_path / "rank"), stages), tmp_path, timeout=300)
    assert "diverged" in diverging_run(None)
    for rank in range(2):
        said = torch.load(tmp_path / f"rank.{rank}", weights_only=True)
        for stage in stages:
            assert said[stage] is not None and "diverged" in said[stage], (rank, stage, said[stage])
    assert all("DeepSpeed skipped the update" in said[stage] for stage in (1, 2, 3))


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "deepspeed"])
def test_sharding_in_one_process_is_one_line(tmp_path, capsys, monkeypatch, sharding):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["unlearn", "--world", "ci", "--out", str(tmp_path / "run"), "--sharding", sharding])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err], err
    assert f"--sharding {sharding} shares the model between several processes, and this is one" in err
