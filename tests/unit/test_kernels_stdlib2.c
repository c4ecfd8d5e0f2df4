/* test_kernels_stdlib2.c - the issue-2 stdlib kernels of the CPU library
 * (kernels/cpu/layer_ops.c): layernorm, silu, repeat_kv, bias_add.
 * Forwards against plain double loops written here; every backward against
 * central finite differences of its forward (tk_gradcheck, as
 * test_kernels_cpu_grad.c); each _bf16 variant bit for bit against "widen,
 * run the fp32 kernel, round once" (moek.h's definition); the shape and
 * workspace error paths. */
#include <math.h>
#include <stdlib.h>

#include "test_kernels_cpu.h"

#define H_STEP 1e-2f
#define ATOL 1e-3
#define RTOL 2e-2

static moek_ctx ctx_of(int *status, void *ws, int64_t wsb)
{
    moek_ctx c;
    memset(&c, 0, sizeof c);
    c.status = status;
    c.workspace = ws;
    c.workspace_bytes = wsb;
    return c;
}

static double maxrel(const float *a, const double *b, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / (1.0 + fabs(b[i]));
        m = d > m || isnan(d) ? d : m;
    }
    return m;
}

/* ---- forwards against double loops ---------------------------------------- */
static void fwd_layernorm(tk_rng *g)
{
    int st = 0;
    moek_ctx c = ctx_of(&st, NULL, 0);
    int64_t N = 6, D = 37;
    float *x = tk_rand(g, N * D, -2, 3), *w = tk_rand(g, D, 0.5f, 1.5f), *b = tk_rand(g, D, -1, 1);
    float *y = tk_junk(N * D), *mean = tk_junk(N), *rstd = tk_junk(N);
    for (int64_t i = 0; i < D; i++)
        x[i] += 100.0f;   /* a row far from zero: the two-pass variance keeps its digits */
    moek_layernorm_fwd(&c, x, w, b, y, mean, rstd, N, D, 1e-5f);
    double *ry = malloc((size_t)(N * D) * sizeof *ry), *rm = malloc((size_t)N * sizeof *rm),
           *rr = malloc((size_t)N * sizeof *rr);
    for (int64_t n = 0; n < N; n++) {
        double mu = 0, var = 0;
        for (int64_t d = 0; d < D; d++)
            mu += x[n * D + d];
        mu /= (double)D;
        for (int64_t d = 0; d < D; d++)
            var += (x[n * D + d] - mu) * (x[n * D + d] - mu);
        var /= (double)D;
        rm[n] = mu;
        rr[n] = 1.0 / sqrt(var + 1e-5);
        for (int64_t d = 0; d < D; d++)
            ry[n * D + d] = (x[n * D + d] - mu) * rr[n] * w[d] + b[d];
    }
    double ey = maxrel(y, ry, N * D), em = maxrel(mean, rm, N), er = maxrel(rstd, rr, N);
    CHECK("layernorm fwd vs double loops (y, mean, rstd; one row offset by 100)",
          ey < 2e-5 && em < 1e-6 && er < 1e-5 && st == 0, "y %.3g mean %.3g rstd %.3g status %d", ey,
          em, er, st);
    free(x); free(w); free(b); free(y); free(mean); free(rstd); free(ry); free(rm); free(rr);
}

static void fwd_silu_bias_repeat(tk_rng *g)
{
    int st = 0;
    moek_ctx c = ctx_of(&st, NULL, 0);
    int64_t n = 1000;
    float *x = tk_rand(g, n, -8, 8), *y = tk_junk(n);
    double *r = malloc((size_t)n * sizeof *r);
    moek_silu_fwd(&c, x, y, n);
    for (int64_t i = 0; i < n; i++)
        r[i] = x[i] / (1.0 + exp(-(double)x[i]));
    double e = maxrel(y, r, n);
    CHECK("silu fwd vs double x / (1 + e^-x)", e < 1e-6, "max rel err %.3g", e);
    free(x); free(y); free(r);

    int64_t N = 5, D = 9;
    float *a = tk_rand(g, N * D, -1, 1), *b = tk_rand(g, D, -1, 1), *o = tk_junk(N * D);
    double *ro = malloc((size_t)(N * D) * sizeof *ro);
    moek_bias_add_fwd(&c, a, b, o, N, D);
    for (int64_t i = 0; i < N * D; i++)
        ro[i] = (double)a[i] + b[i % D];
    e = maxrel(o, ro, N * D);
    CHECK("bias_add fwd vs double loops", e < 1e-7, "max rel err %.3g", e);
    free(a); free(b); free(o); free(ro);

    /* repeat_kv: N 3, 2 kv heads, 6 query heads (groups of 3), Dh 4 */
    int64_t M = 3, Hkv = 2, H = 6, Dh = 4;
    float *kv = tk_rand(g, M * Hkv * Dh, -1, 1), *q = tk_junk(M * H * Dh);
    moek_repeat_kv_fwd(&c, kv, q, M, Hkv, H, Dh);
    int bad = 0;
    for (int64_t t = 0; t < M; t++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < Dh; d++)
                bad += q[(t * H + h) * Dh + d] != kv[(t * Hkv + h / 3) * Dh + d];
    CHECK("repeat_kv fwd: query head h reads kv head h / (H / Hkv)", bad == 0 && st == 0,
          "%d elements wrong, status %d", bad, st);
    free(kv); free(q);
}

/* ---- gradients ------------------------------------------------------------------ */
typedef struct { moek_ctx c; float *x, *w, *b, *y, *mean, *rstd, *r; int64_t N, D; } st_ln;
static double loss_ln(void *p)
{
    st_ln *s = p;
    moek_layernorm_fwd(&s->c, s->x, s->w, s->b, s->y, s->mean, s->rstd, s->N, s->D, 1e-5f);
    return tk_dot(s->r, s->y, s->N * s->D);
}

static void grad_layernorm(tk_rng *g)
{
    int st = 0;
    st_ln s = {ctx_of(&st, NULL, 0), NULL, NULL, NULL, NULL, NULL, NULL, NULL, 5, 11};
    s.x = tk_rand(g, s.N * s.D, -1.5f, 1.5f);
    s.w = tk_rand(g, s.D, 0.5f, 1.5f);
    s.b = tk_rand(g, s.D, -0.5f, 0.5f);
    s.y = tk_zeros(s.N * s.D);
    s.mean = tk_zeros(s.N);
    s.rstd = tk_zeros(s.N);
    s.r = tk_rand(g, s.N * s.D, -1, 1);
    float *dx = tk_junk(s.N * s.D), *dw = tk_junk(s.D), *db = tk_junk(s.D);
    loss_ln(&s);
    moek_layernorm_bwd(&s.c, s.r, s.x, s.w, s.mean, s.rstd, dx, dw, db, s.N, s.D);
    tk_gradcheck("grad layernorm dx", loss_ln, &s, s.x, s.N * s.D, dx, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad layernorm dw", loss_ln, &s, s.w, s.D, dw, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad layernorm db", loss_ln, &s, s.b, s.D, db, H_STEP, ATOL, RTOL);
    /* dx alone (dw, db NULL) is the same dx */
    float *dx2 = tk_junk(s.N * s.D);
    moek_layernorm_bwd(&s.c, s.r, s.x, s.w, s.mean, s.rstd, dx2, NULL, NULL, s.N, s.D);
    CHECK("layernorm bwd with dw = db = NULL", memcmp(dx, dx2, (size_t)(s.N * s.D) * sizeof *dx) == 0,
          "dx differs");
    free(s.x); free(s.w); free(s.b); free(s.y); free(s.mean); free(s.rstd); free(s.r);
    free(dx); free(dw); free(db); free(dx2);
}

typedef struct { moek_ctx c; float *x, *y, *r; int64_t n; } st_silu;
static double loss_silu(void *p)
{
    st_silu *s = p;
    moek_silu_fwd(&s->c, s->x, s->y, s->n);
    return tk_dot(s->r, s->y, s->n);
}

typedef struct { moek_ctx c; float *x, *b, *y, *r; int64_t N, D; } st_bias;
static double loss_bias(void *p)
{
    st_bias *s = p;
    moek_bias_add_fwd(&s->c, s->x, s->b, s->y, s->N, s->D);
    return tk_dot(s->r, s->y, s->N * s->D);
}

typedef struct { moek_ctx c; float *x, *y, *r; int64_t N, Hkv, H, Dh; } st_kv;
static double loss_kv(void *p)
{
    st_kv *s = p;
    moek_repeat_kv_fwd(&s->c, s->x, s->y, s->N, s->Hkv, s->H, s->Dh);
    return tk_dot(s->r, s->y, s->N * s->H * s->Dh);
}

static void grad_others(tk_rng *g)
{
    int st = 0;
    st_silu a = {ctx_of(&st, NULL, 0), NULL, NULL, NULL, 40};
    a.x = tk_rand(g, a.n, -4, 4);
    a.y = tk_zeros(a.n);
    a.r = tk_rand(g, a.n, -1, 1);
    float *dx = tk_junk(a.n);
    loss_silu(&a);
    moek_silu_bwd(&a.c, a.r, a.x, dx, a.n);
    tk_gradcheck("grad silu dx", loss_silu, &a, a.x, a.n, dx, H_STEP, ATOL, RTOL);
    free(a.x); free(a.y); free(a.r); free(dx);

    st_bias b = {ctx_of(&st, NULL, 0), NULL, NULL, NULL, NULL, 7, 5};
    b.x = tk_rand(g, b.N * b.D, -1, 1);
    b.b = tk_rand(g, b.D, -1, 1);
    b.y = tk_zeros(b.N * b.D);
    b.r = tk_rand(g, b.N * b.D, -1, 1);
    float *bdx = tk_junk(b.N * b.D), *bdb = tk_junk(b.D);
    loss_bias(&b);
    moek_bias_add_bwd(&b.c, b.r, bdx, bdb, b.N, b.D);
    tk_gradcheck("grad bias_add dx", loss_bias, &b, b.x, b.N * b.D, bdx, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad bias_add db", loss_bias, &b, b.b, b.D, bdb, H_STEP, ATOL, RTOL);
    free(b.x); free(b.b); free(b.y); free(b.r); free(bdx); free(bdb);

    st_kv k = {ctx_of(&st, NULL, 0), NULL, NULL, NULL, 3, 2, 4, 3};
    k.x = tk_rand(g, k.N * k.Hkv * k.Dh, -1, 1);
    k.y = tk_zeros(k.N * k.H * k.Dh);
    k.r = tk_rand(g, k.N * k.H * k.Dh, -1, 1);
    float *kdx = tk_junk(k.N * k.Hkv * k.Dh);
    loss_kv(&k);
    moek_repeat_kv_bwd(&k.c, k.r, kdx, k.N, k.Hkv, k.H, k.Dh);
    tk_gradcheck("grad repeat_kv dx (sums each group)", loss_kv, &k, k.x, k.N * k.Hkv * k.Dh, kdx,
                 H_STEP, ATOL, RTOL);
    free(k.x); free(k.y); free(k.r); free(kdx);
    CHECK("stdlib2 gradients: no error status", st == 0, "status %d", st);
}

/* ---- bf16 variants: widen, fp32 kernel, round once --------------------------- */
/* n random bf16 values and their exact fp32 widening */
static moek_bf16 *rand16(tk_rng *g, int64_t n, float lo, float hi, float **wide)
{
    moek_bf16 *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    *wide = malloc((size_t)(n > 0 ? n : 1) * sizeof **wide);
    for (int64_t i = 0; i < n; i++) {
        h[i] = moek_bf16_from_f32(tk_unif(g, lo, hi));
        (*wide)[i] = moek_bf16_to_f32(h[i]);
    }
    return h;
}

static int same16(const moek_bf16 *a, const float *f, int64_t n)
{
    int bad = 0;
    for (int64_t i = 0; i < n; i++)
        bad += a[i] != moek_bf16_from_f32(f[i]);
    return bad;
}

static moek_bf16 *junk16(int64_t n)
{
    moek_bf16 *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    for (int64_t i = 0; i < n; i++)
        h[i] = 0x4499;
    return h;
}

static void bf16_variants(tk_rng *g)
{
    int st = 0;
    int64_t wsb = MOEK_BF16_WORKSPACE_BYTES(4096);
    void *ws = malloc((size_t)wsb);
    moek_ctx c = ctx_of(&st, ws, wsb);
    int64_t N = 6, D = 24;
    float *xf, *wf, *bf, *dyf;
    moek_bf16 *x = rand16(g, N * D, -2, 2, &xf), *w = rand16(g, D, 0.5f, 1.5f, &wf),
              *b = rand16(g, D, -1, 1, &bf), *dy = rand16(g, N * D, -1, 1, &dyf);
    moek_bf16 *y = junk16(N * D), *dx = junk16(N * D), *dw = junk16(D), *db = junk16(D);
    float *yf = tk_zeros(N * D), *m = tk_zeros(N), *r = tk_zeros(N), *m16 = tk_zeros(N),
          *r16 = tk_zeros(N), *dxf = tk_zeros(N * D), *dwf = tk_zeros(D), *dbf = tk_zeros(D);
    moek_layernorm_fwd(&c, xf, wf, bf, yf, m, r, N, D, 1e-5f);
    moek_layernorm_fwd_bf16(&c, x, w, b, y, m16, r16, N, D, 1e-5f);
    int bad = same16(y, yf, N * D) + (memcmp(m, m16, (size_t)N * 4) != 0) + (memcmp(r, r16, (size_t)N * 4) != 0);
    CHECK("layernorm fwd bf16 == round(fp32 kernel on widened inputs), mean/rstd fp32 equal", bad == 0,
          "%d mismatches", bad);
    moek_layernorm_bwd(&c, dyf, xf, wf, m, r, dxf, dwf, dbf, N, D);
    moek_layernorm_bwd_bf16(&c, dy, x, w, m, r, dx, dw, db, N, D);
    bad = same16(dx, dxf, N * D) + same16(dw, dwf, D) + same16(db, dbf, D);
    CHECK("layernorm bwd bf16 == round(fp32 kernel)", bad == 0, "%d mismatches", bad);

    moek_silu_fwd(&c, xf, yf, N * D);
    moek_silu_fwd_bf16(&c, x, y, N * D);
    bad = same16(y, yf, N * D);
    moek_silu_bwd(&c, dyf, xf, dxf, N * D);
    moek_silu_bwd_bf16(&c, dy, x, dx, N * D);
    bad += same16(dx, dxf, N * D);
    CHECK("silu fwd/bwd bf16 == round(fp32 kernel)", bad == 0, "%d mismatches", bad);

    moek_bias_add_fwd(&c, xf, bf, yf, N, D);
    moek_bias_add_fwd_bf16(&c, x, b, y, N, D);
    bad = same16(y, yf, N * D);
    moek_bias_add_bwd(&c, dyf, dxf, dbf, N, D);
    moek_bias_add_bwd_bf16(&c, dy, dx, db, N, D);
    bad += same16(dx, dxf, N * D) + same16(db, dbf, D);
    CHECK("bias_add fwd/bwd bf16 == round(fp32 kernel)", bad == 0, "%d mismatches", bad);

    /* repeat_kv: [N, 2*6] -> [N, 4*6]; D = 24 = H * Dh */
    moek_repeat_kv_fwd(&c, xf, yf, N, 2, 4, 6);
    moek_repeat_kv_fwd_bf16(&c, x, y, N, 2, 4, 6);
    bad = same16(y, yf, N * D);
    moek_repeat_kv_bwd(&c, dyf, dxf, N, 2, 4, 6);
    moek_repeat_kv_bwd_bf16(&c, dy, dx, N, 2, 4, 6);
    bad += same16(dx, dxf, N * 12);
    CHECK("repeat_kv fwd/bwd bf16 == round(fp32 kernel)", bad == 0 && st == 0, "%d mismatches, status %d",
          bad, st);

    /* workspace too small: MOEK_E_SHAPE and the output untouched */
    moek_bf16 *y2 = junk16(N * D);
    moek_ctx small = ctx_of(&st, ws, 64);
    moek_layernorm_fwd_bf16(&small, x, w, b, y2, m16, r16, N, D, 1e-5f);
    int untouched = 1;
    for (int64_t i = 0; i < N * D; i++)
        untouched &= y2[i] == 0x4499;
    CHECK("layernorm fwd bf16 with a too small workspace: MOEK_E_SHAPE, output untouched",
          st == MOEK_E_SHAPE && untouched, "status %d, untouched %d", st, untouched);
    free(ws); free(xf); free(wf); free(bf); free(dyf); free(x); free(w); free(b); free(dy);
    free(y); free(dx); free(dw); free(db); free(yf); free(m); free(r); free(m16); free(r16);
    free(dxf); free(dwf); free(dbf); free(y2);
}

static void shape_errors(void)
{
    int st = 0;
    moek_ctx c = ctx_of(&st, NULL, 0);
    float x[12] = {0}, y[24];
    for (int i = 0; i < 24; i++)
        y[i] = 7.0f;
    moek_repeat_kv_fwd(&c, x, y, 1, 4, 6, 3);   /* 6 query heads, 4 kv heads */
    CHECK("repeat_kv: H % Hkv != 0 is MOEK_E_SHAPE and writes nothing", st == MOEK_E_SHAPE && y[0] == 7.0f,
          "status %d", st);
    st = 0;
    moek_repeat_kv_bwd(&c, y, x, 1, 0, 6, 3);
    CHECK("repeat_kv bwd: Hkv 0 is MOEK_E_SHAPE", st == MOEK_E_SHAPE, "status %d", st);
    st = 0;
    moek_layernorm_fwd(&c, x, x, x, y, x, x, 2, -1, 1e-5f);
    int a = st;
    st = 0;
    moek_layernorm_bwd(&c, x, x, x, x, x, y, y, y, -3, 4);
    int b = st;
    st = 0;
    moek_bias_add_bwd(&c, x, y, y, 2, -4);
    CHECK("layernorm fwd/bwd and bias_add bwd: a negative size is MOEK_E_SHAPE, nothing written",
          a == MOEK_E_SHAPE && b == MOEK_E_SHAPE && st == MOEK_E_SHAPE && y[0] == 7.0f,
          "status %d %d %d", a, b, st);
}

int main(void)
{
    tk_rng g = {0x5eed2222ull};
    fwd_layernorm(&g);
    fwd_silu_bias_repeat(&g);
    grad_layernorm(&g);
    grad_others(&g);
    bf16_variants(&g);
    shape_errors();
    CHECK_DONE();
}
