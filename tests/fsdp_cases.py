"""What the 2-process FSDP2 tests of the Trainer and of Accelerate run on each rank (CPU, gloo).

The one-process, whole-batch reference runs in the pytest process (no process group there) and
is handed over through ``$GRADSYNTH_FSDP_CASE_DIR``; each rank checks its FSDP2 run against it
and against the other rank. Not a test module itself: ``test_fsdp_engines.py`` runs it.

Accelerate enables FSDP only on accelerators (``MULTI_GPU``, ``MULTI_XPU``, ...), never on
``MULTI_CPU``; `allow_fsdp_on_cpu` lifts that one gate in the worker so that the real FSDP2
path of Accelerate and the Trainer (``fully_shard`` per decoder layer, DTensor gradients, gloo
reductions) runs on these CPU-only machines. Nothing else is patched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

RULES = ["sago", "sago_prefer_retain", "pcgrad", "pcgrad_global", "sum"]
STEPS, ACCUMULATION, PER_RANK = 2, 2, 2
# AdamW divides by sqrt(v): at a coordinate whose gradient is near zero, float32 rounding of the
# reductions moves the update by more than elsewhere (seen: 2.6e-6); mixing tasks costs ~1e-3.
RTOL, ATOL = 1e-5, 2e-5
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


def case_dir() -> Path:
    return Path(os.environ["GRADSYNTH_FSDP_CASE_DIR"])


def allow_fsdp_on_cpu() -> None:
    """Let Accelerate take its FSDP path on CPU processes (it does so only on accelerators)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__
    if getattr(original, "_gradsynth_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What AcceleratorState does on an accelerator, both writes included.
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._gradsynth_cpu_fsdp = True
    state.AcceleratorState.__init__ = init


def _launcher_env(rank: int, world: int) -> None:
    """What torchrun would set: Accelerate reads the world from the environment."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")


def trainer_args(output_dir: Path, batch: int, fsdp: bool, **overrides):
    from hf_helpers import training_args

    settings = {
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": ACCUMULATION,
        "learning_rate": 3e-3,
        "max_steps": STEPS,
        "max_grad_norm": 0.5,
        **({"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)} if fsdp else {}),
        **overrides,
    }
    return training_args(output_dir, **settings)


def trainer(args, rule: str, seed: int = 0):
    from hf_helpers import paired_examples, tiny_llama

    from gradsynth.integrations.hf_trainer import SynthesizingTrainer

    n = PER_RANK * 2 * ACCUMULATION * max(STEPS, args.max_steps)
    return SynthesizingTrainer(tiny_llama(seed), args, train_dataset=paired_examples(n), rule=rule)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (FSDP2 holds DTensor shards), by its unwrapped name."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: parameter names differ"
    for name, value in got.items():
        torch.testing.assert_close(
            value, want[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{where} {n}: {m}"
        )


def assert_same_on_every_rank(params: dict[str, torch.Tensor], where: str) -> None:
    flat = torch.cat([t.reshape(-1) for t in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other, values in enumerate(gathered):
        assert torch.equal(values, flat), f"{where}: rank {other} differs from rank {dist.get_rank()}"


# ----- a hand-written Accelerate loop ------------------------------------------------------------

ACCELERATE_RULES = ["sago", "pcgrad_global"]


def accelerate_run(rule: str, batch: int, fsdp: bool) -> dict[str, torch.Tensor]:
    """The loop of ``examples/accelerate_loop.py`` on the tiny Llama; the final parameters."""
    import accelerate
    from hf_helpers import paired_examples, tiny_llama

    from gradsynth import SynthesizingOptimizer
    from gradsynth.integrations.accelerate_tasks import AcceleratedTasks
    from gradsynth.integrations.task_batches import TaskPairCollator
    from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    plugin = None
    if fsdp:
        plugin = accelerate.FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        )
    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=ACCUMULATION, fsdp_plugin=plugin
    )
    assert accelerator.is_fsdp2 == fsdp
    model = tiny_llama()
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), rule)
    examples = paired_examples(PER_RANK * 2 * ACCUMULATION * STEPS)
    loader = torch.utils.data.DataLoader(examples, batch_size=batch, collate_fn=TaskPairCollator())
    model, optimizer, loader = accelerator.prepare(model, opt, loader)
    tasks = AcceleratedTasks(accelerator, optimizer)
    for pair in loader:
        with accelerator.accumulate(model):
            tasks.backward_forget(gradient_ascent_loss(model, pair["forget"]))
            tasks.backward_retain(nll_loss(model, pair["retain"]))
            if tasks.synthesize():
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
    return full_parameters(accelerator.unwrap_model(model))


def accelerate_references(out: Path) -> None:
    for rule in ACCELERATE_RULES:
        torch.save(accelerate_run(rule, 2 * PER_RANK, fsdp=False), out / f"accelerate-{rule}.pt")


def _check_accelerate(out: Path) -> None:
    for rule in ACCELERATE_RULES:
        got = accelerate_run(rule, PER_RANK, fsdp=True)
        where = f"Accelerate FSDP2 {rule}"
        assert_matches(got, torch.load(out / f"accelerate-{rule}.pt"), where)
        assert_same_on_every_rank(got, where)


# ----- the Trainer -----------------------------------------------------------------------------


def trainer_references(out: Path) -> None:
    """One process, the whole batch (both ranks' shares) per micro-batch: the numbers to match."""
    for rule in RULES:
        one = trainer(trainer_args(out / f"one-{rule}", 2 * PER_RANK, fsdp=False), rule)
        one.train()
        torch.save(full_parameters(one.model), out / f"trainer-{rule}.pt")


def fsdp2_engines_case(rank: int, world: int) -> None:
    """Every rule through ``SynthesizingTrainer`` under FSDP2, an exact resume; the
    Accelerate loop under FSDP2."""
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    _launcher_env(rank, world)
    allow_fsdp_on_cpu()
    out = case_dir()
    for rule in RULES:
        AcceleratorState._reset_state(reset_partial_state=True)
        run = trainer(trainer_args(out / f"fsdp-{rule}", PER_RANK, fsdp=True), rule)
        assert run.accelerator.is_fsdp2, "the Trainer did not take Accelerate's FSDP2 path"
        run.train()
        assert all(isinstance(p, DTensor) for p in run.model.parameters()), "parameters are not sharded"
        got = full_parameters(run.model)
        where = f"Trainer FSDP2 {rule}"
        assert_matches(got, torch.load(out / f"trainer-{rule}.pt"), where)
        assert_same_on_every_rank(got, where)

    # Resume: 4 steps with a checkpoint at step 2, then a fresh trainer resumed from it.
    checkpoint_dir = out / "resume"
    AcceleratorState._reset_state(reset_partial_state=True)
    full = trainer(
        trainer_args(checkpoint_dir, PER_RANK, fsdp=True, max_steps=4, save_strategy="steps", save_steps=2),
        "pcgrad",
    )
    full.train()
    want = full_parameters(full.model)
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = trainer(trainer_args(checkpoint_dir, PER_RANK, fsdp=True, max_steps=4), "pcgrad", seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint_dir / "checkpoint-2"))
    assert resumed.state.global_step == 4
    got = full_parameters(resumed.model)
    for name, value in got.items():
        assert torch.equal(value, want[name]), f"FSDP2 resume: {name} differs from the run not stopped"
    assert_same_on_every_rank(got, "Trainer FSDP2 resume")
    _check_accelerate(out)
