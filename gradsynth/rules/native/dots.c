/* (<f, r>, ||r||^2) of two float32 vectors in one read, accumulated in float64.
 *
 * A float32 product is exact in float64 (24 + 24 significand bits < 53), so the only rounding
 * is the float64 summation, over LANES independent accumulators (which the compiler keeps in
 * vector registers) and then across them.
 *
 * Why C and not the torch.compile kernel: the loop is bound by how many cache misses one core
 * keeps in flight, not by arithmetic. The compiled reduction relies on the hardware prefetcher
 * alone and ran at 0.9-1.2x torch.add on AVX2 hosts; prefetching AHEAD elements in software
 * brings it to ~0.75x, the speed of a BLAS dot over the same bytes.
 */
#include <stdint.h>

#define LANES 16
#define AHEAD 1024 /* elements: 4 KiB ahead in each stream */

void gradsynth_dots_f32(const float *f, const float *r, int64_t n, double *out) {
    double fr[LANES] = {0}, rr[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __builtin_prefetch(f + i + AHEAD);
        __builtin_prefetch(r + i + AHEAD);
        for (int j = 0; j < LANES; ++j) {
            double a = f[i + j], b = r[i + j];
            fr[j] += a * b;
            rr[j] += b * b;
        }
    }
    double s = 0, t = 0;
    for (; i < n; ++i) {
        double a = f[i], b = r[i];
        s += a * b;
        t += b * b;
    }
    for (int j = 0; j < LANES; ++j) {
        s += fr[j];
        t += rr[j];
    }
    out[0] = s;
    out[1] = t;
}

/* The geometry sums of one chunk, added into acc[0..6]: ||f||^2, ||r||^2, <f, r>, ||g||^2, <g, f>,
 * <g, r> and the count of coordinates where f_i r_i < 0 (signs conflict). Products of float32
 * values are exact in float64 (so f_i r_i < 0 is the sign test, with no underflow to -0), summed
 * in float64 over LANES accumulators. For gradsynth.rules.geometry_sums: the chunk is in cache,
 * just written by a rule's kernel, so this costs arithmetic, not memory traffic. */
void gradsynth_geometry_f32(const float *f, const float *r, const float *g, int64_t n, double *acc) {
    double ff[LANES] = {0}, rr[LANES] = {0}, fr[LANES] = {0}, gg[LANES] = {0}, gf[LANES] = {0};
    double gr[LANES] = {0}, cc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int j = 0; j < LANES; ++j) {
            double a = f[i + j], b = r[i + j], c = g[i + j], p = a * b;
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
        double a = f[i], b = r[i], c = g[i], p = a * b;
        s[0] += a * a, s[1] += b * b, s[2] += p, s[3] += c * c, s[4] += c * a, s[5] += c * b;
        s[6] += p < 0 ? 1.0 : 0.0;
    }
    for (int j = 0; j < LANES; ++j) {
        s[0] += ff[j], s[1] += rr[j], s[2] += fr[j], s[3] += gg[j], s[4] += gf[j], s[5] += gr[j];
        s[6] += cc[j];
    }
    for (int k = 0; k < 7; ++k) acc[k] += s[k];
}

/* SAGO (kind 0), sago_prefer_retain (kind 1) or the linear apply (kind 2: sum, PCGrad) on
 * float32, written into out (which may be f or r: each element is read before it is written),
 * with the geometry sums of f, r and the written g added into acc[0..6] in the same loop. The
 * elementwise operations are the compiled kernels' (gradsynth/rules/kernels/bodies.py), in their
 * order, in float32, with no contraction (the library is built with -ffp-contract=off):
 * c = (f S)(r S) < 0, S = 2^117; a = r alpha, b = gamma f;
 *   sago: c ? a + (b - b) : b + (a - a)    prefer: a + (c ? b - b : b)    linear: a + b
 *
 * Written to be vectorised (AVX2: 8 floats, 4 doubles a register): the rule is a compile-time
 * constant of each copy of the loop (a test of a runtime kind inside it is control flow, and the
 * loop then ran scalar, ~9 ns an element on AVX2 where torch.add takes ~1), and each block of
 * LANES elements is read into local arrays, computed there and only then stored, because out
 * may be f or r: a loop storing into out while loading f and r needs a run-time overlap check,
 * which in-place calls fail, falling back to the scalar loop. */
#define RULE(kind, a, b, c, da, db) ((kind) == 2 ? (a) + (b) : (kind) == 1 ? (a) + pick(c, db, b) \
                                                  : pick(c, a, b) + pick(c, db, da))
/* c ? x : y by a bit mask (c is 0 or 1): a selection the vectoriser turns into vector bit
 * operations, where a conditional became branches (one mispredicted per random sign). */
static inline float pick(int c, float x, float y) {
    uint32_t m = -(uint32_t)c, a, b;
    __builtin_memcpy(&a, &x, 4);
    __builtin_memcpy(&b, &y, 4);
    a = (a & m) | (b & ~m);
    __builtin_memcpy(&x, &a, 4);
    return x;
}
static inline __attribute__((always_inline)) void rule_geometry(float *out, const float *f, const float *r,
                                                                 int64_t n, float alpha, float gamma,
                                                                 const int kind, double *acc) {
    const float S = 0x1p117f;
    double ff[LANES] = {0}, rr[LANES] = {0}, fr[LANES] = {0}, gg[LANES] = {0}, gf[LANES] = {0};
    double gr[LANES] = {0}, cc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __builtin_prefetch(f + i + AHEAD);
        __builtin_prefetch(r + i + AHEAD);
        float x[LANES], y[LANES], v[LANES];
        for (int j = 0; j < LANES; ++j) x[j] = f[i + j], y[j] = r[i + j];
        for (int j = 0; j < LANES; ++j) {
            float a = y[j] * alpha, b = gamma * x[j], da = a - a, db = b - b;
            int c = (x[j] * S) * (y[j] * S) < 0;
            v[j] = RULE(kind, a, b, c, da, db);
        }
        for (int j = 0; j < LANES; ++j) {
            double dx = x[j], dy = y[j], u = v[j], p = dx * dy;
            ff[j] = __builtin_fma(dx, dx, ff[j]);
            rr[j] = __builtin_fma(dy, dy, rr[j]);
            fr[j] += p;
            gg[j] = __builtin_fma(u, u, gg[j]);
            gf[j] = __builtin_fma(u, dx, gf[j]);
            gr[j] = __builtin_fma(u, dy, gr[j]);
            cc[j] += p < 0 ? 1.0 : 0.0;
        }
        for (int j = 0; j < LANES; ++j) out[i + j] = v[j];
    }
    double s[7] = {0};
    for (; i < n; ++i) {
        float x = f[i], y = r[i];
        float a = y * alpha, b = gamma * x, da = a - a, db = b - b;
        int c = (x * S) * (y * S) < 0;
        float v = RULE(kind, a, b, c, da, db);
        out[i] = v;
        double p = (double)x * (double)y, u = v;
        s[0] += (double)x * x, s[1] += (double)y * y, s[2] += p, s[3] += u * u, s[4] += u * x, s[5] += u * y;
        s[6] += (double)(p < 0);
    }
    for (int j = 0; j < LANES; ++j) {
        s[0] += ff[j], s[1] += rr[j], s[2] += fr[j], s[3] += gg[j], s[4] += gf[j], s[5] += gr[j];
        s[6] += cc[j];
    }
    for (int k = 0; k < 7; ++k) acc[k] += s[k];
}

/* The same loop on 8 floats at a time in GCC/clang vector types, where the compiler has them:
 * the vectoriser of the loop above keeps its 16 x 7 accumulators and blocks on the stack (~3x
 * torch.add on AVX2); here 7 sums x 2 half-vectors of 4 doubles stay in registers. The float32
 * operations are the same, elementwise, so g is the same; the sums differ by float64 rounding
 * (another grouping of the terms). fma(x, y, s) of an exact float64 product x*y equals s + x*y. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define GS_VECTORS 1
#endif
#endif
#ifdef GS_VECTORS
typedef float gs_v8f __attribute__((vector_size(32)));
typedef int32_t gs_v8i __attribute__((vector_size(32)));
typedef double gs_v4d __attribute__((vector_size(32)));
typedef int64_t gs_v4l __attribute__((vector_size(32)));
#ifdef __FMA__
#include <immintrin.h>
#define GS_FMA(a, b, c) ((gs_v4d)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(c)))
#else
#define GS_FMA(a, b, c) ((c) + (a) * (b))
#endif
#define GS_PICK(c, x, y) ((gs_v8f)((((gs_v8i)(x)) & (c)) | (((gs_v8i)(y)) & ~(c))))

static inline __attribute__((always_inline)) int64_t rule_geometry_vec(float *out, const float *f, const float *r,
                                                                      int64_t n, float alpha, float gamma,
                                                                      const int kind, double *acc) {
    const gs_v8f S = {0x1p117f, 0x1p117f, 0x1p117f, 0x1p117f, 0x1p117f, 0x1p117f, 0x1p117f, 0x1p117f};
    gs_v4d sum[6][2] = {{{0}}};
    gs_v4l count[2] = {{0}};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __builtin_prefetch(f + i + AHEAD);
        __builtin_prefetch(r + i + AHEAD);
        gs_v8f x, y, v;
        __builtin_memcpy(&x, f + i, sizeof x);
        __builtin_memcpy(&y, r + i, sizeof y);
        gs_v8f a = y * alpha, b = gamma * x, da = a - a, db = b - b;
        gs_v8i c = (x * S) * (y * S) < 0;
        if (kind == 2)
            v = a + b;
        else if (kind == 1)
            v = a + GS_PICK(c, db, b);
        else
            v = GS_PICK(c, a, b) + GS_PICK(c, db, da);
        __builtin_memcpy(out + i, &v, sizeof v);
#define GS_HALF(h, k0, k1, k2, k3)                                                                      \
    do {                                                                                              \
        gs_v4d dx = __builtin_convertvector(__builtin_shufflevector(x, x, k0, k1, k2, k3), gs_v4d);   \
        gs_v4d dy = __builtin_convertvector(__builtin_shufflevector(y, y, k0, k1, k2, k3), gs_v4d);   \
        gs_v4d u = __builtin_convertvector(__builtin_shufflevector(v, v, k0, k1, k2, k3), gs_v4d);    \
        gs_v4d p = dx * dy;                                                                           \
        sum[0][h] = GS_FMA(dx, dx, sum[0][h]);                                                        \
        sum[1][h] = GS_FMA(dy, dy, sum[1][h]);                                                        \
        sum[2][h] += p;                                                                               \
        sum[3][h] = GS_FMA(u, u, sum[3][h]);                                                          \
        sum[4][h] = GS_FMA(u, dx, sum[4][h]);                                                         \
        sum[5][h] = GS_FMA(u, dy, sum[5][h]);                                                         \
        count[h] -= p < 0; /* -1 where true */                                                        \
    } while (0)
        GS_HALF(0, 0, 1, 2, 3);
        GS_HALF(1, 4, 5, 6, 7);
#undef GS_HALF
    }
    double s[7] = {0};
    for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 4; ++j) {
            for (int k = 0; k < 6; ++k) s[k] += sum[k][h][j];
            s[6] += (double)count[h][j];
        }
    for (int k = 0; k < 7; ++k) acc[k] += s[k];
    return i;
}
#endif

void gradsynth_rule_geometry_f32(float *out, const float *f, const float *r, int64_t n, float alpha, float gamma,
                                 int kind, double *acc) {
    int64_t done = 0;
#ifdef GS_VECTORS
    if (kind == 0)
        done = rule_geometry_vec(out, f, r, n, alpha, gamma, 0, acc);
    else if (kind == 1)
        done = rule_geometry_vec(out, f, r, n, alpha, gamma, 1, acc);
    else
        done = rule_geometry_vec(out, f, r, n, alpha, gamma, 2, acc);
#endif
    out += done, f += done, r += done, n -= done;
    if (kind == 0)
        rule_geometry(out, f, r, n, alpha, gamma, 0, acc);
    else if (kind == 1)
        rule_geometry(out, f, r, n, alpha, gamma, 1, acc);
    else
        rule_geometry(out, f, r, n, alpha, gamma, 2, acc);
}
