/* bfloat16 kernels for x86 processors with AVX2 and FMA: the one-read inner products, the linear
 * apply (sum, PCGrad) and the two SAGO rules, each one pass over memory.
 *
 * A bfloat16 value is the upper half of a float32, so widening it is a 16-bit shift (here an
 * interleave with zeros). The compiled kernels convert through the generic float32 <-> bfloat16
 * routines, and on AVX2 hosts the conversions made them cost 1.0-1.4x torch.add on cached tensors;
 * these run at the speed of memory.
 *
 * The functions are compiled for AVX2 + FMA whatever the compiler's default target, and must only
 * be called where gradsynth_bf16_supported() says the processor has both. Elsewhere (or on other
 * architectures, where it returns 0) the caller takes the compiled path.
 */
#include <stdint.h>
#include <string.h>

#ifndef AHEAD
#define AHEAD 2048 /* elements: 4 KiB ahead in each stream */
#endif

static inline float widen(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Round to nearest even, as torch does; NaN becomes the quiet NaN 0x7FC0. */
static inline uint16_t narrow(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if (x != x) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* The geometry sums of one bfloat16 chunk (as gradsynth_geometry_f32 in dots.c: every value and
 * product exact in float64), added into acc[0..6]. Plain C, any processor. */
#define GLANES 16
void gradsynth_geometry_bf16(const uint16_t *f, const uint16_t *r, const uint16_t *g, int64_t n, double *acc) {
    double ff[GLANES] = {0}, rr[GLANES] = {0}, fr[GLANES] = {0}, gg[GLANES] = {0}, gf[GLANES] = {0};
    double gr[GLANES] = {0}, cc[GLANES] = {0};
    int64_t i = 0;
    for (; i + GLANES <= n; i += GLANES) {
        for (int j = 0; j < GLANES; ++j) {
            double a = widen(f[i + j]), b = widen(r[i + j]), c = widen(g[i + j]), p = a * b;
            /* fused multiply-adds of exact products: the same roundings as the sum of the product */
            ff[j] = __builtin_fma(a, a, ff[j]);
            rr[j] = __builtin_fma(b, b, rr[j]);
            fr[j] += p;
            gg[j] = __builtin_fma(c, c, gg[j]);
            gf[j] = __builtin_fma(c, a, gf[j]);
            gr[j] = __builtin_fma(c, b, gr[j]);
            cc[j] += (double)(p < 0);
        }
    }
    double s[7] = {0};
    for (; i < n; ++i) {
        double a = widen(f[i]), b = widen(r[i]), c = widen(g[i]), p = a * b;
        s[0] += a * a, s[1] += b * b, s[2] += p, s[3] += c * c, s[4] += c * a, s[5] += c * b;
        s[6] += p < 0 ? 1.0 : 0.0;
    }
    for (int j = 0; j < GLANES; ++j) {
        s[0] += ff[j], s[1] += rr[j], s[2] += fr[j], s[3] += gg[j], s[4] += gf[j], s[5] += gr[j];
        s[6] += cc[j];
    }
    for (int k = 0; k < 7; ++k) acc[k] += s[k];
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TARGET __attribute__((target("avx2,fma")))

int gradsynth_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* (<f, r>, ||r||^2) in float64: every bfloat16 value and product is exact in float64, so the only
 * rounding is the float64 summation (8 accumulators of 4 lanes, then across them). The lanes see
 * the elements in an interleaved order (unpack works within 128-bit halves), the same for f and r. */
TARGET void gradsynth_dots_bf16(const uint16_t *f, const uint16_t *r, int64_t n, double *out) {
    const __m256i zero = _mm256_setzero_si256();
    __m256d fr0 = _mm256_setzero_pd(), fr1 = fr0, fr2 = fr0, fr3 = fr0;
    __m256d rr0 = fr0, rr1 = fr0, rr2 = fr0, rr3 = fr0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(f + i + AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(r + i + AHEAD), _MM_HINT_T0);
        __m256i fb = _mm256_loadu_si256((const __m256i *)(f + i));
        __m256i rb = _mm256_loadu_si256((const __m256i *)(r + i));
        __m256 flo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, fb));
        __m256 fhi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, fb));
        __m256 rlo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, rb));
        __m256 rhi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, rb));
        __m256d f0 = _mm256_cvtps_pd(_mm256_castps256_ps128(flo));
        __m256d f1 = _mm256_cvtps_pd(_mm256_extractf128_ps(flo, 1));
        __m256d f2 = _mm256_cvtps_pd(_mm256_castps256_ps128(fhi));
        __m256d f3 = _mm256_cvtps_pd(_mm256_extractf128_ps(fhi, 1));
        __m256d r0 = _mm256_cvtps_pd(_mm256_castps256_ps128(rlo));
        __m256d r1 = _mm256_cvtps_pd(_mm256_extractf128_ps(rlo, 1));
        __m256d r2 = _mm256_cvtps_pd(_mm256_castps256_ps128(rhi));
        __m256d r3 = _mm256_cvtps_pd(_mm256_extractf128_ps(rhi, 1));
        fr0 = _mm256_fmadd_pd(f0, r0, fr0);
        fr1 = _mm256_fmadd_pd(f1, r1, fr1);
        fr2 = _mm256_fmadd_pd(f2, r2, fr2);
        fr3 = _mm256_fmadd_pd(f3, r3, fr3);
        rr0 = _mm256_fmadd_pd(r0, r0, rr0);
        rr1 = _mm256_fmadd_pd(r1, r1, rr1);
        rr2 = _mm256_fmadd_pd(r2, r2, rr2);
        rr3 = _mm256_fmadd_pd(r3, r3, rr3);
    }
    double lanes[2][4];
    _mm256_storeu_pd(lanes[0], _mm256_add_pd(_mm256_add_pd(fr0, fr1), _mm256_add_pd(fr2, fr3)));
    _mm256_storeu_pd(lanes[1], _mm256_add_pd(_mm256_add_pd(rr0, rr1), _mm256_add_pd(rr2, rr3)));
    double s = 0, t = 0;
    for (; i < n; ++i) {
        double a = widen(f[i]), b = widen(r[i]);
        s += a * b;
        t += b * b;
    }
    for (int j = 0; j < 4; ++j) {
        s += lanes[0][j];
        t += lanes[1][j];
    }
    out[0] = s;
    out[1] = t;
}

/* 16 bfloat16 values as two vectors of float32, interleaved within the 128-bit halves (unpack
 * puts each value above 16 zero bits: the float32 of the same value). `store16` packs them back
 * in order, so the elementwise kernels need no cross-lane shuffle. */
TARGET static inline void load16(const uint16_t *p, __m256 *lo, __m256 *hi) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h));
}

/* float32 rounded to bfloat16 as torch rounds (nearest even; NaN as 0x7FC0), in the low 16 bits. */
TARGET static inline __m256i narrow8(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

TARGET static inline void store16(uint16_t *p, __m256 lo, __m256 hi) {
    _mm256_storeu_si256((__m256i *)p, _mm256_packus_epi32(narrow8(lo), narrow8(hi)));
}

enum kind { LINEAR, SAGO, PREFER };

/* The kernels in float32, the operations of the compiled kernels (gradsynth/rules/fused.py) in
 * the same order, rounded once to bfloat16, with a = alpha r and b = gamma f:
 *   linear: a + b
 *   sago:   c ? a + (b - b) : b + (a - a)        prefer: a + (c ? b - b : b)
 * where c = (f S)(r S) < 0, S = 2^117: the sign of the product, which never underflows; x - x is
 * 0, or NaN where x is not finite (the eager rules' 0 * x). No fused multiply-add (the library is
 * built with -ffp-contract=off). */
static inline float apply1(enum kind kind, float f, float r, float alpha, float gamma) {
    const float S = 0x1p117f;
    float a = r * alpha, b = gamma * f;
    if (kind == LINEAR) return a + b;
    int c = (f * S) * (r * S) < 0;
    if (kind == PREFER) return a + (c ? b - b : b);
    return c ? a + (b - b) : b + (a - a);
}

TARGET static inline __m256 apply8(enum kind kind, __m256 f, __m256 r, __m256 alpha, __m256 gamma) {
    const __m256 S = _mm256_set1_ps(0x1p117f);
    __m256 a = _mm256_mul_ps(r, alpha), b = _mm256_mul_ps(gamma, f);
    if (kind == LINEAR) return _mm256_add_ps(a, b);
    __m256 c = _mm256_cmp_ps(_mm256_mul_ps(_mm256_mul_ps(f, S), _mm256_mul_ps(r, S)), _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 db = _mm256_sub_ps(b, b);
    if (kind == PREFER) return _mm256_add_ps(a, _mm256_blendv_ps(b, db, c));
    __m256 da = _mm256_sub_ps(a, a);
    return _mm256_add_ps(_mm256_blendv_ps(b, a, c), _mm256_blendv_ps(da, db, c));
}

/* out = kernel(f, r); out may be f or r itself (each element is read before it is written). */
TARGET static inline void apply(enum kind kind, uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n,
                                float alpha, float gamma) {
    const __m256 av = _mm256_set1_ps(alpha), gv = _mm256_set1_ps(gamma);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) { /* one 64-byte line of each stream */
        _mm_prefetch((const char *)(f + i + AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(r + i + AHEAD), _MM_HINT_T0);
        for (int j = 0; j < 32; j += 16) {
            __m256 f0, f1, r0, r1;
            load16(f + i + j, &f0, &f1);
            load16(r + i + j, &r0, &r1);
            store16(out + i + j, apply8(kind, f0, r0, av, gv), apply8(kind, f1, r1, av, gv));
        }
    }
    for (; i < n; ++i) out[i] = narrow(apply1(kind, widen(f[i]), widen(r[i]), alpha, gamma));
}

TARGET void gradsynth_linear_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha,
                                  float gamma) {
    apply(LINEAR, out, f, r, n, alpha, gamma);
}

TARGET void gradsynth_sago_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha,
                                float gamma) {
    apply(SAGO, out, f, r, n, alpha, gamma);
}

TARGET void gradsynth_prefer_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha,
                                  float gamma) {
    apply(PREFER, out, f, r, n, alpha, gamma);
}

/* The geometry sums of 8 float32 values of f, r and g, exact in float64, into two half-vector
 * accumulators per sum (sum[k][0..1]) and the conflict counts (count[0..1], -1 added per conflict
 * as the compare's all-ones mask, negated at the end). */
TARGET static inline void sums8(__m256 x, __m256 y, __m256 u, __m256d sum[6][2], __m256i count[2]) {
    for (int h = 0; h < 2; ++h) {
        __m128 xh = h ? _mm256_extractf128_ps(x, 1) : _mm256_castps256_ps128(x);
        __m128 yh = h ? _mm256_extractf128_ps(y, 1) : _mm256_castps256_ps128(y);
        __m128 uh = h ? _mm256_extractf128_ps(u, 1) : _mm256_castps256_ps128(u);
        __m256d dx = _mm256_cvtps_pd(xh), dy = _mm256_cvtps_pd(yh), du = _mm256_cvtps_pd(uh);
        __m256d p = _mm256_mul_pd(dx, dy);
        sum[0][h] = _mm256_fmadd_pd(dx, dx, sum[0][h]);
        sum[1][h] = _mm256_fmadd_pd(dy, dy, sum[1][h]);
        sum[2][h] = _mm256_add_pd(sum[2][h], p);
        sum[3][h] = _mm256_fmadd_pd(du, du, sum[3][h]);
        sum[4][h] = _mm256_fmadd_pd(du, dx, sum[4][h]);
        sum[5][h] = _mm256_fmadd_pd(du, dy, sum[5][h]);
        count[h] = _mm256_add_epi64(count[h], _mm256_castpd_si256(_mm256_cmp_pd(p, _mm256_setzero_pd(), _CMP_LT_OQ)));
    }
}

/* A kernel above with the geometry sums of f, r and the written g (the bfloat16 value, widened)
 * added into acc[0..6] in the same loop, as gradsynth_rule_geometry_f32 does for float32: the
 * same apply8/narrow8, so g is bit-identical to the kernel's; every value and product exact in
 * float64 (sums as gradsynth_geometry_bf16, in another grouping). out may be f or r. */
TARGET static inline void apply_geometry(enum kind kind, uint16_t *out, const uint16_t *f, const uint16_t *r,
                                         int64_t n, float alpha, float gamma, double *acc) {
    const __m256 av = _mm256_set1_ps(alpha), gv = _mm256_set1_ps(gamma);
    __m256d sum[6][2];
    __m256i count[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int k = 0; k < 6; ++k) sum[k][0] = sum[k][1] = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(f + i + AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(r + i + AHEAD), _MM_HINT_T0);
        __m256 f0, f1, r0, r1;
        load16(f + i, &f0, &f1);
        load16(r + i, &r0, &r1);
        __m256i g0 = narrow8(apply8(kind, f0, r0, av, gv)), g1 = narrow8(apply8(kind, f1, r1, av, gv));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_packus_epi32(g0, g1));
        sums8(f0, r0, _mm256_castsi256_ps(_mm256_slli_epi32(g0, 16)), sum, count);
        sums8(f1, r1, _mm256_castsi256_ps(_mm256_slli_epi32(g1, 16)), sum, count);
    }
    double s[7] = {0}, lanes[4];
    int64_t counts[4];
    for (int k = 0; k < 6; ++k) {
        _mm256_storeu_pd(lanes, _mm256_add_pd(sum[k][0], sum[k][1]));
        s[k] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    }
    _mm256_storeu_si256((__m256i *)counts, _mm256_add_epi64(count[0], count[1]));
    s[6] = -(double)(counts[0] + counts[1] + counts[2] + counts[3]);
    for (; i < n; ++i) {
        uint16_t v = narrow(apply1(kind, widen(f[i]), widen(r[i]), alpha, gamma));
        double a = widen(f[i]), b = widen(r[i]), c = widen(v), p = a * b;
        out[i] = v;
        s[0] += a * a, s[1] += b * b, s[2] += p, s[3] += c * c, s[4] += c * a, s[5] += c * b;
        s[6] += p < 0 ? 1.0 : 0.0;
    }
    for (int k = 0; k < 7; ++k) acc[k] += s[k];
}

/* kind as gradsynth_rule_geometry_f32's: 0 sago, 1 prefer, 2 linear. */
TARGET void gradsynth_rule_geometry_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n,
                                         float alpha, float gamma, int kind, double *acc) {
    if (kind == 0)
        apply_geometry(SAGO, out, f, r, n, alpha, gamma, acc);
    else if (kind == 1)
        apply_geometry(PREFER, out, f, r, n, alpha, gamma, acc);
    else
        apply_geometry(LINEAR, out, f, r, n, alpha, gamma, acc);
}

#else
int gradsynth_bf16_supported(void) { return 0; }
void gradsynth_sago_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha, float gamma) {
    (void)out, (void)f, (void)r, (void)n, (void)alpha, (void)gamma;
}
void gradsynth_prefer_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha, float gamma) {
    (void)out, (void)f, (void)r, (void)n, (void)alpha, (void)gamma;
}
void gradsynth_dots_bf16(const uint16_t *f, const uint16_t *r, int64_t n, double *out) {
    (void)f, (void)r, (void)n, (void)out;
}
void gradsynth_linear_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float w, float g) {
    (void)out, (void)f, (void)r, (void)n, (void)w, (void)g;
}
void gradsynth_rule_geometry_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float alpha,
                                  float gamma, int kind, double *acc) {
    (void)out, (void)f, (void)r, (void)n, (void)alpha, (void)gamma, (void)kind, (void)acc;
}
#endif
