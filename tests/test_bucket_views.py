"""Gradients that live in someone else's storage (DDP bucket views) are copied, never taken.

A one-process gloo group is enough to make DDP hand out bucket views; the 2-process tests
belong to the distributed integration.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradsynth import SynthesizingOptimizer


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _run(model, opt, steps, accumulate):
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        for micro in range(accumulate):
            g = torch.Generator().manual_seed(10 * step + micro)
            xf, xr = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
            opt.backward_forget(-model(xf).pow(2).mean())
            opt.backward_retain((model(xr) - 1).pow(2).mean())
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("rule", ["sago", "pcgrad", "pcgrad_global"])
@pytest.mark.parametrize("bucket_view", [True, False])
def test_ddp_gradients_match_the_plain_run(one_process_group, rule, bucket_view):
    plain_model = _model()
    plain = SynthesizingOptimizer(torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9), rule)
    want = _run(plain_model, plain, steps=3, accumulate=2)

    ddp_model = DistributedDataParallel(_model(), gradient_as_bucket_view=bucket_view)
    opt = SynthesizingOptimizer(torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.9), rule)
    got = _run(ddp_model, opt, steps=3, accumulate=2)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if bucket_view:
        # The bucket views stayed in place: DDP still owns p.grad.
        assert all(p.grad is None or p.grad._base is not None for p in ddp_model.parameters())
