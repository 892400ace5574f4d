"""The C kernel of the one-read inner products: float64-accurate, and never needed.

It must agree with exactly rounded sums to the float64 summation bound, follow float64's
non-finite rules, and, wherever it cannot be built or is switched off, leave every result to the
compiled path unchanged.
"""

from __future__ import annotations

import math
import threading

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from gradsynth.rules import fused, native, pcgrad
from gradsynth.rules.pcgrad import PCGradGlobal

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native kernel: {native.reason()}")

FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _exact(f: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    # float32 products are exact in float64, and fsum rounds their sum once.
    fs, rs = f.double().tolist(), r.double().tolist()
    return math.fsum(a * b for a, b in zip(fs, rs, strict=True)), math.fsum(b * b for b in rs)


def _assert_within_summation_bound(f: torch.Tensor, r: torch.Tensor) -> None:
    got = native.dots_f32(f, r)
    assert got is not None
    exact = _exact(f, r)
    n = f.numel()
    sizes = ((f.double() * r.double()).abs(), r.double() ** 2)
    for value, truth, terms in zip(got, exact, sizes, strict=True):
        # Recursive summation: |error| <= (n - 1) u sum|terms|, u = 2**-53.
        assert abs(value - truth) <= max(n - 1, 0) * 2.0**-53 * float(terms.sum()), (value, truth)


@given(st.lists(st.tuples(FLOAT32, FLOAT32), max_size=70))
def test_dots_are_within_float64_summation_bound(pairs):
    f = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    r = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    _assert_within_summation_bound(f, r)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4099, 100_003])
@pytest.mark.parametrize("offset", [0, 3])
def test_dots_of_views_at_any_offset_and_length(n, offset):
    generator = torch.Generator().manual_seed(n)
    base = torch.randn(2, n + offset, generator=generator) * torch.logspace(-20, 20, n + offset)
    f, r = base[0, offset:], base[1, offset:]  # contiguous views that start inside their storage
    _assert_within_summation_bound(f, r)


def test_dots_cancelling_sum_is_exact_to_the_bound():
    # <f, r> = 0 exactly, from terms up to 1e30: float32 would lose everything here.
    f = torch.tensor([1e15, 1.0, -1e15, 3.0] * 5000, dtype=torch.float32)
    r = torch.tensor([1e15, 2.0, 1e15, -1.0] * 5000, dtype=torch.float32)
    fr, _ = native.dots_f32(f, r)
    assert abs(fr - _exact(f, r)[0]) <= f.numel() * 2.0**-53 * float((f.double() * r.double()).abs().sum())


@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [
        ("dots_f32", torch.float32),
        pytest.param(
            "dots_bf16",
            torch.bfloat16,
            marks=pytest.mark.skipif(not native.bf16_supported(), reason="no bfloat16 kernel here"),
        ),
    ],
)
@pytest.mark.parametrize(
    ("values", "expect"),
    [
        ([math.inf, 1.0], math.inf),
        ([-math.inf, 1.0], -math.inf),
        ([math.inf, -math.inf], "nan"),
        ([math.nan, 1.0], "nan"),
    ],
)
def test_non_finite_values_follow_float64(kernel, dtype, values, expect):
    f = torch.tensor(values * 20, dtype=dtype)
    r = torch.ones_like(f)
    fr, rr = getattr(native, kernel)(f, r)
    expected = float((f.double() * r.double()).sum())
    assert (math.isnan(fr) and expect == "nan") or fr == expect == expected
    assert rr == f.numel()


def test_fused_dots_and_pcgrad_use_the_kernel_on_one_thread(monkeypatch):
    calls = []
    real = native.dots_f32
    monkeypatch.setattr(native, "dots_f32", lambda f, r: calls.append(f.numel()) or real(f, r))
    f, r = torch.randn(50_000), torch.randn(50_000)
    with fused.use_backend("auto"):
        fr, rr = fused.dots(f, r)
        out = pcgrad(f, r)
    assert calls == [50_000, 50_000]
    exact = _exact(f, r)
    assert abs(fr.item() - exact[0]) <= 1e-12 * float((f.double() * r.double()).abs().sum())
    torch.testing.assert_close(rr.item(), exact[1], rtol=1e-14, atol=0)
    k = min(exact[0], 0.0) / exact[1]
    error = (out.double() - (f.double() + (1 - k) * r.double())).abs()
    assert torch.all(error <= 4e-7 * (f.double().abs() + abs(1 - k) * r.double().abs()))  # a few roundings


def test_kernel_is_not_used_with_threads_eager_backend_or_half_precision(monkeypatch):
    calls = []
    real = native.dots_f32
    monkeypatch.setattr(native, "dots_f32", lambda f, r: calls.append(1) or real(f, r))
    f, r = torch.randn(50_000), torch.randn(50_000)
    with fused.use_backend("eager"):
        fused.host_dots(f, r)
    fused.host_dots(f.bfloat16(), r.bfloat16())
    assert calls == []
    torch.set_num_threads(2)
    try:
        assert native.dots_f32(f, r) is None  # the compiled reduction runs on every thread
    finally:
        torch.set_num_threads(1)


def _global_pcgrad_matches_float64(fs, rs) -> None:
    rule = PCGradGlobal()
    context = rule.prepare(fs, rs, alpha=[1.0] * len(fs), gamma=[1.0] * len(fs))
    fr = sum(float((f.double() * r.double()).sum()) for f, r in zip(fs, rs, strict=True))
    rr = sum(float((r.double() ** 2).sum()) for r in rs)
    expected = torch.tensor(min(fr, 0) / rr, dtype=torch.float64)
    torch.testing.assert_close(context.double(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("how", ["switched off", "no compiler", "failing compiler", "wrong results"])
def test_without_the_kernel_results_come_from_the_compiled_path(fresh_native, monkeypatch, how):
    if how == "switched off":
        monkeypatch.setenv("GRADSYNTH_NATIVE", "0")
    elif how == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    elif how == "failing compiler":
        monkeypatch.setenv("CC", "false")
    else:  # a kernel that builds but computes something else is refused by the load check
        wrong = fresh_native / "dots.c"
        wrong.write_text(
            "#include <stdint.h>\n"
            "void gradsynth_dots_f32(const float *f, const float *r, int64_t n, double *out)"
            " { out[0] = 1.0; out[1] = 2.0; }\n"
        )
        monkeypatch.setattr(native, "_SOURCE", wrong)
    f, r = torch.randn(50_000), torch.randn(50_000)
    assert native.dots_f32(f, r) is None
    assert native.reason() != "built"
    exact = _exact(f, r)
    fr, _ = fused.host_dots(f, r)
    assert abs(fr - exact[0]) <= 1e-12 * float((f.double() * r.double()).abs().sum())
    fs, rs = [torch.randn(40_000), torch.randn(300)], [torch.randn(40_000), torch.randn(300)]
    _global_pcgrad_matches_float64(fs, rs)


def test_an_unwritable_cache_builds_into_a_private_folder(fresh_native, monkeypatch):
    blocker = fresh_native / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GRADSYNTH_CACHE", str(blocker))
    assert native.library() is not None
    assert native.reason() == "built"


def test_concurrent_builds_publish_one_whole_library(fresh_native):
    paths, errors = [], []

    def build():
        try:
            paths.append(native._build(native._compiler()))
        except OSError as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(paths)) == 1
    folder = paths[0].parent
    # No staging file left behind: the library, its owner-only manifest and the build lock.
    assert sorted(p.name for p in folder.iterdir()) == [".lock", paths[0].name, f"{paths[0].name}.sha256"]
    assert native.library() is not None  # and the published file loads and passes the check
    assert native.dots_f32(torch.ones(5), torch.full((5,), 2.0)) == (10.0, 20.0)
