/* bfloat16 kernels for x86 processors with AVX2 and FMA: the one-read inner products and the
 * linear apply of PCGrad, each one pass over memory.
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

#define AHEAD 2048 /* elements: 4 KiB ahead in each stream */

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

/* 8 bfloat16 values as float32, in order. */
TARGET static inline __m256 load8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 float32 values rounded to bfloat16 as torch rounds (nearest even; NaN as 0x7FC0). */
TARGET static inline void store8(uint16_t *p, __m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* out = w * r + g * f in float32 (two products and a sum, each rounded as the compiled kernel
 * rounds them, no fused multiply-add), rounded once to bfloat16. out may be f or r itself. */
TARGET void gradsynth_linear_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float w, float g) {
    const __m256 wv = _mm256_set1_ps(w), gv = _mm256_set1_ps(g);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm_prefetch((const char *)(f + i + AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(r + i + AHEAD), _MM_HINT_T0);
        __m256 y = _mm256_add_ps(_mm256_mul_ps(load8(r + i), wv), _mm256_mul_ps(load8(f + i), gv));
        store8(out + i, y);
    }
    for (; i < n; ++i) {
        float a = widen(r[i]) * w, b = widen(f[i]) * g;
        out[i] = narrow(a + b);
    }
}

#else
int gradsynth_bf16_supported(void) { return 0; }
void gradsynth_dots_bf16(const uint16_t *f, const uint16_t *r, int64_t n, double *out) {
    (void)f, (void)r, (void)n, (void)out;
}
void gradsynth_linear_bf16(uint16_t *out, const uint16_t *f, const uint16_t *r, int64_t n, float w, float g) {
    (void)out, (void)f, (void)r, (void)n, (void)w, (void)g;
}
#endif
