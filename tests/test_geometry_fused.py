"""Geometry taken in the synthesis pass: every rule, float32 and bfloat16, eager and fused kernels,
streaming or not, against the float64 oracle and against the measure-after geometry it replaces;
the update in place (no extra gradient set) and identical to the untracked step's."""

from __future__ import annotations

import oracle
import pytest
import torch
from conftest import RULES
from helpers import linear_loss, update_of, zero_params

import gradsynth.rules.geometry_sums as geometry_sums
from gradsynth import SynthesizingOptimizer
from gradsynth.optim.combine import combine_one
from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.rules import fused, get_rule

# A tensor of 3,000 elements is measured in 3 chunks with the chunk size patched to 1,024.
SHAPES = [(50, 60), (7,), (3, 5), (1,)]
BACKENDS = ["auto", "compiled"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(geometry_sums, "MEASURE_CHUNK", 1024)


def _grads(dtype):
    forgets = [torch.randn(s).to(dtype) for s in SHAPES]
    retains = [torch.randn(s).to(dtype) for s in SHAPES]
    retains[0].view(-1)[::13] = -forgets[0].view(-1)[::13]  # exact opposites: conflicts
    forgets[0].view(-1)[::17] = 0.0  # zeros: never conflicts
    return forgets, retains


def _step(rule, forgets, retains, dtype, *, track, streaming=False):
    params = zero_params(SHAPES, dtype)
    opt = SynthesizingOptimizer(
        torch.optim.SGD(params, lr=1.0), rule, alpha=0.8, gamma=1.3, track_geometry=track, streaming=streaming
    )
    opt.backward_forget(linear_loss(params, forgets))
    opt.backward_retain(linear_loss(params, retains))
    opt.step()
    return update_of(params), opt.geometry


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_fused_geometry_matches_the_oracle_and_leaves_the_update_unchanged(rule, dtype, backend, streaming):
    if streaming and rule in ("pcgrad_global", "blur"):
        pytest.skip("scope rules cannot stream")
    forgets, retains = _grads(dtype)
    with fused.use_backend(backend, min_numel=1000, min_step_numel=0):
        plain, _ = _step(rule, forgets, retains, dtype, track=False)
        tracked, geometry = _step(rule, forgets, retains, dtype, track=True, streaming=streaming)
    for a, b in zip(tracked, plain, strict=True):
        assert torch.equal(a, b)  # the same kernels wrote the same update
    want = oracle.geometry(forgets, retains, tracked)
    got = geometry.as_dict()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
    assert got["numel"] == sum(t.numel() for t in forgets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_fused_sums_equal_the_measure_after_sums(rule, dtype):
    """The in-pass sums equal those of the three gradients measured after, to float64 rounding."""
    f, r = (torch.randn(3001).to(dtype) for _ in range(2))
    rule = get_rule(rule)
    context = rule.prepare([f], [r], alpha=[0.5], gamma=[2.0])
    after, during = GeometryAccumulator(), GeometryAccumulator()
    update = torch.empty_like(r)
    rule.combine(f, r, alpha=0.5, gamma=2.0, out=update, context=context)
    after.add(f, r, update)
    retain = r.clone()
    got = combine_one(rule, f, retain, alpha=0.5, gamma=2.0, context=context, geometry=during)
    assert got is retain and torch.equal(got, update)  # in place: no new tensor for geometry
    assert during.result().as_dict() == pytest.approx(after.result().as_dict(), rel=1e-13)


def test_a_measured_rule_writes_over_forget_too():
    f, r = torch.randn(2500), torch.randn(2500)
    want = oracle.sago(f, r, 1.0, 1.0)
    sink = GeometryAccumulator()
    f_in = f.clone()
    get_rule("sago").combine(f, r, alpha=1.0, gamma=1.0, out=f, geometry=sink)
    torch.testing.assert_close(f.double(), want, rtol=0, atol=0)
    assert sink.result().as_dict() == pytest.approx(oracle.geometry([f_in], [r], [want]) | {"numel": 2500})


def test_the_sums_stay_tensors_until_read():
    """Nothing but tensors is accumulated during the synthesis; the sums are read at `result`."""
    f, r = torch.randn(2500), torch.randn(2500)
    sink = GeometryAccumulator()
    get_rule("pcgrad").combine(f, r, alpha=1.0, gamma=1.0, out=r, geometry=sink)
    (part,) = sink._parts.values()
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in part)


@pytest.mark.parametrize("rule", ["sago", "pcgrad", "sum"])
def test_without_the_c_kernel_the_chunks_are_measured_in_float64(rule, monkeypatch):
    """Two threads (the C kernels run on one): the float64 Gram path of `measured`."""
    from gradsynth.rules import native

    torch.set_num_threads(2)
    assert not native.add_geometry(torch.zeros(7, dtype=torch.float64), *(torch.ones(3),) * 3)
    forgets, retains = _grads(torch.float32)
    plain, _ = _step(rule, forgets, retains, torch.float32, track=False)
    tracked, geometry = _step(rule, forgets, retains, torch.float32, track=True)
    assert all(torch.equal(a, b) for a, b in zip(tracked, plain, strict=True))
    for key, value in oracle.geometry(forgets, retains, tracked).items():
        assert geometry.as_dict()[key] == pytest.approx(value, rel=1e-12), key
    assert fused.status()["geometry[float32, cpu]"] == "float64 matrix product"


def test_status_says_how_the_sums_were_taken():
    f, r = torch.randn(3000), torch.randn(3000)
    get_rule("sago").combine(f, r, alpha=1.0, gamma=1.0, out=r, geometry=GeometryAccumulator())
    assert fused.status()["geometry[float32, cpu]"] == "C kernel"
    fv, rv = f.view(60, 50).t(), r.view(60, 50).t()  # not contiguous: measured whole
    sink = GeometryAccumulator()
    want = oracle.sago(fv, rv, 1.0, 1.0)
    expected = oracle.geometry([fv], [rv], [want])
    get_rule("sago").combine(fv, rv, alpha=1.0, gamma=1.0, out=rv, geometry=sink)
    assert fused.status()["geometry[float32, cpu]"] == "whole tensor"
    torch.testing.assert_close(rv.double(), want, rtol=0, atol=0)
    assert sink.result().as_dict() == pytest.approx(expected | {"numel": 3000}, rel=1e-12)


@pytest.fixture
def mesh(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("rule", RULES)
def test_dtensor_shards_give_partial_sums_reduced_once(mesh, rule):
    from torch.distributed.tensor import Shard, distribute_tensor

    fs, rs = _grads(torch.float32)
    rule = get_rule(rule)
    want, got = GeometryAccumulator(), GeometryAccumulator()
    plain_context = rule.prepare(fs, rs, alpha=[0.5] * 4, gamma=[2.0] * 4)
    for f, r in zip(fs, rs, strict=True):
        combine_one(rule, f, r.clone(), alpha=0.5, gamma=2.0, context=plain_context, geometry=want)
    fd, rd = ([distribute_tensor(t, mesh, [Shard(0)]) for t in ts] for ts in (fs, rs))
    context = rule.prepare(fd, rd, alpha=[0.5] * 4, gamma=[2.0] * 4)
    for f, r in zip(fd, rd, strict=True):
        combine_one(rule, f, r, alpha=0.5, gamma=2.0, context=context, geometry=got)
    assert len(got._totals) == 1  # one mesh: one partial sum, one collective at reduce()
    got.reduce()
    assert got.result().as_dict() == pytest.approx(want.result().as_dict(), rel=1e-12)


# Float32 where the compiled kernels run (40,010 elements; below `MIN_NUMEL` the eager rules run),
# bfloat16 wherever its C kernels run (any size). Lengths that end in the loops' scalar tails.
ONE_LOOP_CASES = [(torch.float32, 4001), (torch.bfloat16, 4001), (torch.bfloat16, 101)]


@pytest.mark.parametrize(("dtype", "repeats"), ONE_LOOP_CASES)
@pytest.mark.parametrize("rule", ["sago", "sago_prefer_retain", "sum", "pcgrad"])
def test_the_c_kernels_with_geometry_are_the_compiled_kernels_bit_for_bit(rule, dtype, repeats):
    """Where the untracked step runs the float32 compiled kernel or the bfloat16 C kernel: one C
    loop writes the same g, bit for bit, and takes the sums."""
    from gradsynth.rules import native

    if dtype == torch.bfloat16 and not native.bf16_available():
        pytest.skip(f"no bfloat16 C kernels here ({native.reason()}, or no AVX2 and FMA)")
    inf, nan = float("inf"), float("nan")
    f = torch.tensor([inf, -inf, nan, 1.0, -1.0, 2.0, 0.0, 1e-30, 3.0, -0.0] * repeats)
    r = torch.tensor([1.0, 1.0, 1.0, inf, -inf, nan, inf, -1e-30, -0.5, 2.0] * repeats)
    f[::7] = torch.randn(f[::7].numel())
    r[::3] = torch.randn(r[::3].numel())
    f, r = f.to(dtype), r.to(dtype)
    with fused.use_backend("compiled"):
        want = r.clone()
        get_rule(rule).combine(f, want, alpha=0.7, gamma=1.9, out=want)
        got, sink = r.clone(), GeometryAccumulator()
        get_rule(rule).combine(f, got, alpha=0.7, gamma=1.9, out=got, geometry=sink)
    assert fused.status()[f"geometry[{str(dtype).removeprefix('torch.')}, cpu]"] == "C kernel with the rule"
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    finite = f.isfinite() & r.isfinite()
    fs, rs = f[finite], r[finite]
    check = GeometryAccumulator()
    with fused.use_backend("compiled"):
        out = rs.clone()
        get_rule(rule).combine(fs, out, alpha=0.7, gamma=1.9, out=out, geometry=check)
    expected = oracle.geometry([fs], [rs], [out])
    assert check.result().as_dict() == pytest.approx(expected | {"numel": fs.numel()}, rel=1e-12)
