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

void gradsynth_rule_geometry_f32(float *out, const float *f, const float *r, int64_t n, float alpha, float gamma,
                                 int kind, double *acc) {
    if (kind == 0)
        rule_geometry(out, f, r, n, alpha, gamma, 0, acc);
    else if (kind == 1)
        rule_geometry(out, f, r, n, alpha, gamma, 1, acc);
    else
        rule_geometry(out, f, r, n, alpha, gamma, 2, acc);
}
