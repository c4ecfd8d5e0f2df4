/* half_kernel_checks.h - the checks of the CPU half-storage variants, written
 * once and included by test_kernels_cpu_bf16.c (bfloat16) and
 * test_kernels_cpu_f16.c (IEEE half), as kernels/cpu/half_variants.inc is by
 * the kernels.  Not a header: each includer defines, before the one #include,
 *   TH_T            the storage type (moek_bf16, moek_f16)
 *   TH_FN(name)     an exported name with its suffix (name##_bf16, name##_f16)
 *   TH_CAST_TO_F32  the widening cast (moek_cast_bf16_f32, moek_cast_f16_f32)
 *   TH_NAME         the suffix as a string in check names ("bf16", "f16")
 *   TH_WS_PREFIX    what the workspace checks' names start with ("", "f16 ")
 * and gets the tb_* helpers (an environment, bit casts, an input/output
 * harness comparing each variant bit for bit with round(fp32 kernel on the
 * widened inputs) and within TB_TOL of fp32 on the unrounded inputs) and the
 * test_* functions every half type runs: elementwise, embedding, dense,
 * attention, losses and router, dispatch/experts/combine, optimizers, the
 * workspace.  The rounding tests (bit patterns of the type) stay in each
 * includer. */
#if !defined(TH_T) || !defined(TH_FN) || !defined(TH_CAST_TO_F32) || !defined(TH_NAME) || \
    !defined(TH_WS_PREFIX)
#error "half_kernel_checks.h: define TH_T, TH_FN, TH_CAST_TO_F32, TH_NAME and TH_WS_PREFIX first"
#endif

#include <stdint.h>

#include "test_kernels_cpu.h"

#define TB_TOL 1e-2
#define TB_WS_BYTES (4 << 20)

typedef struct {
    int st;
    moek_ctx c;
} tb_env;

static void tb_env_init(tb_env *e, void *ws, int64_t bytes)
{
    memset(e, 0, sizeof *e);
    e->c.status = &e->st;
    e->c.workspace = ws;
    e->c.workspace_bytes = bytes;
}

static uint32_t tb_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float tb_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}


/* ---- every variant --------------------------------------------------------- */
/* an input: the original fp32 values, their half rounding and its widening */
typedef struct {
    int64_t n;
    float *orig, *wide;
    TH_T *h;
} tb_in;

static tb_in tb_input(tk_rng *g, int64_t n, float lo, float hi)
{
    tb_in a;
    a.n = n;
    a.orig = tk_rand(g, n, lo, hi);
    a.wide = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    a.h = malloc((size_t)(n > 0 ? n : 1) * sizeof(TH_T));
    TH_FN(moek_cast_f32)(NULL, a.orig, a.h, n);
    TH_CAST_TO_F32(NULL, a.h, a.wide, n);
    return a;
}

/* from fp32 values (a forward's outputs): half-side = the given half result */
static void tb_in_free(tb_in *a) { free(a->orig); free(a->wide); free(a->h); }

/* a half output: the variant's result and the fp32 kernel's on the widened
 * (fw) and on the original (fo) inputs */
typedef struct {
    int64_t n;
    TH_T *h;
    float *fw, *fo;
} tb_out;

static tb_out tb_output(int64_t n)
{
    tb_out o;
    o.n = n;
    o.h = malloc((size_t)(n > 0 ? n : 1) * sizeof(TH_T));
    for (int64_t i = 0; i < n; i++)
        o.h[i] = 0x4499; /* 1224: a value no kernel here produces */
    o.fw = tk_junk(n);
    o.fo = tk_junk(n);
    return o;
}

/* max |a - ref| / max |ref|; ref must not be all zero */
static double tb_relerr(const float *a, const float *ref, int64_t n)
{
    double d = 0.0, m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]);
        d = e > d || isnan(e) ? e : d;
        m = fabs(ref[i]) > m ? fabs(ref[i]) : m;
    }
    return m > 0 ? d / m : INFINITY;
}

static void tb_check(const char *name, tb_out *o)
{
    char label[200];
    TH_T *r = malloc((size_t)(o->n > 0 ? o->n : 1) * sizeof *r);
    float *w = malloc((size_t)(o->n > 0 ? o->n : 1) * sizeof *w);
    TH_FN(moek_cast_f32)(NULL, o->fw, r, o->n);
    TH_CAST_TO_F32(NULL, o->h, w, o->n);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < o->n; i++)
        if (r[i] != o->h[i])
            bad++, first = first < 0 ? i : first;
    snprintf(label, sizeof label, "%s: " TH_NAME " == round(fp32 kernel on widened inputs)", name);
    CHECK(label, bad == 0 && o->n > 0, "%lld of %lld differ, first [%lld] 0x%04X vs 0x%04X",
          (long long)bad, (long long)o->n, (long long)first,
          first >= 0 ? (unsigned)o->h[first] : 0u, first >= 0 ? (unsigned)r[first] : 0u);
    double rel = tb_relerr(w, o->fo, o->n);
    snprintf(label, sizeof label, "%s: within %g of fp32 on the unrounded inputs", name, TB_TOL);
    CHECK(label, rel <= TB_TOL, "relative error %g", rel);
    free(r); free(w);
    free(o->h); free(o->fw); free(o->fo);
}

/* an fp32 output of a half variant (rstd, lse, loss, probs, dgates): fb from
 * the variant must equal fw bit for bit */
typedef struct {
    int64_t n;
    float *fb, *fw, *fo;
} tb_f32;

static tb_f32 tb_f32_out(int64_t n)
{
    tb_f32 o = {n, tk_junk(n), tk_junk(n), tk_junk(n)};
    return o;
}

static void tb_check_f32(const char *name, tb_f32 *o)
{
    char label[200];
    snprintf(label, sizeof label, "%s: fp32 output == fp32 kernel on widened inputs", name);
    CHECK(label, memcmp(o->fb, o->fw, (size_t)o->n * sizeof(float)) == 0,
          "first values %.9g vs %.9g", o->fb[0], o->fw[0]);
    double rel = tb_relerr(o->fb, o->fo, o->n);
    snprintf(label, sizeof label, "%s: fp32 output within %g of fp32 on unrounded inputs", name, TB_TOL);
    CHECK(label, rel <= TB_TOL, "relative error %g", rel);
    free(o->fb); free(o->fw); free(o->fo);
}

static void tb_status(const char *name, const tb_env *e)
{
    char label[200];
    snprintf(label, sizeof label, "%s: status stays 0", name);
    CHECK(label, e->st == 0, "status %d", e->st);
}

static void test_elementwise(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t n = 5000; /* several GELU/SwiGLU chunks and a partial one, threaded */
    tb_in a = tb_input(g, n, -3, 3), b = tb_input(g, n, -3, 3), d = tb_input(g, n, -1, 1);

    tb_out y = tb_output(n);
    TH_FN(moek_add_fwd)(c, a.h, b.h, y.h, n);
    moek_add_fwd(c, a.wide, b.wide, y.fw, n);
    moek_add_fwd(c, a.orig, b.orig, y.fo, n);
    tb_check("add_fwd_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_scale_fwd)(c, a.h, y.h, n, 0.3f);
    moek_scale_fwd(c, a.wide, y.fw, n, 0.3f);
    moek_scale_fwd(c, a.orig, y.fo, n, 0.3f);
    tb_check("scale_fwd_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_scale_bwd)(c, d.h, y.h, n, -1.7f);
    moek_scale_bwd(c, d.wide, y.fw, n, -1.7f);
    moek_scale_bwd(c, d.orig, y.fo, n, -1.7f);
    tb_check("scale_bwd_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_gelu_fwd)(c, a.h, y.h, n);
    moek_gelu_fwd(c, a.wide, y.fw, n);
    moek_gelu_fwd(c, a.orig, y.fo, n);
    tb_check("gelu_fwd_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_gelu_bwd)(c, d.h, a.h, y.h, n);
    moek_gelu_bwd(c, d.wide, a.wide, y.fw, n);
    moek_gelu_bwd(c, d.orig, a.orig, y.fo, n);
    tb_check("gelu_bwd_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_swiglu_fwd)(c, a.h, b.h, y.h, n);
    moek_swiglu_fwd(c, a.wide, b.wide, y.fw, n);
    moek_swiglu_fwd(c, a.orig, b.orig, y.fo, n);
    tb_check("swiglu_fwd_" TH_NAME, &y);

    y = tb_output(n);
    tb_out y2 = tb_output(n);
    TH_FN(moek_swiglu_bwd)(c, d.h, a.h, b.h, y.h, y2.h, n);
    moek_swiglu_bwd(c, d.wide, a.wide, b.wide, y.fw, y2.fw, n);
    moek_swiglu_bwd(c, d.orig, a.orig, b.orig, y.fo, y2.fo, n);
    tb_check("swiglu_bwd_" TH_NAME " dgate", &y);
    tb_check("swiglu_bwd_" TH_NAME " dup", &y2);

    /* fill: half(value), here a value that must round (1/3) */
    y = tb_output(n);
    TH_FN(moek_fill)(c, y.h, n, 1.0f / 3.0f);
    moek_fill(c, y.fw, n, 1.0f / 3.0f);
    moek_fill(c, y.fo, n, 1.0f / 3.0f);
    tb_check("fill_" TH_NAME, &y);

    y = tb_output(n);
    TH_FN(moek_copy)(c, a.h, y.h, n);
    moek_copy(c, a.wide, y.fw, n);
    moek_copy(c, a.orig, y.fo, n);
    tb_check("copy_" TH_NAME, &y);

    /* accumulate: fp32 dst += widened src */
    tb_f32 acc = tb_f32_out(n);
    for (int64_t i = 0; i < n; i++)
        acc.fb[i] = acc.fw[i] = acc.fo[i] = b.orig[i];
    TH_FN(moek_accumulate)(c, acc.fb, a.h, n);
    moek_accumulate(c, acc.fw, a.wide, n);
    moek_accumulate(c, acc.fo, a.orig, n);
    tb_check_f32("accumulate_" TH_NAME, &acc);

    /* in place (y aliases x), as the memory planner may arrange */
    TH_T *inplace = malloc((size_t)n * sizeof *inplace);
    memcpy(inplace, a.h, (size_t)n * sizeof *inplace);
    y = tb_output(n);
    TH_FN(moek_gelu_fwd)(c, inplace, inplace, n);
    TH_FN(moek_gelu_fwd)(c, a.h, y.h, n);
    CHECK("gelu_fwd_" TH_NAME " in place == out of place", memcmp(inplace, y.h, (size_t)n * 2) == 0,
          "differ");
    free(inplace); free(y.h); free(y.fw); free(y.fo);
    tb_status("elementwise " TH_NAME, e);
    tb_in_free(&a); tb_in_free(&b); tb_in_free(&d);
}

static void test_embedding(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t N = 11, V = 7, D = 9;
    int32_t ids[11] = {0, 3, 6, 3, 1, 1, 5, 0, 2, 3, 6};
    tb_in tab = tb_input(g, V * D, -1, 1), dout = tb_input(g, N * D, -1, 1);
    tb_out y = tb_output(N * D);
    TH_FN(moek_embedding_fwd)(c, ids, tab.h, y.h, N, V, D);
    moek_embedding_fwd(c, ids, tab.wide, y.fw, N, V, D);
    moek_embedding_fwd(c, ids, tab.orig, y.fo, N, V, D);
    tb_check("embedding_fwd_" TH_NAME, &y);
    y = tb_output(V * D);
    TH_FN(moek_embedding_bwd)(c, dout.h, ids, y.h, N, V, D);
    moek_embedding_bwd(c, dout.wide, ids, y.fw, N, V, D);
    moek_embedding_bwd(c, dout.orig, ids, y.fo, N, V, D);
    tb_check("embedding_bwd_" TH_NAME, &y);
    tb_status("embedding " TH_NAME, e);

    /* a bad id: MOEK_E_INDEX and a zero row, as the fp32 kernel */
    int32_t bad[2] = {2, 7};
    TH_T out[18];
    for (int i = 0; i < 18; i++)
        out[i] = 0x4499;
    TH_FN(moek_embedding_fwd)(c, bad, tab.h, out, 2, V, D);
    int ok = memcmp(out, tab.h + 2 * D, (size_t)D * 2) == 0;
    for (int i = 9; i < 18; i++)
        ok &= out[i] == 0;
    CHECK("embedding_fwd_" TH_NAME " id out of range: MOEK_E_INDEX, zero row", e->st == MOEK_E_INDEX && ok,
          "status %d, rows ok %d", e->st, ok);
    e->st = 0;
    tb_in_free(&tab); tb_in_free(&dout);
}

static void test_dense(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    /* matmul */
    int64_t N = 9, K = 13, M = 7;
    tb_in x = tb_input(g, N * K, -1, 1), w = tb_input(g, M * K, -1, 1), dy = tb_input(g, N * M, -1, 1);
    tb_out y = tb_output(N * M);
    TH_FN(moek_matmul_fwd)(c, x.h, w.h, y.h, N, K, M);
    moek_matmul_fwd(c, x.wide, w.wide, y.fw, N, K, M);
    moek_matmul_fwd(c, x.orig, w.orig, y.fo, N, K, M);
    tb_check("matmul_fwd_" TH_NAME, &y);
    tb_out dx = tb_output(N * K), dw = tb_output(M * K);
    TH_FN(moek_matmul_bwd)(c, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
    moek_matmul_bwd(c, dy.wide, x.wide, w.wide, dx.fw, dw.fw, N, K, M);
    moek_matmul_bwd(c, dy.orig, x.orig, w.orig, dx.fo, dw.fo, N, K, M);
    tb_check("matmul_bwd_" TH_NAME " dx", &dx);
    tb_check("matmul_bwd_" TH_NAME " dw", &dw);
    /* optional output: dx NULL computes dw only */
    dw = tb_output(M * K);
    TH_FN(moek_matmul_bwd)(c, dy.h, x.h, w.h, NULL, dw.h, N, K, M);
    moek_matmul_bwd(c, dy.wide, x.wide, w.wide, NULL, dw.fw, N, K, M);
    moek_matmul_bwd(c, dy.orig, x.orig, w.orig, NULL, dw.fo, N, K, M);
    tb_check("matmul_bwd_" TH_NAME " dx = NULL", &dw);
    tb_in_free(&x); tb_in_free(&w); tb_in_free(&dy);

    /* rmsnorm: the backward takes each path's own forward rstd */
    int64_t D = 19;
    float eps = 1e-5f;
    tb_in rx = tb_input(g, N * D, -2, 2), rw = tb_input(g, D, 0.5f, 1.5f), rdy = tb_input(g, N * D, -1, 1);
    tb_out ry = tb_output(N * D);
    tb_f32 rstd = tb_f32_out(N);
    TH_FN(moek_rmsnorm_fwd)(c, rx.h, rw.h, ry.h, rstd.fb, N, D, eps);
    moek_rmsnorm_fwd(c, rx.wide, rw.wide, ry.fw, rstd.fw, N, D, eps);
    moek_rmsnorm_fwd(c, rx.orig, rw.orig, ry.fo, rstd.fo, N, D, eps);
    tb_out rdx = tb_output(N * D), rdw = tb_output(D);
    TH_FN(moek_rmsnorm_bwd)(c, rdy.h, rx.h, rw.h, rstd.fb, rdx.h, rdw.h, N, D);
    moek_rmsnorm_bwd(c, rdy.wide, rx.wide, rw.wide, rstd.fw, rdx.fw, rdw.fw, N, D);
    moek_rmsnorm_bwd(c, rdy.orig, rx.orig, rw.orig, rstd.fo, rdx.fo, rdw.fo, N, D);
    tb_check("rmsnorm_fwd_" TH_NAME " y", &ry);
    tb_check_f32("rmsnorm_fwd_" TH_NAME " rstd", &rstd);
    tb_check("rmsnorm_bwd_" TH_NAME " dx", &rdx);
    tb_check("rmsnorm_bwd_" TH_NAME " dw", &rdw);
    tb_in_free(&rx); tb_in_free(&rw); tb_in_free(&rdy);

    /* rope */
    int64_t B = 2, T = 5, H = 3, Dh = 6, n = B * T * H * Dh;
    tb_in px = tb_input(g, n, -1, 1);
    tb_out py = tb_output(n);
    TH_FN(moek_rope_fwd)(c, px.h, py.h, B, T, H, Dh, 10000.0f);
    moek_rope_fwd(c, px.wide, py.fw, B, T, H, Dh, 10000.0f);
    moek_rope_fwd(c, px.orig, py.fo, B, T, H, Dh, 10000.0f);
    tb_check("rope_fwd_" TH_NAME, &py);
    py = tb_output(n);
    TH_FN(moek_rope_bwd)(c, px.h, py.h, B, T, H, Dh, 10000.0f);
    moek_rope_bwd(c, px.wide, py.fw, B, T, H, Dh, 10000.0f);
    moek_rope_bwd(c, px.orig, py.fo, B, T, H, Dh, 10000.0f);
    tb_check("rope_bwd_" TH_NAME, &py);
    tb_in_free(&px);
    tb_status("dense " TH_NAME, e);
}

static void test_attention(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t B = 2, T = 7, H = 2, Dh = 8, n = B * T * H * Dh, nl = B * H * T;
    tb_in q = tb_input(g, n, -1, 1), k = tb_input(g, n, -1, 1), v = tb_input(g, n, -1, 1),
          dout = tb_input(g, n, -1, 1);
    tb_out o = tb_output(n);
    tb_f32 lse = tb_f32_out(nl);
    TH_FN(moek_attention_fwd)(c, q.h, k.h, v.h, o.h, lse.fb, B, T, H, Dh);
    moek_attention_fwd(c, q.wide, k.wide, v.wide, o.fw, lse.fw, B, T, H, Dh);
    moek_attention_fwd(c, q.orig, k.orig, v.orig, o.fo, lse.fo, B, T, H, Dh);
    tb_out dq = tb_output(n), dk = tb_output(n), dv = tb_output(n);
    /* each path's backward takes its own forward's o and lse; the widened
     * path sees the variant's half o widened */
    float *ow = malloc((size_t)n * sizeof *ow);
    TH_CAST_TO_F32(c, o.h, ow, n);
    TH_FN(moek_attention_bwd)(c, dout.h, q.h, k.h, v.h, o.h, lse.fb, dq.h, dk.h, dv.h, B, T, H, Dh);
    moek_attention_bwd(c, dout.wide, q.wide, k.wide, v.wide, ow, lse.fw, dq.fw, dk.fw, dv.fw,
                       B, T, H, Dh);
    moek_attention_bwd(c, dout.orig, q.orig, k.orig, v.orig, o.fo, lse.fo, dq.fo, dk.fo, dv.fo,
                       B, T, H, Dh);
    tb_check("attention_fwd_" TH_NAME " o", &o);
    tb_check_f32("attention_fwd_" TH_NAME " lse", &lse);
    tb_check("attention_bwd_" TH_NAME " dq", &dq);
    tb_check("attention_bwd_" TH_NAME " dk", &dk);
    tb_check("attention_bwd_" TH_NAME " dv", &dv);
    tb_status("attention " TH_NAME, e);
    free(ow);
    tb_in_free(&q); tb_in_free(&k); tb_in_free(&v); tb_in_free(&dout);
}

static void test_losses(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t N = 6, V = 11;
    int32_t tg[6] = {0, 10, 4, 4, 7, 2};
    float dloss[1] = {0.5f};
    tb_in lg = tb_input(g, N * V, -3, 3);
    tb_f32 loss = tb_f32_out(1), lse = tb_f32_out(N);
    TH_FN(moek_cross_entropy_fwd)(c, lg.h, tg, loss.fb, lse.fb, N, V);
    moek_cross_entropy_fwd(c, lg.wide, tg, loss.fw, lse.fw, N, V);
    moek_cross_entropy_fwd(c, lg.orig, tg, loss.fo, lse.fo, N, V);
    tb_out dl = tb_output(N * V);
    TH_FN(moek_cross_entropy_bwd)(c, dloss, lg.h, tg, lse.fb, dl.h, N, V);
    moek_cross_entropy_bwd(c, dloss, lg.wide, tg, lse.fw, dl.fw, N, V);
    moek_cross_entropy_bwd(c, dloss, lg.orig, tg, lse.fo, dl.fo, N, V);
    tb_check_f32("cross_entropy_fwd_" TH_NAME " loss", &loss);
    tb_check_f32("cross_entropy_fwd_" TH_NAME " lse", &lse);
    tb_check("cross_entropy_bwd_" TH_NAME, &dl);

    /* router: softmax, z-loss */
    int64_t E = 8;
    tb_in rl = tb_input(g, N * E, -2, 2);
    tb_f32 probs = tb_f32_out(N * E);
    TH_FN(moek_softmax_fwd)(c, rl.h, probs.fb, N, E);
    moek_softmax_fwd(c, rl.wide, probs.fw, N, E);
    moek_softmax_fwd(c, rl.orig, probs.fo, N, E);
    float *dprobs = tk_rand(g, N * E, -1, 1);
    tb_out ds = tb_output(N * E);
    TH_FN(moek_softmax_bwd)(c, dprobs, probs.fb, ds.h, N, E);
    moek_softmax_bwd(c, dprobs, probs.fw, ds.fw, N, E);
    moek_softmax_bwd(c, dprobs, probs.fo, ds.fo, N, E);
    tb_check_f32("softmax_fwd_" TH_NAME " probs", &probs);
    tb_check("softmax_bwd_" TH_NAME, &ds);
    free(dprobs);

    tb_f32 z = tb_f32_out(1);
    TH_FN(moek_zloss_fwd)(c, rl.h, z.fb, N, E);
    moek_zloss_fwd(c, rl.wide, z.fw, N, E);
    moek_zloss_fwd(c, rl.orig, z.fo, N, E);
    tb_check_f32("zloss_fwd_" TH_NAME, &z);
    tb_out dz = tb_output(N * E);
    TH_FN(moek_zloss_bwd)(c, dloss, rl.h, dz.h, N, E);
    moek_zloss_bwd(c, dloss, rl.wide, dz.fw, N, E);
    moek_zloss_bwd(c, dloss, rl.orig, dz.fo, N, E);
    tb_check("zloss_bwd_" TH_NAME, &dz);
    tb_status("losses and router " TH_NAME, e);
    tb_in_free(&lg); tb_in_free(&rl);
}

static void test_moe(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t N = 6, D = 5, E = 3, k = 2, K = D, M = 4;
    int32_t idx[12] = {0, 1, 2, 0, 1, 2, 0, 2, 1, 0, 2, 1};
    float *gates = tk_rand(g, N * k, 0.1f, 0.9f);
    for (int pass = 0; pass < 2; pass++) {
        int64_t C = pass == 0 ? 0 : 3; /* dropless, then capacity 3 (drops some) */
        int64_t R = C > 0 ? E * C : N * k;
        char nm[64];
        tb_in x = tb_input(g, N * D, -1, 1);
        int32_t slot[3][12], er[3][6];
        tb_out xs = tb_output(R * D);
        TH_FN(moek_dispatch_fwd)(c, x.h, idx, xs.h, slot[0], er[0], N, D, E, k, C);
        moek_dispatch_fwd(c, x.wide, idx, xs.fw, slot[1], er[1], N, D, E, k, C);
        moek_dispatch_fwd(c, x.orig, idx, xs.fo, slot[2], er[2], N, D, E, k, C);
        CHECK(pass ? "dispatch_fwd_" TH_NAME " C=3: slot_row, expert_rows as fp32" :
                     "dispatch_fwd_" TH_NAME " C=0: slot_row, expert_rows as fp32",
              memcmp(slot[0], slot[1], sizeof slot[0]) == 0 && memcmp(er[0], er[1], sizeof er[0]) == 0,
              "routing tables differ");
        snprintf(nm, sizeof nm, "dispatch_fwd_" TH_NAME " C=%lld", (long long)C);
        tb_check(nm, &xs);

        tb_in dxs = tb_input(g, R * D, -1, 1);
        tb_out dx = tb_output(N * D);
        TH_FN(moek_dispatch_bwd)(c, dxs.h, slot[0], dx.h, N, D, k, R);
        moek_dispatch_bwd(c, dxs.wide, slot[0], dx.fw, N, D, k, R);
        moek_dispatch_bwd(c, dxs.orig, slot[0], dx.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "dispatch_bwd_" TH_NAME " C=%lld", (long long)C);
        tb_check(nm, &dx);

        /* experts: xs from the dispatch just made (half), w [E,M,K] */
        tb_in w = tb_input(g, E * M * K, -1, 1), xsi = tb_input(g, R * K, -1, 1),
              dys = tb_input(g, R * M, -1, 1);
        tb_out ys = tb_output(R * M);
        TH_FN(moek_grouped_matmul_fwd)(c, xsi.h, w.h, er[0], ys.h, R, K, M, E);
        moek_grouped_matmul_fwd(c, xsi.wide, w.wide, er[0], ys.fw, R, K, M, E);
        moek_grouped_matmul_fwd(c, xsi.orig, w.orig, er[0], ys.fo, R, K, M, E);
        snprintf(nm, sizeof nm, "grouped_matmul_fwd_" TH_NAME " C=%lld", (long long)C);
        tb_check(nm, &ys);
        tb_out gdx = tb_output(R * K), gdw = tb_output(E * M * K);
        TH_FN(moek_grouped_matmul_bwd)(c, dys.h, xsi.h, w.h, er[0], gdx.h, gdw.h, R, K, M, E);
        moek_grouped_matmul_bwd(c, dys.wide, xsi.wide, w.wide, er[0], gdx.fw, gdw.fw, R, K, M, E);
        moek_grouped_matmul_bwd(c, dys.orig, xsi.orig, w.orig, er[0], gdx.fo, gdw.fo, R, K, M, E);
        snprintf(nm, sizeof nm, "grouped_matmul_bwd_" TH_NAME " C=%lld dxs", (long long)C);
        tb_check(nm, &gdx);
        snprintf(nm, sizeof nm, "grouped_matmul_bwd_" TH_NAME " C=%lld dw", (long long)C);
        tb_check(nm, &gdw);

        /* combine over rows of width D */
        tb_in yc = tb_input(g, R * D, -1, 1), dout = tb_input(g, N * D, -1, 1);
        tb_out out = tb_output(N * D);
        TH_FN(moek_combine_fwd)(c, yc.h, slot[0], gates, out.h, N, D, k, R);
        moek_combine_fwd(c, yc.wide, slot[0], gates, out.fw, N, D, k, R);
        moek_combine_fwd(c, yc.orig, slot[0], gates, out.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "combine_fwd_" TH_NAME " C=%lld", (long long)C);
        tb_check(nm, &out);
        tb_out cdys = tb_output(R * D);
        tb_f32 dg = tb_f32_out(N * k);
        TH_FN(moek_combine_bwd)(c, dout.h, yc.h, slot[0], gates, cdys.h, dg.fb, N, D, k, R);
        moek_combine_bwd(c, dout.wide, yc.wide, slot[0], gates, cdys.fw, dg.fw, N, D, k, R);
        moek_combine_bwd(c, dout.orig, yc.orig, slot[0], gates, cdys.fo, dg.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "combine_bwd_" TH_NAME " C=%lld dys", (long long)C);
        tb_check(nm, &cdys);
        snprintf(nm, sizeof nm, "combine_bwd_" TH_NAME " C=%lld dgates", (long long)C);
        tb_check_f32(nm, &dg);
        tb_in_free(&x); tb_in_free(&dxs); tb_in_free(&w); tb_in_free(&xsi); tb_in_free(&dys);
        tb_in_free(&yc); tb_in_free(&dout);
    }
    free(gates);
    tb_status("dispatch/experts/combine " TH_NAME, e);
}

static void test_optim(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t n = 300;
    float hyper[MOEK_HYPER_COUNT] = {0};
    hyper[MOEK_HYPER_LR] = 1e-2f;
    hyper[MOEK_HYPER_BETA1] = 0.9f;
    hyper[MOEK_HYPER_BETA2] = 0.95f;
    hyper[MOEK_HYPER_EPS] = 1e-8f;
    hyper[MOEK_HYPER_BC1] = 1.0f - 0.9f * 0.9f; /* step 2 */
    hyper[MOEK_HYPER_BC2] = 1.0f - 0.95f * 0.95f;
    hyper[MOEK_HYPER_MAX_NORM] = 1.0f;
    hyper[MOEK_HYPER_MOMENTUM] = 0.9f;
    float norm_sq[1] = {4.0f}; /* clipping active: factor 1/2 */
    float *p0 = tk_rand(g, n, -1, 1), *gr = tk_rand(g, n, -1, 1);
    float *m0 = tk_rand(g, n, -0.1f, 0.1f), *v0 = tk_rand(g, n, 0.0f, 0.01f);
    float *mb = malloc((size_t)n * 4), *vb = malloc((size_t)n * 4), *mf = malloc((size_t)n * 4),
          *vf = malloc((size_t)n * 4), *master = malloc((size_t)n * 4), *pf = malloc((size_t)n * 4);
    TH_T *p = malloc((size_t)n * 2), *want = malloc((size_t)n * 2);
    memcpy(master, p0, (size_t)n * 4); memcpy(pf, p0, (size_t)n * 4);
    memcpy(mb, m0, (size_t)n * 4); memcpy(mf, m0, (size_t)n * 4);
    memcpy(vb, v0, (size_t)n * 4); memcpy(vf, v0, (size_t)n * 4);
    TH_FN(moek_adamw)(c, p, master, gr, mb, vb, n, hyper, norm_sq, 0.1f);
    moek_adamw(c, pf, gr, mf, vf, n, hyper, norm_sq, 0.1f);
    TH_FN(moek_cast_f32)(c, pf, want, n);
    int moved = 0;
    for (int64_t i = 0; i < n; i++)
        moved |= pf[i] != p0[i];
    CHECK("adamw_" TH_NAME ": master, m, v == fp32 adamw bit for bit",
          moved && memcmp(master, pf, (size_t)n * 4) == 0 && memcmp(mb, mf, (size_t)n * 4) == 0 &&
              memcmp(vb, vf, (size_t)n * 4) == 0, "differ (moved %d)", moved);
    CHECK("adamw_" TH_NAME ": p == round(master)", memcmp(p, want, (size_t)n * 2) == 0, "differ");

    memcpy(master, p0, (size_t)n * 4); memcpy(pf, p0, (size_t)n * 4);
    memcpy(mb, m0, (size_t)n * 4); memcpy(mf, m0, (size_t)n * 4);
    TH_FN(moek_sgd)(c, p, master, gr, mb, n, hyper, norm_sq, 0.01f);
    moek_sgd(c, pf, gr, mf, n, hyper, norm_sq, 0.01f);
    TH_FN(moek_cast_f32)(c, pf, want, n);
    CHECK("sgd_" TH_NAME ": master, buf == fp32 sgd bit for bit; p == round(master)",
          memcmp(master, pf, (size_t)n * 4) == 0 && memcmp(mb, mf, (size_t)n * 4) == 0 &&
              memcmp(p, want, (size_t)n * 2) == 0, "differ");
    tb_status("optimizers " TH_NAME, e);
    free(p0); free(gr); free(m0); free(v0); free(mb); free(vb); free(mf); free(vf); free(master);
    free(pf); free(p); free(want);
}

/* ---- workspace ------------------------------------------------------------- */
static void test_workspace(tk_rng *g)
{
    int64_t N = 5, K = 7, M = 3, need = MOEK_BF16_WORKSPACE_BYTES(N * K + M * K + N * M);
    tb_in x = tb_input(g, N * K, -1, 1), w = tb_input(g, M * K, -1, 1);
    TH_T y[15], ref[15];
    unsigned char *ws = aligned_alloc(64, 1 << 16);
    tb_env e;

    tb_env_init(&e, ws, need - 1);
    for (int i = 0; i < 15; i++)
        y[i] = 0x4499;
    TH_FN(moek_matmul_fwd)(&e.c, x.h, w.h, y, N, K, M);
    int untouched = 1;
    for (int i = 0; i < 15; i++)
        untouched &= y[i] == 0x4499;
    CHECK(TH_WS_PREFIX "workspace one byte short: MOEK_E_SHAPE, output untouched",
          e.st == MOEK_E_SHAPE && untouched, "status %d, untouched %d", e.st, untouched);

    tb_env_init(&e, NULL, 0);
    TH_FN(moek_rmsnorm_fwd)(&e.c, x.h, w.h, y, (float *)ref, 1, 7, 1e-5f);
    CHECK(TH_WS_PREFIX "no workspace: MOEK_E_SHAPE", e.st == MOEK_E_SHAPE, "status %d", e.st);

    tb_env_init(&e, ws, need - 1);
    e.st = MOEK_E_INDEX;
    TH_FN(moek_matmul_fwd)(&e.c, x.h, w.h, y, N, K, M);
    CHECK(TH_WS_PREFIX "workspace short after an earlier error: the first error stays",
          e.st == MOEK_E_INDEX, "status %d", e.st);

    /* exactly enough, from a base that is not 64-byte aligned: works, and
     * writes nothing past the size given */
    tb_env_init(&e, ws + 4, need);
    memset(ws, 0xA5, 1 << 16);
    TH_FN(moek_matmul_fwd)(&e.c, x.h, w.h, y, N, K, M);
    float yf[15];
    moek_matmul_fwd(&e.c, x.wide, w.wide, yf, N, K, M);
    TH_FN(moek_cast_f32)(NULL, yf, ref, 15);
    int guard = 1;
    for (int64_t i = 4 + need; i < (1 << 16); i++)
        guard &= ws[i] == 0xA5;
    CHECK(TH_WS_PREFIX
          "workspace exactly MOEK_BF16_WORKSPACE_BYTES at an unaligned base: result, no overrun",
          e.st == 0 && memcmp(y, ref, sizeof y) == 0 && guard && ws[0] == 0xA5,
          "status %d, guard %d", e.st, guard);

    /* the most pieces (attention backward: 8 tensors of odd length) */
    int64_t B = 1, T = 3, H = 1, Dh = 5, n = B * T * H * Dh;
    int64_t need8 = MOEK_BF16_WORKSPACE_BYTES(8 * n);
    tb_in q = tb_input(g, n, -1, 1);
    TH_T o[15], d[3][15];
    float lse[3];
    tb_env_init(&e, ws + 60, need8);
    memset(ws, 0xA5, 1 << 16);
    TH_FN(moek_attention_fwd)(&e.c, q.h, q.h, q.h, o, lse, B, T, H, Dh);
    TH_FN(moek_attention_bwd)(&e.c, q.h, q.h, q.h, q.h, o, lse, d[0], d[1], d[2], B, T, H, Dh);
    guard = 1;
    for (int64_t i = 60 + need8; i < (1 << 16); i++)
        guard &= ws[i] == 0xA5;
    CHECK("attention_bwd_" TH_NAME " with 8 pieces fits MOEK_BF16_WORKSPACE_BYTES at a bad base",
          e.st == 0 && guard, "status %d, guard %d", e.st, guard);
    tb_env_init(&e, ws, need8 - 1);
    TH_FN(moek_attention_bwd)(&e.c, q.h, q.h, q.h, q.h, o, lse, d[0], d[1], d[2], B, T, H, Dh);
    CHECK("attention_bwd_" TH_NAME " workspace one byte short: MOEK_E_SHAPE", e.st == MOEK_E_SHAPE,
          "status %d", e.st);

    /* a call whose half tensors are all empty needs no workspace */
    tb_env_init(&e, NULL, 0);
    TH_FN(moek_matmul_fwd)(&e.c, x.h, w.h, y, 0, K, 0);
    CHECK("all-empty matmul_fwd_" TH_NAME " needs no workspace", e.st == 0, "status %d", e.st);
    free(ws);
    tb_in_free(&x); tb_in_free(&w); tb_in_free(&q);
}
