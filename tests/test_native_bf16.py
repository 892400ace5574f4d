"""The bfloat16 C kernels (AVX2 + FMA): float64-accurate sums, the compiled kernels' elementwise
results bit for bit, used where they should be, and never needed.

The inner products must agree with exactly rounded sums to the float64 summation bound (every
bfloat16 product is exact in float64). The elementwise kernels must equal float32 arithmetic
rounded to bfloat16 as torch rounds it, and the compiled kernels they stand in for. Wherever they
cannot run (no AVX2, several threads, switched off, a wrong build), every result comes from the
compiled path unchanged.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from gradsynth.rules import fused, native
from gradsynth.rules.pcgrad import PCGradGlobal, pcgrad
from gradsynth.rules.sago import sago, sago_prefer_retain
from gradsynth.rules.weighted_sum import weighted_sum

pytestmark = pytest.mark.skipif(
    not native.bf16_supported(), reason=f"no native bfloat16 kernels ({native.reason()}, or no AVX2)"
)

BF16_MAX = 2.0**127 * (2 - 2.0**-7)  # 3.3895e38: larger float32 values round to infinity
FLOAT32 = st.floats(-BF16_MAX, BF16_MAX, width=32)
SPECIAL = st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-133, -(2.0**-133), 3.0e38])
RULES = {"sago": sago, "prefer": sago_prefer_retain, "linear": weighted_sum}


def _bf16(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).bfloat16()


def _assert_within_summation_bound(f: torch.Tensor, r: torch.Tensor) -> None:
    got = native.dots_bf16(f, r)
    assert got is not None
    fs, rs = f.double().tolist(), r.double().tolist()  # bfloat16 products are exact in float64
    exact = math.fsum(a * b for a, b in zip(fs, rs, strict=True)), math.fsum(b * b for b in rs)
    sizes = ((f.double() * r.double()).abs().sum(), (r.double() ** 2).sum())
    n = f.numel()
    for value, truth, terms in zip(got, exact, sizes, strict=True):
        # Recursive summation: |error| <= (n - 1) u sum|terms|, u = 2**-53.
        assert abs(value - truth) <= max(n - 1, 0) * 2.0**-53 * float(terms), (value, truth)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit, every NaN counting as NaN (the payload is not specified)."""
    nan = want.isnan()
    bits = got[~nan].view(torch.int16), want[~nan].view(torch.int16)
    return torch.equal(got.isnan(), nan) and torch.equal(*bits)


@given(st.lists(st.tuples(FLOAT32, FLOAT32), max_size=70))
def test_dots_are_within_float64_summation_bound(pairs):
    _assert_within_summation_bound(_bf16([a for a, _ in pairs]), _bf16([b for _, b in pairs]))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4099, 100_003])
@pytest.mark.parametrize("offset", [0, 3])
def test_dots_of_views_at_any_offset_and_length(n, offset):
    generator = torch.Generator().manual_seed(n)
    base = (torch.randn(2, n + offset, generator=generator) * torch.logspace(-30, 30, n + offset)).bfloat16()
    _assert_within_summation_bound(base[0, offset:], base[1, offset:])


def test_dots_of_values_whose_products_underflow_float32():
    # 2**-100 * 2**-100 is below float32's range (a float32 product would be 0); float64 keeps it.
    f, r = _bf16([2.0**-100] * 40), _bf16([2.0**-100] * 40)
    assert native.dots_bf16(f, r) == (40 * 2.0**-200, 40 * 2.0**-200)


@given(
    st.lists(st.tuples(st.one_of(FLOAT32, SPECIAL), st.one_of(FLOAT32, SPECIAL)), max_size=70),
    st.floats(0, 1e6, allow_subnormal=False),
    st.floats(0, 1e6, allow_subnormal=False),
)
def test_elementwise_kernels_are_float32_arithmetic_rounded_as_torch_rounds(pairs, alpha, gamma):
    f, r = _bf16([a for a, _ in pairs]), _bf16([b for _, b in pairs])
    for kernel, want in native.expected_applies(f.float(), r.float(), alpha, gamma).items():
        out = torch.empty_like(r)
        assert native.apply_bf16(kernel, out, f, r, alpha, gamma)
        assert _same(out, want.bfloat16()), kernel


def test_halfway_cases_round_to_even():
    # 1 + 2**-8 lies halfway between 1 and 1 + 2**-7: to the even 1; 1 + 3 * 2**-8 up to 1 + 2**-6.
    r = _bf16([1.0, 1.0 + 2**-7, 1.0, 1.0] * 9)
    f = _bf16([2**-8, 2**-8, 2**-8 + 2**-15, 2**-7 + 2**-8] * 9)
    out = torch.empty_like(r)
    assert native.apply_bf16("linear", out, f, r, 1.0, 1.0)
    assert out[:4].tolist() == [1.0, 1.0 + 2**-6, 1.0 + 2**-7, 1.0 + 2**-6]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 31, 32, 33, 4099, 100_003])
@pytest.mark.parametrize("destination", ["new", "forget", "retain"])
def test_elementwise_kernels_of_views_at_any_offset_length_and_destination(n, destination):
    generator = torch.Generator().manual_seed(n)
    base = (torch.randn(2, n + 3, generator=generator) * torch.logspace(-30, 30, n + 3)).bfloat16()
    for kernel, want in native.expected_applies(base[0, 3:].float(), base[1, 3:].float(), 0.3, 1.7).items():
        f, r = base[0, 3:].clone(), base[1, 3:].clone()
        f, r = torch.cat([f[:1], f])[1:], torch.cat([r[:1], r])[1:]  # start inside their storage
        out = {"new": torch.empty_like(r), "forget": f, "retain": r}[destination]
        assert native.apply_bf16(kernel, out, f, r, 0.3, 1.7)
        assert _same(out, want.bfloat16()), kernel


def _specials(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pair = []
    for scale in (torch.logspace(-40, 38, n), torch.logspace(38, -40, n)):
        t = (torch.randn(n, generator=generator) * scale).bfloat16()
        where = torch.randint(0, n, (400,), generator=generator)
        for i, value in enumerate([math.inf, -math.inf, math.nan, 0.0]):
            t[where[100 * i : 100 * (i + 1)]] = value
        pair.append(t)
    return pair[0], pair[1]


@pytest.mark.parametrize(("alpha", "gamma"), [(1.0, 1.0), (0.37, 2.9)])
def test_kernels_equal_the_compiled_kernels_bit_for_bit(monkeypatch, alpha, gamma):
    # Where the C kernels cannot run, the compiled ones do: the results must not depend on which.
    f, r = _specials(70_000, 1)
    results = {}
    for path in ("native", "compiled"):
        monkeypatch.setitem(native._state, "bf16", path == "native")
        with fused.use_backend("compiled"):
            for name, rule in RULES.items():
                for destination in ("new", "forget", "retain"):
                    fc, rc = f.clone(), r.clone()
                    out = {"new": None, "forget": fc, "retain": rc}[destination]
                    results[path, name, destination] = rule(fc, rc, alpha=alpha, gamma=gamma, out=out)
            # (Moderate values: the compiled kernel's float32 block sums overflow where float64 does not.)
            generator = torch.Generator().manual_seed(3)
            results[path, "dots"] = fused.host_dots(*torch.randn(2, 50_000, generator=generator).bfloat16())
    for key, got in results.items():
        if key[0] == "native" and key[1] != "dots":
            assert _same(got, results[("compiled", *key[1:])]), key
    # float32 block sums against float64 ones:
    torch.testing.assert_close(results["compiled", "dots"], results["native", "dots"], rtol=1e-6, atol=0)


@pytest.fixture
def spy(monkeypatch):
    """The kernels that ran (were called and did not decline), in order."""
    calls = []
    dots, apply = native.dots_bf16, native.apply_bf16

    def spy_dots(f, r):
        pair = dots(f, r)
        calls.extend(["dots"] if pair is not None else [])
        return pair

    def spy_apply(kernel, *args):
        done = apply(kernel, *args)
        calls.extend([kernel] if done else [])
        return done

    monkeypatch.setattr(native, "dots_bf16", spy_dots)
    monkeypatch.setattr(native, "apply_bf16", spy_apply)
    return calls


@pytest.mark.parametrize("n", [300, 50_000])  # below and above fused.MIN_NUMEL
def test_rules_use_the_kernels_on_one_thread_at_any_size(spy, n):
    f, r = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    with fused.use_backend("auto", min_step_numel=0):
        sago(f, r)
        sago_prefer_retain(f, r)
        weighted_sum(f, r, alpha=0.5)
        got = pcgrad(f, r)
        rule = PCGradGlobal()
        context = rule.prepare([f], [r], alpha=[1.0], gamma=[1.0])
        rule.combine(f, r.clone(), alpha=1.0, gamma=1.0, out=f.clone(), context=context)
    assert spy == ["sago", "prefer", "linear", "dots", "linear", "dots", "linear"]
    fr, rr = float((f.double() * r.double()).sum()), float((r.double() ** 2).sum())
    want = f.double() + (1 - min(fr, 0) / rr) * r.double()
    # float32 arithmetic rounded to bfloat16: a few units of bfloat16's last place of the terms.
    assert torch.all((got.double() - want).abs() <= 2**-7 * (f.double().abs() + r.double().abs()) + 1e-30)
    version = r._version
    sago(f, r, out=r.clone())
    sago(f, r, out=r)
    assert r._version == version + 1  # written in place, and counted so for autograd


def test_kernels_are_not_used_with_threads_the_eager_backend_or_float32(spy):
    f, r = torch.randn(50_000).bfloat16(), torch.randn(50_000).bfloat16()
    with fused.use_backend("eager"):
        sago(f, r)
        pcgrad(f, r)
    sago(f.float(), r.float())
    weighted_sum(f.float(), r.float())
    torch.set_num_threads(2)
    try:
        assert not native.bf16_available()
        sago(f, r)
        pcgrad(f, r)
    finally:
        torch.set_num_threads(1)
    assert spy == []


def test_a_weight_beyond_the_float_kernels_takes_the_eager_float64_path(spy):
    # k = <f, r> / ||r||^2 ~ -1e30: the weight 1 - k is beyond 2**64, for the float64 eager path.
    for n in (300, 50_000):
        f, r = torch.ones(n).bfloat16(), torch.full((n,), -1e-30).bfloat16()
        got = pcgrad(f, r)
        with fused.use_backend("eager"):
            assert torch.equal(got, pcgrad(f, r))
    assert set(spy) == {"dots"}  # the weight was formed, then nothing was written natively


@pytest.mark.parametrize("how", ["no AVX2", "switched off", "wrong results"])
def test_without_the_kernels_results_come_from_the_compiled_path(fresh_native, monkeypatch, how):
    if how == "no AVX2":
        monkeypatch.setattr(native, "_bf16_supported", lambda library: False)
    elif how == "switched off":
        monkeypatch.setenv("GRADSYNTH_NATIVE", "0")
    else:  # kernels that build but compute something else are refused by the load check
        wrong = fresh_native / "bf16.c"
        source = native._BF16_SOURCE.read_text()
        wrong.write_text(source.replace("return _mm256_add_ps(a, b);", "return _mm256_sub_ps(a, b);"))
        monkeypatch.setattr(native, "_BF16_SOURCE", wrong)
    f, r = _specials(50_000, 2)
    assert not native.bf16_available()
    assert (native.reason() == "built") == (how == "no AVX2")
    with fused.use_backend("compiled"):
        got = {name: rule(f, r, alpha=0.5, gamma=2.0) for name, rule in RULES.items()}
    for name, want in native.expected_applies(f.float(), r.float(), 0.5, 2.0).items():
        assert _same(got[name], want.bfloat16()), name
    # (Moderate values: the compiled kernel's float32 block sums overflow where float64 does not.)
    f, r = torch.randn(50_000).bfloat16(), torch.randn(50_000).bfloat16()
    fr, rr = fused.host_dots(f, r)
    torch.testing.assert_close(fr, float((f.double() * r.double()).sum()), rtol=1e-6, atol=0)
    torch.testing.assert_close(rr, float((r.double() ** 2).sum()), rtol=1e-6, atol=0)
