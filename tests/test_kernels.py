"""The kernel selector (`gradsynth.rules.kernels`): every implementation, by name, against the
float64 oracle; the choice each kind of tensor gets; `status` naming what ran (C included); the
scoped policy; and the direct call around ``torch.compile``, which relies on torch internals."""

from __future__ import annotations

import threading

import oracle
import pytest
import torch
from helpers import assert_near_terms, rule_pair

from gradsynth.optim.geometry import GeometryAccumulator
from gradsynth.rules import geometry_sums, kernels, native, sago
from gradsynth.rules.kernels import compiled, direct_call, select

ORACLES = {"sago": oracle.sago, "prefer_retain": oracle.sago_prefer_retain, "linear": oracle.weighted_sum}
# What each implementation takes: (dtypes, whether it needs the C library's bfloat16 kernels).
C_BF16 = native.bf16_supported()


def _runs_here(name: str, dtype: torch.dtype) -> bool:
    if name == "C kernel":
        return C_BF16 and dtype == torch.bfloat16
    return True


ELEMENTWISE = [
    (operation, name, dtype)
    for operation, peers in select.IMPLEMENTATIONS.items()
    if operation != "dots"
    for name in peers
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
    if not (name == "C kernel" and dtype != torch.bfloat16)
]


def _weight(name: str) -> float | torch.Tensor:
    if name == "compiled float64":
        return 1e-40  # below float32's normal range: the float64 kernel's case
    if name == "compiled device weight":
        return torch.tensor(0.3, dtype=torch.float64)
    return 0.75


@pytest.mark.parametrize("out", ["retain", "forget", "new"])
@pytest.mark.parametrize(("operation", "name", "dtype"), ELEMENTWISE)
def test_each_elementwise_implementation_matches_the_oracle(operation, name, dtype, out):
    if not _runs_here(name, dtype):
        pytest.skip(f"no {name} for {dtype} here ({native.reason()})")
    f, r = rule_pair(dtype, n=5003)
    if name == "compiled float64":
        # A weight below float32's normal range against a huge retain gradient: w*r ~ 1e-10 must
        # not be lost (float32 would flush the weight or its product).
        f, r = (f.double() * 1e-10).to(dtype), (r.double() * 1e30).to(dtype)
    alpha = _weight(name) if operation == "linear" else 0.75
    gamma = 1.5
    f_in, r_in = f.clone(), r.clone()
    target = {"retain": r, "forget": f, "new": torch.empty_like(r)}[out]
    with kernels.use_backend("compiled", min_numel=0):
        assert kernels.implementation(operation, name).run(f, r, target, alpha, gamma) is not False
    weight = float(alpha)
    expected = ORACLES[operation](f_in, r_in, weight, gamma)
    assert_near_terms(target, expected, f_in, r_in, weight, gamma)


@pytest.mark.parametrize("name", list(select.IMPLEMENTATIONS["dots"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_inner_product_implementation_matches_the_oracle(name, dtype):
    if name == "C kernel" and (dtype == torch.float64 or not kernels.select.c.available("dots", dtype)):
        pytest.skip(f"no C inner products for {dtype} here ({native.reason()})")
    f, r = rule_pair(dtype, n=3 * 4096 + 17)
    with kernels.use_backend("compiled", min_numel=0):
        pair = kernels.implementation("dots", name).run(f, r)
    fr, rr = (float(x) for x in pair)
    want = oracle.dots(f, r)
    # float64 sums: summation error only (the compiled bfloat16 kernel sums blocks in float32).
    rtol = 1e-6 if (name, dtype) == ("compiled", torch.bfloat16) else 1e-12
    assert fr == pytest.approx(want[0], rel=rtol) and rr == pytest.approx(want[1], rel=rtol)


def test_unknown_implementation_names_the_known_ones():
    with pytest.raises(KeyError, match=r"no implementation 'fast' of 'sago'.*C kernel"):
        kernels.implementation("sago", "fast")


# ----- the choice -----------------------------------------------------------------------------


def _chosen(operation, f, r, out=None, **kw):
    out = r if out is None else out
    if operation == "linear":
        return select.select_linear(f, r, out, kw.get("weight", 0.5))[0].name
    if operation == "dots":
        return select.select_dots(f, r, any_size=kw.get("any_size", False)).name
    return select.select_elementwise(operation, f, r, out).name


def test_the_selector_chooses_from_size_layout_dtype_weight_and_policy():
    big, small = torch.ones(kernels.MIN_NUMEL), torch.ones(100)
    with kernels.use_backend("auto"):
        assert _chosen("sago", big, big.clone()) == "compiled"
        assert _chosen("sago", small, small.clone()) == "eager"  # the call overhead would dominate
        view = big.view(2, -1).t()
        assert _chosen("sago", view, view.clone().t()) == "eager"  # not contiguous
        assert _chosen("sago", big, big.double()) == "eager"  # mixed dtypes: eager names the problem
        assert _chosen("linear", big, big.clone(), weight=1e-40) == "compiled float64"
        assert _chosen("linear", big, big.clone(), weight=1e70) == "eager"
        assert _chosen("linear", big, big.clone(), weight=float("nan")) == "eager"
        assert (
            _chosen("linear", big, big.clone(), weight=torch.tensor(0.5, dtype=torch.float64)) == "compiled"
        )
        c_dots = select.c.available("dots", torch.float32)
        assert _chosen("dots", small, small, any_size=True) == ("C kernel" if c_dots else "eager")
        assert _chosen("dots", small, small) == "eager"  # small: the eager sums, whatever the C kernel
    with kernels.use_backend("eager"):
        assert _chosen("sago", big, big.clone()) == "eager"
        assert _chosen("dots", big, big.clone(), any_size=True) == "eager"
        assert _chosen("linear", big.bfloat16(), big.bfloat16()) == "eager"


@pytest.mark.skipif(not C_BF16, reason="no native bfloat16 kernels")
def test_bfloat16_on_the_cpu_takes_the_c_kernels_at_any_size_but_not_on_two_threads():
    small = torch.ones(10, dtype=torch.bfloat16)
    for backend in ("auto", "compiled"):
        with kernels.use_backend(backend):
            assert _chosen("sago", small, small.clone()) == "C kernel"
            assert _chosen("linear", small, small.clone(), weight=0.5) == "C kernel"
            assert _chosen("linear", small, small.clone(), weight=1e-40) == "eager"  # not float32-exact
    torch.set_num_threads(2)  # (conftest restores one thread)
    with kernels.use_backend("compiled", min_numel=0):
        assert _chosen("sago", small, small.clone()) == "compiled"


@pytest.mark.skipif(not C_BF16, reason="no native bfloat16 kernels")
def test_status_names_the_c_kernel_under_the_compiled_backend():
    """Under "compiled", bfloat16 CPU tensors run the C kernels: `status` says so (it said nothing)."""
    f, r = rule_pair(torch.bfloat16, n=70_000)
    with kernels.use_backend("compiled"):
        sago(f, r, out=r)
        kernels.host_dots(f, r)
    assert kernels.status()["sago[bfloat16, cpu]"] == "C kernel"
    assert kernels.status()["dots[bfloat16, cpu]"] == "C kernel"
    assert "C kernel" in kernels.history()[("sago", torch.bfloat16, "cpu")]


def test_status_names_each_implementation_that_ran():
    f, r = rule_pair(torch.float32, n=kernels.MIN_NUMEL)
    with kernels.use_backend("compiled"):
        sago(f, r, out=r)
    assert kernels.status()["sago[float32, cpu]"] == "compiled"
    with kernels.use_backend("eager"):
        sago(f, r, out=r)
    assert kernels.status()["sago[float32, cpu]"] == "eager"
    assert {"compiled", "eager"} <= set(kernels.history()[("sago", torch.float32, "cpu")])


# ----- the policy -----------------------------------------------------------------------------


def test_blocks_restore_the_previous_policy_not_auto():
    before = kernels.current()
    with kernels.use_backend("compiled", min_numel=7):
        with kernels.use_backend("auto", min_step_numel=10**9):
            with kernels.for_step(5):  # small under "auto": eager for the step
                assert kernels.get_backend() == "eager"
            assert kernels.current() == kernels.Policy("auto", 7, 10**9)
        assert kernels.current() == kernels.Policy("compiled", 7, before.min_step_numel)
        with kernels.for_step(5):  # "compiled" is kept whatever the size
            assert kernels.get_backend() == "compiled"
        kernels.set_backend("eager")  # inside a block: that block's policy only
        assert kernels.get_backend() == "eager"
    assert kernels.current() == before


def test_a_block_in_one_thread_does_not_change_another_threads_policy():
    seen = []
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen.append(kernels.get_backend())
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with kernels.use_backend("eager"):
        inside.set()
        release.wait(10)
    thread.join()
    assert seen == [kernels.current().resolved()] and seen != ["eager"]


# ----- the direct call around torch.compile --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_direct_call_is_set_up_and_equals_torch_compile(dtype):
    """Fails when torch changes the private details `direct_call` relies on (placeholder names,
    symbolic sizes, the graph's calling convention): the shortcut would silently be lost."""
    f, r = rule_pair(dtype, n=40_000)
    out = torch.empty_like(r)
    compiled.run("sago_into_out", out, f, r, 0.5, 2.0)  # compiled here, or earlier in the process
    compiled.run("sago_into_out", out, f, r, 0.5, 2.0)
    assert direct_call.known("sago_into_out", dtype, f.device), (
        "torch.compile's graph could not be called directly: torch internals changed; update "
        "gradsynth/rules/kernels/direct_call.py (see its docstring)"
    )
    f2, r2 = rule_pair(dtype, n=12_345)  # another size: dynamic shapes, no recompilation
    direct, through = torch.empty_like(r2), torch.empty_like(r2)
    hit, _ = direct_call.call(
        "sago_into_out", compiled._compiled["sago_into_out"], (direct, f2, r2, 0.5, 2.0), None
    )
    assert hit
    compiled._compiled["sago_into_out"](*(compiled.flat(t) for t in (through, f2, r2)), 0.5, 2.0)
    assert torch.equal(
        direct.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        through.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    torch.testing.assert_close(direct.double(), oracle.sago(f2, r2, 0.5, 2.0), rtol=1e-2, atol=1e-30)


@pytest.mark.parametrize("name", list(geometry_sums.MEASURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_geometry_implementation_matches_the_oracle(name, dtype, monkeypatch):
    if name == "C kernel" and not select.c.available("geometry", dtype):
        pytest.skip(f"no C geometry kernel for {dtype} here ({native.reason()})")
    monkeypatch.setattr(geometry_sums, "MEASURE_CHUNK", 1024)  # 3 chunks and a short one
    f, r = rule_pair(dtype, n=3 * 1024 + 17)
    want = torch.empty_like(r)
    kernels.sago(f, r, want, alpha=0.8, gamma=1.3)
    out, sink = r.clone(), GeometryAccumulator()
    geometry_sums.MEASURES[name](
        lambda a, b, g: kernels.sago(a, b, g, alpha=0.8, gamma=1.3), f, out, out, sink
    )
    assert torch.equal(out, want)  # the same kernel wrote the same update
    expected = oracle.geometry([f], [r], [want])
    assert sink.result().as_dict() == pytest.approx(expected | {"numel": f.numel()}, rel=1e-12)


def test_the_geometry_choice():
    f = torch.ones(5000)
    assert select.select_geometry(f, f, f.clone()) == (
        "C kernel" if select.c.available("geometry", torch.float32) else "float64 matrix product"
    )
    view = f.view(50, 100).t()
    assert select.select_geometry(view, view, view) == "whole tensor"
    assert select.select_geometry(f.double(), f.double(), f.double()) == "float64 matrix product"
