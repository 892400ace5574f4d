"""What the 2-process tests run on each rank, and the spawn that runs it (CPU, gloo).

Each case compares a distributed run with a single-process run of the same model on the whole
batch, which every rank computes for itself (same seeds, so the same numbers on every rank).
Batches are split evenly across ranks, and each task loss is a mean over its micro-batch, so
the all-reduced (averaged) gradient equals the whole-batch gradient.

A case raises on the first mismatch; `spawn` turns that into a test failure with the rank's
traceback. Not a test module itself (no ``test_`` prefix): ``test_distributed.py`` runs it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from gradsynth import FunctionRule, SynthesizingOptimizer, pcgrad, weighted_sum
from gradsynth.rules import dot64

RULES = ["sago", "pcgrad", "pcgrad_global"]
STEPS = 3
ACCUMULATE = 2
BATCH = 8  # per task and micro-batch, split across the ranks
# Whole-batch vs averaged per-rank gradients differ by float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6


# ----- spawning -------------------------------------------------------------------------------


def _entry(rank: int, world: int, store: str, case: Callable[[int, int], None]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    case(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads sometimes abort the process there
    # ("terminate called without an active exception") after every check has passed.
    os._exit(0)


def spawn(case: Callable[[int, int], None], tmp_path: Path, world: int = 2, timeout: float = 120.0) -> None:
    """Run ``case(rank, world)`` on ``world`` CPU processes joined by a gloo group; raise on failure."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _entry,
        args=(world, str(tmp_path / "store"), case),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > end:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{case.__name__} did not finish within {timeout:.0f} s")


# ----- shared pieces ------------------------------------------------------------------------------


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def micro_batch(step: int, micro: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This rank's share of one micro-batch (forget inputs, retain inputs); world 1 = all of it."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    xf, xr = torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 4, generator=g)
    return xf.chunk(world)[rank], xr.chunk(world)[rank]


def run(
    model: torch.nn.Module,
    opt: SynthesizingOptimizer,
    rank: int = 0,
    world: int = 1,
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    set_to_none: bool = True,
) -> None:
    """``STEPS`` steps of ``ACCUMULATE`` interleaved micro-batches per task.

    With ``no_sync``, all micro-batches but the last run inside it, so each task's gradient is
    all-reduced once, in its last backward.
    """
    for step in range(STEPS):
        opt.zero_grad(set_to_none=set_to_none)
        for micro in range(ACCUMULATE):
            xf, xr = micro_batch(step, micro, rank, world)
            last = micro == ACCUMULATE - 1
            with contextlib.nullcontext() if no_sync is None or last else no_sync():
                opt.backward_forget(-model(xf).pow(2).mean() / ACCUMULATE)
                opt.backward_retain((model(xr) - 1).pow(2).mean() / ACCUMULATE)
        opt.step()


def reference(rule: str) -> tuple[list[Tensor], dict[str, float]]:
    """The single-process run on the whole batch: final parameters and the last step's geometry."""
    model = small_model()
    opt = make_optimizer(model.parameters(), rule)
    run(model, opt)
    geometry = opt.geometry
    assert geometry is not None
    return [p.detach() for p in model.parameters()], geometry.as_dict()


def make_optimizer(params: Iterator[Tensor], rule: str | object) -> SynthesizingOptimizer:
    return SynthesizingOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9), rule, track_geometry=True)


def assert_geometry_close(got: dict[str, float], want: dict[str, float], where: str) -> None:
    assert got["numel"] == want["numel"], f"{where}: geometry over {got['numel']} coordinates, not all"
    for name, value in want.items():
        assert math.isclose(got[name], value, rel_tol=1e-5, abs_tol=1e-7), (
            f"{where}: geometry {name} = {got[name]}, single process {value}"
        )


def find_geometry(engine) -> dict[str, float]:
    """The last geometry of the SynthesizingOptimizer inside an engine's optimizer."""
    from gradsynth.integrations.unwrap import find_synthesizing_optimizer

    return find_synthesizing_optimizer(engine.optimizer).geometry.as_dict()


def assert_same_on_every_rank(tensors: list[Tensor], where: str) -> None:
    """Bit-identical across ranks: gather every rank's flat copy and compare exactly."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other, values in enumerate(gathered):
        assert torch.equal(values, flat), f"{where}: rank {other} differs from rank {dist.get_rank()}"


# ----- DDP ----------------------------------------------------------------------------------------

# (gradient_as_bucket_view, accumulate under no_sync, zero_grad(set_to_none=...))
DDP_SETUPS = [
    (False, False, True),
    (True, False, False),
    (False, True, False),
    (True, True, True),
    (True, True, False),
]


def ddp_case(rank: int, world: int) -> None:
    """Every rule x DDP setup ends equal to the single process, bit-identical across ranks."""
    from torch.nn.parallel import DistributedDataParallel

    for rule in RULES:
        want, want_geometry = reference(rule)
        for bucket_view, use_no_sync, set_to_none in DDP_SETUPS:
            where = f"DDP {rule} bucket_view={bucket_view} no_sync={use_no_sync} set_to_none={set_to_none}"
            model = DistributedDataParallel(small_model(), gradient_as_bucket_view=bucket_view)
            opt = make_optimizer(model.parameters(), rule)
            no_sync = model.no_sync if use_no_sync else None
            run(model, opt, rank, world, no_sync=no_sync, set_to_none=set_to_none)
            got = [p.detach() for p in model.parameters()]
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")
            assert_same_on_every_rank(got, where)
            assert_geometry_close(opt.geometry.as_dict(), want_geometry, where)


# ----- FSDP2 --------------------------------------------------------------------------------------


def _fsdp_model(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = small_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp2_case(rank: int, world: int) -> None:
    """FSDP2 (sharded DTensor gradients) against the single process; SAGO never communicates."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    collectives = {}
    for rule in RULES:
        want, want_geometry = reference(rule)
        model = _fsdp_model(mesh)
        opt = make_optimizer(model.parameters(), rule)
        # Count the collectives of one synthesis without geometry (which adds one of its own).
        opt.track_geometry = False
        opt.zero_grad()
        xf, xr = micro_batch(99, 0, rank, world)
        opt.backward_forget(-model(xf).pow(2).mean())
        opt.backward_retain((model(xr) - 1).pow(2).mean())
        with CommDebugMode() as comm:
            opt.synthesize()
        collectives[rule] = comm.get_total_counts()
        grads = [p.grad for p in model.parameters()]
        assert all(isinstance(g, DTensor) and g.placements == (Shard(0),) for g in grads), "not sharded"
        opt.zero_grad()
        opt.track_geometry = True

        run(model, opt, rank, world)
        where = f"FSDP2 {rule}"
        got = [p.full_tensor() for p in model.parameters()]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")
        assert_same_on_every_rank(got, where)
        geometry = opt.geometry.as_dict()
        assert_geometry_close(geometry, want_geometry, where)
        assert_same_on_every_rank([torch.tensor(list(geometry.values()), dtype=torch.float64)], where)
    n_tensors = len(list(small_model().parameters()))
    assert collectives["sago"] == 0, collectives
    # What docs/scaling.md states: the two partial sums are settled in one all-reduce, per tensor
    # for pcgrad and once in total for pcgrad_global.
    assert collectives["pcgrad"] == n_tensors, collectives
    assert collectives["pcgrad_global"] == 1, collectives

    _check_projection_is_global(mesh, rank, world)


class _Linear(torch.nn.Module):
    """A loss whose gradient is chosen exactly: ``<W, T>`` has gradient ``T`` for each weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 2))
        self.v = torch.nn.Parameter(torch.zeros(4, 2))

    def forward(self, tw: Tensor, tv: Tensor) -> Tensor:
        return (self.w * tw).sum() + (self.v * tv).sum()


def _rows(*pairs: tuple[float, float]) -> Tensor:
    return torch.tensor(pairs, dtype=torch.float32)


# Gradients chosen so that each rank's shard (rows 0-1 on rank 0, rows 2-3 on rank 1) and the
# whole tensor disagree on the sign of <f, r>:
#   w: <f, r> = +4 on rank 0's rows, -1 on rank 1's rows, +3 in total   -> pcgrad leaves f alone
#   v: <f, r> = -3 on rank 0's rows, +0.5 on rank 1's rows, -2.5 in total -> pcgrad projects f
#   over both tensors: +0.5 in total, but -0.5 on rank 1                  -> pcgrad_global leaves f
F_W, R_W = _rows((1, 1), (1, 1), (1, 0), (0, 0)), _rows((1, 1), (1, 1), (-1, 0), (0, 0))
F_V, R_V = _rows((1, 0), (1, 1), (0.5, 0), (0, 0)), _rows((-1, 0), (-1, -1), (1, 0), (0, 0))


def _local_pcgrad(forget: Tensor, retain: Tensor, *, alpha: float, gamma: float) -> Tensor:
    """The mistake the test must catch: reading the partial inner products with ``float()``."""
    fr, rr = float(dot64(forget, retain)), float(dot64(retain, retain))
    k = min(fr, 0.0) / rr if rr > 0 else 0.0
    return weighted_sum(forget, retain, alpha=alpha - gamma * k, gamma=gamma)


def _check_projection_is_global(mesh, rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    assert world == 2, "the chosen gradients assume two ranks"
    whole_f = [F_W, F_V]
    whole_r = [R_W, R_V]
    expected = {
        "pcgrad": [pcgrad(f, r) for f, r in zip(whole_f, whole_r, strict=True)],
        "pcgrad_global": _pcgrad_global_whole(whole_f, whole_r),
    }
    got = {}
    for name, rule in [
        ("pcgrad", "pcgrad"),
        ("pcgrad_global", "pcgrad_global"),
        ("local float()", FunctionRule(_local_pcgrad, "local_pcgrad")),
    ]:
        model = fully_shard(_Linear(), mesh=mesh)
        opt = SynthesizingOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), rule)
        opt.zero_grad()
        # Every rank sees the same targets, so the averaged gradient is exactly the target.
        opt.backward_forget(model(F_W, F_V))
        opt.backward_retain(model(R_W, R_V))
        opt.step()
        got[name] = [-p.full_tensor() for p in model.parameters()]  # SGD(lr=1) from zero: g = -p
    for name in ("pcgrad", "pcgrad_global"):
        for a, b in zip(got[name], expected[name], strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"FSDP2 {n} on sign-split data: {m}")
    # The data do tell the two apart: the rule that reads only the local part goes wrong.
    pairs = zip(got["local float()"], expected["pcgrad"], strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs), (
        "the sign-split gradients failed to expose a rule that uses the local partial sums"
    )


def _pcgrad_global_whole(forget: list[Tensor], retain: list[Tensor]) -> list[Tensor]:
    fr = sum(float((f.double() * r.double()).sum()) for f, r in zip(forget, retain, strict=True))
    rr = sum(float((r.double() * r.double()).sum()) for r in retain)
    k = min(fr, 0.0) / rr
    return [f + (1.0 - k) * r for f, r in zip(forget, retain, strict=True)]
