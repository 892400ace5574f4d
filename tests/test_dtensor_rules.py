"""The rule functions on DTensors (what FSDP2 hands out as gradients) match plain tensors.

A one-process gloo mesh is enough to build DTensors; the multi-process FSDP2 tests belong to
the distributed integration.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gradsynth import pcgrad, sago, sago_prefer_retain, weighted_sum
from gradsynth.rules import PCGradGlobal, dot64

FUNCTIONS = [sago, sago_prefer_retain, pcgrad, weighted_sum]


@pytest.fixture
def mesh(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda fn: fn.__name__)
@pytest.mark.parametrize("out", ["retain", "forget"])
def test_rules_on_sharded_dtensors(mesh, fn, out):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    f, r = torch.randn(6, 5), torch.randn(6, 5)
    want = fn(f, r, alpha=0.5, gamma=2.0)
    fd, rd = distribute_tensor(f, mesh, [Shard(0)]), distribute_tensor(r, mesh, [Shard(0)])
    target = rd if out == "retain" else fd
    got = fn(fd, rd, alpha=0.5, gamma=2.0, out=target)
    assert isinstance(got, DTensor) and got.placements == (Shard(0),)
    torch.testing.assert_close(got.full_tensor(), want)


def test_global_reductions_on_dtensors(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    f, r = torch.randn(8, 3), torch.randn(8, 3)
    fd, rd = distribute_tensor(f, mesh, [Shard(0)]), distribute_tensor(r, mesh, [Shard(0)])
    torch.testing.assert_close(dot64(fd, rd).full_tensor(), (f.double() * r.double()).sum())
    rule = PCGradGlobal()
    k = rule.prepare([fd], [rd], alpha=[1.0], gamma=[1.0])
    out = torch.empty_like(rd)
    rule.combine(fd, rd, alpha=1.0, gamma=1.0, out=out, context=k)
    torch.testing.assert_close(out.full_tensor(), pcgrad(f, r))


def test_geometry_of_dtensor_gradients(mesh):
    """The optimizer's geometry reduces DTensor partial sums (FSDP2 gradients) to plain numbers."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from gradsynth.optim.geometry import GeometryAccumulator

    f, r = torch.randn(8, 3), torch.randn(8, 3)
    g = sago(f, r)
    want, got = GeometryAccumulator(), GeometryAccumulator()
    want.add(f, r, g)
    got.add(*(distribute_tensor(t, mesh, [Shard(0)]) for t in (f, r, g)))
    got.reduce()
    assert got.result() == want.result()
