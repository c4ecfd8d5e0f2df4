/* test_kernels_cpu.h - helpers shared by the CPU kernel tests: a seeded
 * generator, buffers, a double-precision loss over outputs, and a central
 * finite-difference gradient check. */
#ifndef TEST_KERNELS_CPU_H
#define TEST_KERNELS_CPU_H

#include <stdint.h>
#include <string.h>

#include "../../kernels/moek.h"
#include "check.h"

typedef struct { uint64_t s; } tk_rng;

static inline uint64_t tk_next(tk_rng *r)
{
    /* xorshift64*: fixed seeds make every run identical */
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}

/* uniform in [lo, hi) */
static inline float tk_unif(tk_rng *r, float lo, float hi)
{
    return lo + (hi - lo) * (float)((tk_next(r) >> 40) / (double)(1ull << 24));
}

static inline float *tk_rand(tk_rng *r, int64_t n, float lo, float hi)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
    for (int64_t i = 0; i < n; i++)
        x[i] = tk_unif(r, lo, hi);
    return x;
}

static inline float *tk_zeros(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

static inline float *tk_fill(int64_t n, float v)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof *x);
    for (int64_t i = 0; i < n; i++)
        x[i] = v;
    return x;
}

/* a buffer full of a value no kernel produces, to prove outputs are overwritten */
static inline float *tk_junk(int64_t n) { return tk_fill(n, 1234.5f); }

/* bit-for-bit equality */
static inline int tk_same(const void *a, const void *b, int64_t bytes)
{
    return memcmp(a, b, (size_t)bytes) == 0;
}

/* sum_i r_i out_i in double: the scalar a gradient check differentiates */
static inline double tk_dot(const float *r, const float *out, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)r[i] * out[i];
    return s;
}

static inline double tk_maxdiff(const float *a, const double *b, int64_t n)
{
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        m = d > m || isnan(d) ? d : m;
    }
    return m;
}

/* Runs the forward and returns the projected loss; NAN means "this
 * perturbation changed a discrete choice (top-k), skip the point". */
typedef double (*tk_loss_fn)(void *state);

#define TK_GC_POINTS 48

/* Central differences on up to TK_GC_POINTS elements of x (all of them for
 * small tensors, a seeded random subset otherwise) against grad.  Tolerance
 * |analytic - fd| <= atol + rtol |fd|, and the fd gradient must not be
 * all zero on the points checked, so a vanished gradient cannot pass. */
static inline void tk_gradcheck(const char *name, tk_loss_fn f, void *st, float *x, int64_t n,
                                const float *grad, float h, double atol, double rtol)
{
    tk_rng r = {0x9E3779B97F4A7C15ull ^ (uint64_t)n};
    int64_t pts = n < TK_GC_POINTS ? n : TK_GC_POINTS;
    double worst = 0.0, scale = 0.0;
    int64_t worst_i = -1, bad = 0, skipped = 0;
    double worst_a = 0, worst_fd = 0;
    for (int64_t p = 0; p < pts; p++) {
        int64_t i = n <= TK_GC_POINTS ? p : (int64_t)(tk_next(&r) % (uint64_t)n);
        float x0 = x[i];
        x[i] = x0 + h;
        double lp = f(st);
        x[i] = x0 - h;
        double lm = f(st);
        x[i] = x0;
        if (isnan(lp) || isnan(lm)) {
            skipped++;
            continue;
        }
        double fd = (lp - lm) / (2.0 * (double)h);
        double err = fabs((double)grad[i] - fd);
        scale = fabs(fd) > scale ? fabs(fd) : scale;
        if (!check_close(grad[i], fd, atol, rtol)) {
            bad++;
            if (err > worst || worst_i < 0) {
                worst = err;
                worst_i = i;
                worst_a = grad[i];
                worst_fd = fd;
            }
        }
    }
    f(st); /* leave the outputs as the unperturbed forward made them */
    CHECK(name, bad == 0 && scale > 1e-3 && skipped * 4 < pts,
          "%lld of %lld points off (worst at %lld: analytic %.6g, finite difference %.6g), "
          "max |fd| %.3g, %lld skipped", (long long)bad, (long long)pts, (long long)worst_i,
          worst_a, worst_fd, scale, (long long)skipped);
}

#endif
