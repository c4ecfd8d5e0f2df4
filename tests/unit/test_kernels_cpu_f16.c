/* test_kernels_cpu_f16.c - the CPU fp16 variants (kernels/cpu/f16.c) and
 * loss scaling in the optimizers (kernels/cpu/optim.c):
 *  - fp32 -> half rounding against hand-computed bit patterns (ties,
 *    overflow to Inf from 65520 on, subnormals, NaN), against an independent
 *    nearest-value oracle on random bits, and widen/round on all 65536 halves;
 *  - every variant bit for bit against round(fp32 kernel on the widened
 *    inputs) and within 1e-2 of fp32 on the unrounded inputs (the bf16
 *    test's harness, instantiated for moek_f16), the issue 2 layer ops too;
 *  - adamw/sgd (fp32, _bf16, _f16) with a loss scale S equal the unscaled
 *    update on g / S, and a non-finite norm leaves params and moments alone. */
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

/* the value of a half, computed from its fields in double (the oracle's own
 * decoding, independent of kf16_widen) */
static double th_value(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

/* ---- rounding -------------------------------------------------------------- */
static void test_round_patterns(void)
{
    static const struct { uint32_t in; uint16_t want; const char *what; } cases[] = {
        {0x3F800000u, 0x3C00, "1.0 exact"},
        {0x3F801000u, 0x3C00, "tie, even kept part: down"},
        {0x3F803000u, 0x3C02, "tie, odd kept part: up"},
        {0x3F801001u, 0x3C01, "just above a tie: up"},
        {0x3F800FFFu, 0x3C00, "just below a tie: down"},
        {0xBF803000u, 0xBC02, "negative tie, odd: away from zero"},
        {0x3FFFF000u, 0x4000, "tie carrying into the exponent"},
        {0x477FE000u, 0x7BFF, "65504: the largest half"},
        {0x477FEFFFu, 0x7BFF, "just below 65520: 65504"},
        {0x477FF000u, 0x7C00, "65520 (tie above the largest): Inf"},
        {0xC77FF000u, 0xFC00, "-65520: -Inf"},
        {0x47800000u, 0x7C00, "65536: Inf"},
        {0x7F7FFFFFu, 0x7C00, "largest finite fp32: Inf"},
        {0x7F800000u, 0x7C00, "+Inf"},
        {0xFF800000u, 0xFC00, "-Inf"},
        {0x7FC00000u, 0x7E00, "quiet NaN"},
        {0x7F800001u, 0x7E00, "signalling NaN, low payload: quieted, not Inf"},
        {0xFFFFFFFFu, 0xFFFF, "negative NaN with all ones"},
        {0x00000000u, 0x0000, "+0"},
        {0x80000000u, 0x8000, "-0"},
        {0x38800000u, 0x0400, "2^-14: the smallest normal"},
        {0x387FE000u, 0x0400, "largest subnormal tie (odd) carries to the smallest normal"},
        {0x387FC000u, 0x03FF, "1023 units: the largest subnormal"},
        {0x33800000u, 0x0001, "2^-24: the smallest subnormal"},
        {0x33000000u, 0x0000, "2^-25 (a tie between 0 and 2^-24): 0"},
        {0x33000001u, 0x0001, "just above 2^-25: 2^-24"},
        {0x33C00000u, 0x0002, "1.5 * 2^-24 (tie, odd): 2 units"},
        {0x34200000u, 0x0002, "2.5 * 2^-24 (tie, even): 2 units"},
        {0x80000001u, 0x8000, "smallest negative fp32 subnormal: -0"},
        {0x3EAAAAABu, 0x3555, "1/3"},
    };
    int n = (int)(sizeof cases / sizeof cases[0]);
    float in[64];
    moek_f16 out[64];
    for (int i = 0; i < n; i++)
        in[i] = tb_float(cases[i].in);
    tb_env e;
    tb_env_init(&e, NULL, 0);
    moek_cast_f32_f16(&e.c, in, out, n);
    for (int i = 0; i < n; i++) {
        char label[160];
        snprintf(label, sizeof label, "f16 round: %s", cases[i].what);
        CHECK(label, out[i] == cases[i].want, "0x%08X -> 0x%04X, want 0x%04X", (unsigned)cases[i].in,
              (unsigned)out[i], (unsigned)cases[i].want);
    }
    moek_f16 h[4] = {0x3C00, 0x8001, 0x7E01, 0xFC00};
    float w[4];
    moek_cast_f16_f32(&e.c, h, w, 4);
    CHECK("f16 widen: 1, -2^-24, NaN keeps its payload, -Inf",
          w[0] == 1.0f && w[1] == -ldexpf(1.0f, -24) && isnan(w[2]) && tb_bits(w[2]) == 0x7FC02000u &&
              isinf(w[3]) && w[3] < 0,
          "got %08X %08X %08X %08X", (unsigned)tb_bits(w[0]), (unsigned)tb_bits(w[1]),
          (unsigned)tb_bits(w[2]), (unsigned)tb_bits(w[3]));
    CHECK("f16 casts: no error status", e.st == 0, "status %d", e.st);
}

/* Oracle: the nearer of the two halves around x (by value, in double), the
 * even one on a tie, Inf past 65520; random fp32 bit patterns concentrated on
 * the half range, on the threaded path. */
static void test_round_oracle(void)
{
    int64_t n = 200000;
    float *x = malloc((size_t)n * sizeof *x), *back = malloc(65536 * sizeof *back);
    moek_f16 *h = malloc((size_t)n * sizeof *h);
    tk_rng g = {0xF16F16ull};
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)(tk_next(&g) >> 32);
        /* exponents 2^-30 .. 2^17 mostly: subnormals, normals, overflow */
        if (i % 8 != 0)
            u = (u & 0x807FFFFFu) | ((uint32_t)(97 + (u >> 8) % 48) << 23);
        if (i % 4 == 1)
            u = (u & 0xFFFFE000u) | 0x1000u; /* exact ties of normal halves */
        x[i] = tb_float(u);
    }
    tb_env e;
    tb_env_init(&e, NULL, 0);
    e.c.num_threads = 2;
    moek_cast_f32_f16(&e.c, x, h, n);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        double v = fabs((double)x[i]);
        uint16_t sign = (tb_bits(x[i]) >> 16) & 0x8000u, want;
        if (isnan(x[i])) {
            if (!((h[i] & 0x7C00) == 0x7C00 && (h[i] & 0x3FF)))
                bad++, first = first < 0 ? i : first;
            continue;
        }
        if (v >= 65520.0) {
            want = sign | 0x7C00;
        } else {
            /* binary search for the largest half magnitude <= v */
            uint16_t lo = 0, hi = 0x7BFF;
            while (lo < hi) {
                uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
                if (th_value(mid) <= v)
                    lo = mid;
                else
                    hi = (uint16_t)(mid - 1);
            }
            double dl = v - th_value(lo), dh = lo < 0x7BFF ? th_value((uint16_t)(lo + 1)) - v : INFINITY;
            uint16_t m = dl < dh ? lo : dh < dl ? (uint16_t)(lo + 1) : ((lo & 1) ? (uint16_t)(lo + 1) : lo);
            want = sign | m;
        }
        if (h[i] != want)
            bad++, first = first < 0 ? i : first;
    }
    CHECK("f16 round: 200000 random fp32 (a quarter exact ties), threaded, vs nearest-even oracle",
          bad == 0, "%lld wrong, first 0x%08X -> 0x%04X", (long long)bad,
          first >= 0 ? (unsigned)tb_bits(x[first]) : 0u, first >= 0 ? (unsigned)h[first] : 0u);

    moek_f16 *all = malloc(65536 * sizeof *all), *again = malloc(65536 * sizeof *again);
    for (int i = 0; i < 65536; i++)
        all[i] = (moek_f16)i;
    moek_cast_f16_f32(&e.c, all, back, 65536);
    moek_cast_f32_f16(&e.c, back, again, 65536);
    int64_t diff = 0, val = 0;
    for (int i = 0; i < 65536; i++) {
        int nan = (i & 0x7C00) == 0x7C00 && (i & 0x3FF);
        if (nan ? !(again[i] & 0x200) : again[i] != all[i])
            diff++;
        double ref = th_value((uint16_t)i);
        if (!(nan ? isnan(back[i]) : (double)back[i] == ref))
            val++;
    }
    CHECK("f16 widen is exact for all 65536 patterns", val == 0, "%lld differ", (long long)val);
    CHECK("f16 round(widen(h)) == h for all 65536 patterns (NaN: quiet)", diff == 0,
          "%lld differ", (long long)diff);
    free(x); free(back); free(h); free(all); free(again);
}

/* ---- every variant --------------------------------------------------------- */
/* an input: the original fp32 values, their f16 rounding and its widening */
typedef struct {
    int64_t n;
    float *orig, *wide;
    moek_f16 *h;
} tb_in;

static tb_in tb_input(tk_rng *g, int64_t n, float lo, float hi)
{
    tb_in a;
    a.n = n;
    a.orig = tk_rand(g, n, lo, hi);
    a.wide = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    a.h = malloc((size_t)(n > 0 ? n : 1) * sizeof(moek_f16));
    moek_cast_f32_f16(NULL, a.orig, a.h, n);
    moek_cast_f16_f32(NULL, a.h, a.wide, n);
    return a;
}

/* from fp32 values (a forward's outputs): f16-side = the given f16 result */
static void tb_in_free(tb_in *a) { free(a->orig); free(a->wide); free(a->h); }

/* a f16 output: the variant's result and the fp32 kernel's on the widened
 * (fw) and on the original (fo) inputs */
typedef struct {
    int64_t n;
    moek_f16 *h;
    float *fw, *fo;
} tb_out;

static tb_out tb_output(int64_t n)
{
    tb_out o;
    o.n = n;
    o.h = malloc((size_t)(n > 0 ? n : 1) * sizeof(moek_f16));
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
    moek_f16 *r = malloc((size_t)(o->n > 0 ? o->n : 1) * sizeof *r);
    float *w = malloc((size_t)(o->n > 0 ? o->n : 1) * sizeof *w);
    moek_cast_f32_f16(NULL, o->fw, r, o->n);
    moek_cast_f16_f32(NULL, o->h, w, o->n);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < o->n; i++)
        if (r[i] != o->h[i])
            bad++, first = first < 0 ? i : first;
    snprintf(label, sizeof label, "%s: f16 == round(fp32 kernel on widened inputs)", name);
    CHECK(label, bad == 0 && o->n > 0, "%lld of %lld differ, first [%lld] 0x%04X vs 0x%04X",
          (long long)bad, (long long)o->n, (long long)first,
          first >= 0 ? (unsigned)o->h[first] : 0u, first >= 0 ? (unsigned)r[first] : 0u);
    double rel = tb_relerr(w, o->fo, o->n);
    snprintf(label, sizeof label, "%s: within %g of fp32 on the unrounded inputs", name, TB_TOL);
    CHECK(label, rel <= TB_TOL, "relative error %g", rel);
    free(r); free(w);
    free(o->h); free(o->fw); free(o->fo);
}

/* an fp32 output of a f16 variant (rstd, lse, loss, probs, dgates): fb from
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
    moek_add_fwd_f16(c, a.h, b.h, y.h, n);
    moek_add_fwd(c, a.wide, b.wide, y.fw, n);
    moek_add_fwd(c, a.orig, b.orig, y.fo, n);
    tb_check("add_fwd_f16", &y);

    y = tb_output(n);
    moek_scale_fwd_f16(c, a.h, y.h, n, 0.3f);
    moek_scale_fwd(c, a.wide, y.fw, n, 0.3f);
    moek_scale_fwd(c, a.orig, y.fo, n, 0.3f);
    tb_check("scale_fwd_f16", &y);

    y = tb_output(n);
    moek_scale_bwd_f16(c, d.h, y.h, n, -1.7f);
    moek_scale_bwd(c, d.wide, y.fw, n, -1.7f);
    moek_scale_bwd(c, d.orig, y.fo, n, -1.7f);
    tb_check("scale_bwd_f16", &y);

    y = tb_output(n);
    moek_gelu_fwd_f16(c, a.h, y.h, n);
    moek_gelu_fwd(c, a.wide, y.fw, n);
    moek_gelu_fwd(c, a.orig, y.fo, n);
    tb_check("gelu_fwd_f16", &y);

    y = tb_output(n);
    moek_gelu_bwd_f16(c, d.h, a.h, y.h, n);
    moek_gelu_bwd(c, d.wide, a.wide, y.fw, n);
    moek_gelu_bwd(c, d.orig, a.orig, y.fo, n);
    tb_check("gelu_bwd_f16", &y);

    y = tb_output(n);
    moek_swiglu_fwd_f16(c, a.h, b.h, y.h, n);
    moek_swiglu_fwd(c, a.wide, b.wide, y.fw, n);
    moek_swiglu_fwd(c, a.orig, b.orig, y.fo, n);
    tb_check("swiglu_fwd_f16", &y);

    y = tb_output(n);
    tb_out y2 = tb_output(n);
    moek_swiglu_bwd_f16(c, d.h, a.h, b.h, y.h, y2.h, n);
    moek_swiglu_bwd(c, d.wide, a.wide, b.wide, y.fw, y2.fw, n);
    moek_swiglu_bwd(c, d.orig, a.orig, b.orig, y.fo, y2.fo, n);
    tb_check("swiglu_bwd_f16 dgate", &y);
    tb_check("swiglu_bwd_f16 dup", &y2);

    /* fill: f16(value), here a value that must round (1/3) */
    y = tb_output(n);
    moek_fill_f16(c, y.h, n, 1.0f / 3.0f);
    moek_fill(c, y.fw, n, 1.0f / 3.0f);
    moek_fill(c, y.fo, n, 1.0f / 3.0f);
    tb_check("fill_f16", &y);

    y = tb_output(n);
    moek_copy_f16(c, a.h, y.h, n);
    moek_copy(c, a.wide, y.fw, n);
    moek_copy(c, a.orig, y.fo, n);
    tb_check("copy_f16", &y);

    /* accumulate: fp32 dst += widened src */
    tb_f32 acc = tb_f32_out(n);
    for (int64_t i = 0; i < n; i++)
        acc.fb[i] = acc.fw[i] = acc.fo[i] = b.orig[i];
    moek_accumulate_f16(c, acc.fb, a.h, n);
    moek_accumulate(c, acc.fw, a.wide, n);
    moek_accumulate(c, acc.fo, a.orig, n);
    tb_check_f32("accumulate_f16", &acc);

    /* in place (y aliases x), as the memory planner may arrange */
    moek_f16 *inplace = malloc((size_t)n * sizeof *inplace);
    memcpy(inplace, a.h, (size_t)n * sizeof *inplace);
    y = tb_output(n);
    moek_gelu_fwd_f16(c, inplace, inplace, n);
    moek_gelu_fwd_f16(c, a.h, y.h, n);
    CHECK("gelu_fwd_f16 in place == out of place", memcmp(inplace, y.h, (size_t)n * 2) == 0,
          "differ");
    free(inplace); free(y.h); free(y.fw); free(y.fo);
    tb_status("elementwise f16", e);
    tb_in_free(&a); tb_in_free(&b); tb_in_free(&d);
}

static void test_embedding(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t N = 11, V = 7, D = 9;
    int32_t ids[11] = {0, 3, 6, 3, 1, 1, 5, 0, 2, 3, 6};
    tb_in tab = tb_input(g, V * D, -1, 1), dout = tb_input(g, N * D, -1, 1);
    tb_out y = tb_output(N * D);
    moek_embedding_fwd_f16(c, ids, tab.h, y.h, N, V, D);
    moek_embedding_fwd(c, ids, tab.wide, y.fw, N, V, D);
    moek_embedding_fwd(c, ids, tab.orig, y.fo, N, V, D);
    tb_check("embedding_fwd_f16", &y);
    y = tb_output(V * D);
    moek_embedding_bwd_f16(c, dout.h, ids, y.h, N, V, D);
    moek_embedding_bwd(c, dout.wide, ids, y.fw, N, V, D);
    moek_embedding_bwd(c, dout.orig, ids, y.fo, N, V, D);
    tb_check("embedding_bwd_f16", &y);
    tb_status("embedding f16", e);

    /* a bad id: MOEK_E_INDEX and a zero row, as the fp32 kernel */
    int32_t bad[2] = {2, 7};
    moek_f16 out[18];
    for (int i = 0; i < 18; i++)
        out[i] = 0x4499;
    moek_embedding_fwd_f16(c, bad, tab.h, out, 2, V, D);
    int ok = memcmp(out, tab.h + 2 * D, (size_t)D * 2) == 0;
    for (int i = 9; i < 18; i++)
        ok &= out[i] == 0;
    CHECK("embedding_fwd_f16 id out of range: MOEK_E_INDEX, zero row", e->st == MOEK_E_INDEX && ok,
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
    moek_matmul_fwd_f16(c, x.h, w.h, y.h, N, K, M);
    moek_matmul_fwd(c, x.wide, w.wide, y.fw, N, K, M);
    moek_matmul_fwd(c, x.orig, w.orig, y.fo, N, K, M);
    tb_check("matmul_fwd_f16", &y);
    tb_out dx = tb_output(N * K), dw = tb_output(M * K);
    moek_matmul_bwd_f16(c, dy.h, x.h, w.h, dx.h, dw.h, N, K, M);
    moek_matmul_bwd(c, dy.wide, x.wide, w.wide, dx.fw, dw.fw, N, K, M);
    moek_matmul_bwd(c, dy.orig, x.orig, w.orig, dx.fo, dw.fo, N, K, M);
    tb_check("matmul_bwd_f16 dx", &dx);
    tb_check("matmul_bwd_f16 dw", &dw);
    /* optional output: dx NULL computes dw only */
    dw = tb_output(M * K);
    moek_matmul_bwd_f16(c, dy.h, x.h, w.h, NULL, dw.h, N, K, M);
    moek_matmul_bwd(c, dy.wide, x.wide, w.wide, NULL, dw.fw, N, K, M);
    moek_matmul_bwd(c, dy.orig, x.orig, w.orig, NULL, dw.fo, N, K, M);
    tb_check("matmul_bwd_f16 dx = NULL", &dw);
    tb_in_free(&x); tb_in_free(&w); tb_in_free(&dy);

    /* rmsnorm: the backward takes each path's own forward rstd */
    int64_t D = 19;
    float eps = 1e-5f;
    tb_in rx = tb_input(g, N * D, -2, 2), rw = tb_input(g, D, 0.5f, 1.5f), rdy = tb_input(g, N * D, -1, 1);
    tb_out ry = tb_output(N * D);
    tb_f32 rstd = tb_f32_out(N);
    moek_rmsnorm_fwd_f16(c, rx.h, rw.h, ry.h, rstd.fb, N, D, eps);
    moek_rmsnorm_fwd(c, rx.wide, rw.wide, ry.fw, rstd.fw, N, D, eps);
    moek_rmsnorm_fwd(c, rx.orig, rw.orig, ry.fo, rstd.fo, N, D, eps);
    tb_out rdx = tb_output(N * D), rdw = tb_output(D);
    moek_rmsnorm_bwd_f16(c, rdy.h, rx.h, rw.h, rstd.fb, rdx.h, rdw.h, N, D);
    moek_rmsnorm_bwd(c, rdy.wide, rx.wide, rw.wide, rstd.fw, rdx.fw, rdw.fw, N, D);
    moek_rmsnorm_bwd(c, rdy.orig, rx.orig, rw.orig, rstd.fo, rdx.fo, rdw.fo, N, D);
    tb_check("rmsnorm_fwd_f16 y", &ry);
    tb_check_f32("rmsnorm_fwd_f16 rstd", &rstd);
    tb_check("rmsnorm_bwd_f16 dx", &rdx);
    tb_check("rmsnorm_bwd_f16 dw", &rdw);
    tb_in_free(&rx); tb_in_free(&rw); tb_in_free(&rdy);

    /* rope */
    int64_t B = 2, T = 5, H = 3, Dh = 6, n = B * T * H * Dh;
    tb_in px = tb_input(g, n, -1, 1);
    tb_out py = tb_output(n);
    moek_rope_fwd_f16(c, px.h, py.h, B, T, H, Dh, 10000.0f);
    moek_rope_fwd(c, px.wide, py.fw, B, T, H, Dh, 10000.0f);
    moek_rope_fwd(c, px.orig, py.fo, B, T, H, Dh, 10000.0f);
    tb_check("rope_fwd_f16", &py);
    py = tb_output(n);
    moek_rope_bwd_f16(c, px.h, py.h, B, T, H, Dh, 10000.0f);
    moek_rope_bwd(c, px.wide, py.fw, B, T, H, Dh, 10000.0f);
    moek_rope_bwd(c, px.orig, py.fo, B, T, H, Dh, 10000.0f);
    tb_check("rope_bwd_f16", &py);
    tb_in_free(&px);
    tb_status("dense f16", e);
}

static void test_attention(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t B = 2, T = 7, H = 2, Dh = 8, n = B * T * H * Dh, nl = B * H * T;
    tb_in q = tb_input(g, n, -1, 1), k = tb_input(g, n, -1, 1), v = tb_input(g, n, -1, 1),
          dout = tb_input(g, n, -1, 1);
    tb_out o = tb_output(n);
    tb_f32 lse = tb_f32_out(nl);
    moek_attention_fwd_f16(c, q.h, k.h, v.h, o.h, lse.fb, B, T, H, Dh);
    moek_attention_fwd(c, q.wide, k.wide, v.wide, o.fw, lse.fw, B, T, H, Dh);
    moek_attention_fwd(c, q.orig, k.orig, v.orig, o.fo, lse.fo, B, T, H, Dh);
    tb_out dq = tb_output(n), dk = tb_output(n), dv = tb_output(n);
    /* each path's backward takes its own forward's o and lse; the widened
     * path sees the variant's f16 o widened */
    float *ow = malloc((size_t)n * sizeof *ow);
    moek_cast_f16_f32(c, o.h, ow, n);
    moek_attention_bwd_f16(c, dout.h, q.h, k.h, v.h, o.h, lse.fb, dq.h, dk.h, dv.h, B, T, H, Dh);
    moek_attention_bwd(c, dout.wide, q.wide, k.wide, v.wide, ow, lse.fw, dq.fw, dk.fw, dv.fw,
                       B, T, H, Dh);
    moek_attention_bwd(c, dout.orig, q.orig, k.orig, v.orig, o.fo, lse.fo, dq.fo, dk.fo, dv.fo,
                       B, T, H, Dh);
    tb_check("attention_fwd_f16 o", &o);
    tb_check_f32("attention_fwd_f16 lse", &lse);
    tb_check("attention_bwd_f16 dq", &dq);
    tb_check("attention_bwd_f16 dk", &dk);
    tb_check("attention_bwd_f16 dv", &dv);
    tb_status("attention f16", e);
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
    moek_cross_entropy_fwd_f16(c, lg.h, tg, loss.fb, lse.fb, N, V);
    moek_cross_entropy_fwd(c, lg.wide, tg, loss.fw, lse.fw, N, V);
    moek_cross_entropy_fwd(c, lg.orig, tg, loss.fo, lse.fo, N, V);
    tb_out dl = tb_output(N * V);
    moek_cross_entropy_bwd_f16(c, dloss, lg.h, tg, lse.fb, dl.h, N, V);
    moek_cross_entropy_bwd(c, dloss, lg.wide, tg, lse.fw, dl.fw, N, V);
    moek_cross_entropy_bwd(c, dloss, lg.orig, tg, lse.fo, dl.fo, N, V);
    tb_check_f32("cross_entropy_fwd_f16 loss", &loss);
    tb_check_f32("cross_entropy_fwd_f16 lse", &lse);
    tb_check("cross_entropy_bwd_f16", &dl);

    /* router: softmax, z-loss */
    int64_t E = 8;
    tb_in rl = tb_input(g, N * E, -2, 2);
    tb_f32 probs = tb_f32_out(N * E);
    moek_softmax_fwd_f16(c, rl.h, probs.fb, N, E);
    moek_softmax_fwd(c, rl.wide, probs.fw, N, E);
    moek_softmax_fwd(c, rl.orig, probs.fo, N, E);
    float *dprobs = tk_rand(g, N * E, -1, 1);
    tb_out ds = tb_output(N * E);
    moek_softmax_bwd_f16(c, dprobs, probs.fb, ds.h, N, E);
    moek_softmax_bwd(c, dprobs, probs.fw, ds.fw, N, E);
    moek_softmax_bwd(c, dprobs, probs.fo, ds.fo, N, E);
    tb_check_f32("softmax_fwd_f16 probs", &probs);
    tb_check("softmax_bwd_f16", &ds);
    free(dprobs);

    tb_f32 z = tb_f32_out(1);
    moek_zloss_fwd_f16(c, rl.h, z.fb, N, E);
    moek_zloss_fwd(c, rl.wide, z.fw, N, E);
    moek_zloss_fwd(c, rl.orig, z.fo, N, E);
    tb_check_f32("zloss_fwd_f16", &z);
    tb_out dz = tb_output(N * E);
    moek_zloss_bwd_f16(c, dloss, rl.h, dz.h, N, E);
    moek_zloss_bwd(c, dloss, rl.wide, dz.fw, N, E);
    moek_zloss_bwd(c, dloss, rl.orig, dz.fo, N, E);
    tb_check("zloss_bwd_f16", &dz);
    tb_status("losses and router f16", e);
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
        moek_dispatch_fwd_f16(c, x.h, idx, xs.h, slot[0], er[0], N, D, E, k, C);
        moek_dispatch_fwd(c, x.wide, idx, xs.fw, slot[1], er[1], N, D, E, k, C);
        moek_dispatch_fwd(c, x.orig, idx, xs.fo, slot[2], er[2], N, D, E, k, C);
        CHECK(pass ? "dispatch_fwd_f16 C=3: slot_row, expert_rows as fp32" :
                     "dispatch_fwd_f16 C=0: slot_row, expert_rows as fp32",
              memcmp(slot[0], slot[1], sizeof slot[0]) == 0 && memcmp(er[0], er[1], sizeof er[0]) == 0,
              "routing tables differ");
        snprintf(nm, sizeof nm, "dispatch_fwd_f16 C=%lld", (long long)C);
        tb_check(nm, &xs);

        tb_in dxs = tb_input(g, R * D, -1, 1);
        tb_out dx = tb_output(N * D);
        moek_dispatch_bwd_f16(c, dxs.h, slot[0], dx.h, N, D, k, R);
        moek_dispatch_bwd(c, dxs.wide, slot[0], dx.fw, N, D, k, R);
        moek_dispatch_bwd(c, dxs.orig, slot[0], dx.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "dispatch_bwd_f16 C=%lld", (long long)C);
        tb_check(nm, &dx);

        /* experts: xs from the dispatch just made (f16), w [E,M,K] */
        tb_in w = tb_input(g, E * M * K, -1, 1), xsi = tb_input(g, R * K, -1, 1),
              dys = tb_input(g, R * M, -1, 1);
        tb_out ys = tb_output(R * M);
        moek_grouped_matmul_fwd_f16(c, xsi.h, w.h, er[0], ys.h, R, K, M, E);
        moek_grouped_matmul_fwd(c, xsi.wide, w.wide, er[0], ys.fw, R, K, M, E);
        moek_grouped_matmul_fwd(c, xsi.orig, w.orig, er[0], ys.fo, R, K, M, E);
        snprintf(nm, sizeof nm, "grouped_matmul_fwd_f16 C=%lld", (long long)C);
        tb_check(nm, &ys);
        tb_out gdx = tb_output(R * K), gdw = tb_output(E * M * K);
        moek_grouped_matmul_bwd_f16(c, dys.h, xsi.h, w.h, er[0], gdx.h, gdw.h, R, K, M, E);
        moek_grouped_matmul_bwd(c, dys.wide, xsi.wide, w.wide, er[0], gdx.fw, gdw.fw, R, K, M, E);
        moek_grouped_matmul_bwd(c, dys.orig, xsi.orig, w.orig, er[0], gdx.fo, gdw.fo, R, K, M, E);
        snprintf(nm, sizeof nm, "grouped_matmul_bwd_f16 C=%lld dxs", (long long)C);
        tb_check(nm, &gdx);
        snprintf(nm, sizeof nm, "grouped_matmul_bwd_f16 C=%lld dw", (long long)C);
        tb_check(nm, &gdw);

        /* combine over rows of width D */
        tb_in yc = tb_input(g, R * D, -1, 1), dout = tb_input(g, N * D, -1, 1);
        tb_out out = tb_output(N * D);
        moek_combine_fwd_f16(c, yc.h, slot[0], gates, out.h, N, D, k, R);
        moek_combine_fwd(c, yc.wide, slot[0], gates, out.fw, N, D, k, R);
        moek_combine_fwd(c, yc.orig, slot[0], gates, out.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "combine_fwd_f16 C=%lld", (long long)C);
        tb_check(nm, &out);
        tb_out cdys = tb_output(R * D);
        tb_f32 dg = tb_f32_out(N * k);
        moek_combine_bwd_f16(c, dout.h, yc.h, slot[0], gates, cdys.h, dg.fb, N, D, k, R);
        moek_combine_bwd(c, dout.wide, yc.wide, slot[0], gates, cdys.fw, dg.fw, N, D, k, R);
        moek_combine_bwd(c, dout.orig, yc.orig, slot[0], gates, cdys.fo, dg.fo, N, D, k, R);
        snprintf(nm, sizeof nm, "combine_bwd_f16 C=%lld dys", (long long)C);
        tb_check(nm, &cdys);
        snprintf(nm, sizeof nm, "combine_bwd_f16 C=%lld dgates", (long long)C);
        tb_check_f32(nm, &dg);
        tb_in_free(&x); tb_in_free(&dxs); tb_in_free(&w); tb_in_free(&xsi); tb_in_free(&dys);
        tb_in_free(&yc); tb_in_free(&dout);
    }
    free(gates);
    tb_status("dispatch/experts/combine f16", e);
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
    moek_f16 *p = malloc((size_t)n * 2), *want = malloc((size_t)n * 2);
    memcpy(master, p0, (size_t)n * 4); memcpy(pf, p0, (size_t)n * 4);
    memcpy(mb, m0, (size_t)n * 4); memcpy(mf, m0, (size_t)n * 4);
    memcpy(vb, v0, (size_t)n * 4); memcpy(vf, v0, (size_t)n * 4);
    moek_adamw_f16(c, p, master, gr, mb, vb, n, hyper, norm_sq, 0.1f);
    moek_adamw(c, pf, gr, mf, vf, n, hyper, norm_sq, 0.1f);
    moek_cast_f32_f16(c, pf, want, n);
    int moved = 0;
    for (int64_t i = 0; i < n; i++)
        moved |= pf[i] != p0[i];
    CHECK("adamw_f16: master, m, v == fp32 adamw bit for bit",
          moved && memcmp(master, pf, (size_t)n * 4) == 0 && memcmp(mb, mf, (size_t)n * 4) == 0 &&
              memcmp(vb, vf, (size_t)n * 4) == 0, "differ (moved %d)", moved);
    CHECK("adamw_f16: p == round(master)", memcmp(p, want, (size_t)n * 2) == 0, "differ");

    memcpy(master, p0, (size_t)n * 4); memcpy(pf, p0, (size_t)n * 4);
    memcpy(mb, m0, (size_t)n * 4); memcpy(mf, m0, (size_t)n * 4);
    moek_sgd_f16(c, p, master, gr, mb, n, hyper, norm_sq, 0.01f);
    moek_sgd(c, pf, gr, mf, n, hyper, norm_sq, 0.01f);
    moek_cast_f32_f16(c, pf, want, n);
    CHECK("sgd_f16: master, buf == fp32 sgd bit for bit; p == round(master)",
          memcmp(master, pf, (size_t)n * 4) == 0 && memcmp(mb, mf, (size_t)n * 4) == 0 &&
              memcmp(p, want, (size_t)n * 2) == 0, "differ");
    tb_status("optimizers f16", e);
    free(p0); free(gr); free(m0); free(v0); free(mb); free(vb); free(mf); free(vf); free(master);
    free(pf); free(p); free(want);
}

/* ---- workspace ------------------------------------------------------------- */
static void test_workspace(tk_rng *g)
{
    int64_t N = 5, K = 7, M = 3, need = MOEK_BF16_WORKSPACE_BYTES(N * K + M * K + N * M);
    tb_in x = tb_input(g, N * K, -1, 1), w = tb_input(g, M * K, -1, 1);
    moek_f16 y[15], ref[15];
    unsigned char *ws = aligned_alloc(64, 1 << 16);
    tb_env e;

    tb_env_init(&e, ws, need - 1);
    for (int i = 0; i < 15; i++)
        y[i] = 0x4499;
    moek_matmul_fwd_f16(&e.c, x.h, w.h, y, N, K, M);
    int untouched = 1;
    for (int i = 0; i < 15; i++)
        untouched &= y[i] == 0x4499;
    CHECK("f16 workspace one byte short: MOEK_E_SHAPE, output untouched",
          e.st == MOEK_E_SHAPE && untouched, "status %d, untouched %d", e.st, untouched);

    tb_env_init(&e, NULL, 0);
    moek_rmsnorm_fwd_f16(&e.c, x.h, w.h, y, (float *)ref, 1, 7, 1e-5f);
    CHECK("f16 no workspace: MOEK_E_SHAPE", e.st == MOEK_E_SHAPE, "status %d", e.st);

    tb_env_init(&e, ws, need - 1);
    e.st = MOEK_E_INDEX;
    moek_matmul_fwd_f16(&e.c, x.h, w.h, y, N, K, M);
    CHECK("f16 workspace short after an earlier error: the first error stays", e.st == MOEK_E_INDEX,
          "status %d", e.st);

    /* exactly enough, from a base that is not 64-byte aligned: works, and
     * writes nothing past the size given */
    tb_env_init(&e, ws + 4, need);
    memset(ws, 0xA5, 1 << 16);
    moek_matmul_fwd_f16(&e.c, x.h, w.h, y, N, K, M);
    float yf[15];
    moek_matmul_fwd(&e.c, x.wide, w.wide, yf, N, K, M);
    moek_cast_f32_f16(NULL, yf, ref, 15);
    int guard = 1;
    for (int64_t i = 4 + need; i < (1 << 16); i++)
        guard &= ws[i] == 0xA5;
    CHECK("f16 workspace exactly MOEK_BF16_WORKSPACE_BYTES at an unaligned base: result, no overrun",
          e.st == 0 && memcmp(y, ref, sizeof y) == 0 && guard && ws[0] == 0xA5,
          "status %d, guard %d", e.st, guard);

    /* the most pieces (attention backward: 8 tensors of odd length) */
    int64_t B = 1, T = 3, H = 1, Dh = 5, n = B * T * H * Dh;
    int64_t need8 = MOEK_BF16_WORKSPACE_BYTES(8 * n);
    tb_in q = tb_input(g, n, -1, 1);
    moek_f16 o[15], d[3][15];
    float lse[3];
    tb_env_init(&e, ws + 60, need8);
    memset(ws, 0xA5, 1 << 16);
    moek_attention_fwd_f16(&e.c, q.h, q.h, q.h, o, lse, B, T, H, Dh);
    moek_attention_bwd_f16(&e.c, q.h, q.h, q.h, q.h, o, lse, d[0], d[1], d[2], B, T, H, Dh);
    guard = 1;
    for (int64_t i = 60 + need8; i < (1 << 16); i++)
        guard &= ws[i] == 0xA5;
    CHECK("attention_bwd_f16 with 8 pieces fits MOEK_BF16_WORKSPACE_BYTES at a bad base",
          e.st == 0 && guard, "status %d, guard %d", e.st, guard);
    tb_env_init(&e, ws, need8 - 1);
    moek_attention_bwd_f16(&e.c, q.h, q.h, q.h, q.h, o, lse, d[0], d[1], d[2], B, T, H, Dh);
    CHECK("attention_bwd_f16 workspace one byte short: MOEK_E_SHAPE", e.st == MOEK_E_SHAPE,
          "status %d", e.st);

    /* a call whose f16 tensors are all empty needs no workspace */
    tb_env_init(&e, NULL, 0);
    moek_matmul_fwd_f16(&e.c, x.h, w.h, y, 0, K, 0);
    CHECK("all-empty matmul_fwd_f16 needs no workspace", e.st == 0, "status %d", e.st);
    free(ws);
    tb_in_free(&x); tb_in_free(&w); tb_in_free(&q);
}


/* ---- the issue 2 layer ops ------------------------------------------------- */
static void test_layer_ops(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t N = 13, D = 37, H = 4, Hkv = 2, Dh = 5;
    tb_in x = tb_input(g, N * D, -2, 2), w = tb_input(g, D, 0.5f, 1.5f), b = tb_input(g, D, -1, 1);
    tb_in dy = tb_input(g, N * D, -1, 1);
    tb_out y = tb_output(N * D);
    tb_f32 mean = tb_f32_out(N), rstd = tb_f32_out(N);
    float *m2 = tk_junk(N), *r2 = tk_junk(N);
    moek_layernorm_fwd_f16(c, x.h, w.h, b.h, y.h, mean.fb, rstd.fb, N, D, 1e-5f);
    moek_layernorm_fwd(c, x.wide, w.wide, b.wide, y.fw, mean.fw, rstd.fw, N, D, 1e-5f);
    moek_layernorm_fwd(c, x.orig, w.orig, b.orig, y.fo, mean.fo, rstd.fo, N, D, 1e-5f);
    memcpy(m2, mean.fw, (size_t)N * 4);
    memcpy(r2, rstd.fw, (size_t)N * 4);
    tb_check("layernorm_fwd_f16", &y);
    tb_check_f32("layernorm_fwd_f16 mean", &mean);
    tb_check_f32("layernorm_fwd_f16 rstd", &rstd);

    tb_out dx = tb_output(N * D), dw = tb_output(D), db = tb_output(D);
    moek_layernorm_bwd_f16(c, dy.h, x.h, w.h, m2, r2, dx.h, dw.h, db.h, N, D);
    moek_layernorm_bwd(c, dy.wide, x.wide, w.wide, m2, r2, dx.fw, dw.fw, db.fw, N, D);
    moek_layernorm_bwd(c, dy.orig, x.orig, w.orig, m2, r2, dx.fo, dw.fo, db.fo, N, D);
    tb_check("layernorm_bwd_f16 dx", &dx);
    tb_check("layernorm_bwd_f16 dw", &dw);
    tb_check("layernorm_bwd_f16 db", &db);

    y = tb_output(N * D);
    moek_silu_fwd_f16(c, x.h, y.h, N * D);
    moek_silu_fwd(c, x.wide, y.fw, N * D);
    moek_silu_fwd(c, x.orig, y.fo, N * D);
    tb_check("silu_fwd_f16", &y);
    dx = tb_output(N * D);
    moek_silu_bwd_f16(c, dy.h, x.h, dx.h, N * D);
    moek_silu_bwd(c, dy.wide, x.wide, dx.fw, N * D);
    moek_silu_bwd(c, dy.orig, x.orig, dx.fo, N * D);
    tb_check("silu_bwd_f16", &dx);

    y = tb_output(N * D);
    moek_bias_add_fwd_f16(c, x.h, b.h, y.h, N, D);
    moek_bias_add_fwd(c, x.wide, b.wide, y.fw, N, D);
    moek_bias_add_fwd(c, x.orig, b.orig, y.fo, N, D);
    tb_check("bias_add_fwd_f16", &y);
    dx = tb_output(N * D);
    db = tb_output(D);
    moek_bias_add_bwd_f16(c, dy.h, dx.h, db.h, N, D);
    moek_bias_add_bwd(c, dy.wide, dx.fw, db.fw, N, D);
    moek_bias_add_bwd(c, dy.orig, dx.fo, db.fo, N, D);
    tb_check("bias_add_bwd_f16 dx", &dx);
    tb_check("bias_add_bwd_f16 db", &db);

    tb_in kv = tb_input(g, N * Hkv * Dh, -1, 1), dq = tb_input(g, N * H * Dh, -1, 1);
    y = tb_output(N * H * Dh);
    moek_repeat_kv_fwd_f16(c, kv.h, y.h, N, Hkv, H, Dh);
    moek_repeat_kv_fwd(c, kv.wide, y.fw, N, Hkv, H, Dh);
    moek_repeat_kv_fwd(c, kv.orig, y.fo, N, Hkv, H, Dh);
    tb_check("repeat_kv_fwd_f16", &y);
    dx = tb_output(N * Hkv * Dh);
    moek_repeat_kv_bwd_f16(c, dq.h, dx.h, N, Hkv, H, Dh);
    moek_repeat_kv_bwd(c, dq.wide, dx.fw, N, Hkv, H, Dh);
    moek_repeat_kv_bwd(c, dq.orig, dx.fo, N, Hkv, H, Dh);
    tb_check("repeat_kv_bwd_f16", &dx);
    tb_status("layer ops f16", e);
    free(m2); free(r2);
    tb_in_free(&x); tb_in_free(&w); tb_in_free(&b); tb_in_free(&dy); tb_in_free(&kv); tb_in_free(&dq);
}

/* ---- loss scaling in the optimizers ---------------------------------------- */
/* One optimizer run on copies of (p, g, m, v): kind 0 fp32, 1 _bf16, 2 _f16;
 * adam or sgd.  The master (fp32) copy is what is compared. */
typedef struct {
    int64_t n;
    float *p, *m, *v;
    uint16_t *h;   /* the half working copy (_bf16/_f16) */
} to_state;

static to_state to_copy(int64_t n, const float *p, const float *m, const float *v)
{
    to_state s = {n, malloc((size_t)n * 4), malloc((size_t)n * 4), malloc((size_t)n * 4),
                  malloc((size_t)n * 2)};
    memcpy(s.p, p, (size_t)n * 4);
    memcpy(s.m, m, (size_t)n * 4);
    memcpy(s.v, v, (size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        s.h[i] = 0x1234;
    return s;
}

static void to_free(to_state *s) { free(s->p); free(s->m); free(s->v); free(s->h); }

static void to_run(const moek_ctx *c, int kind, int adam, to_state *s, const float *g,
                   const float *hyper, const float *nsq)
{
    if (adam && kind == 0)
        moek_adamw(c, s->p, g, s->m, s->v, s->n, hyper, nsq, 0.1f);
    else if (adam && kind == 1)
        moek_adamw_bf16(c, s->h, s->p, g, s->m, s->v, s->n, hyper, nsq, 0.1f);
    else if (adam)
        moek_adamw_f16(c, s->h, s->p, g, s->m, s->v, s->n, hyper, nsq, 0.1f);
    else if (kind == 0)
        moek_sgd(c, s->p, g, s->m, s->n, hyper, nsq, 0.01f);
    else if (kind == 1)
        moek_sgd_bf16(c, s->h, s->p, g, s->m, s->n, hyper, nsq, 0.01f);
    else
        moek_sgd_f16(c, s->h, s->p, g, s->m, s->n, hyper, nsq, 0.01f);
}

static void test_loss_scale(tb_env *e, tk_rng *g)
{
    moek_ctx *c = &e->c;
    int64_t n = 300;
    float hyper[MOEK_HYPER_COUNT] = {0};
    hyper[MOEK_HYPER_LR] = 1e-2f;
    hyper[MOEK_HYPER_BETA1] = 0.9f;
    hyper[MOEK_HYPER_BETA2] = 0.95f;
    hyper[MOEK_HYPER_EPS] = 1e-8f;
    hyper[MOEK_HYPER_BC1] = 1.0f - 0.9f * 0.9f;
    hyper[MOEK_HYPER_BC2] = 1.0f - 0.95f * 0.95f;
    hyper[MOEK_HYPER_MOMENTUM] = 0.9f;
    float *p0 = tk_rand(g, n, -1, 1), *gr = tk_rand(g, n, -1, 1);
    float *m0 = tk_rand(g, n, -0.1f, 0.1f), *v0 = tk_rand(g, n, 0.0f, 0.01f);
    float *gs = malloc((size_t)n * 4);
    const float S = 32768.0f;
    double ss = 0;
    for (int64_t i = 0; i < n; i++) {
        gs[i] = gr[i] * S;   /* exact: S is a power of two */
        ss += (double)gr[i] * gr[i];
    }
    static const char *const kname[3] = {"fp32", "bf16", "f16"};
    for (int clip = 0; clip < 2; clip++) {
        /* clip on: max_norm below the norm, so the factor matters */
        hyper[MOEK_HYPER_MAX_NORM] = clip ? 0.25f * (float)sqrt(ss) : 0.0f;
        float nsq[1] = {(float)ss}, nsq_s[1] = {(float)ss * S * S};
        for (int adam = 0; adam < 2; adam++)
            for (int k = 0; k < 3; k++) {
                to_state a = to_copy(n, p0, m0, v0), b = to_copy(n, p0, m0, v0);
                hyper[MOEK_HYPER_LOSS_SCALE] = 0.0f;
                to_run(c, k, adam, &a, gr, hyper, nsq);
                hyper[MOEK_HYPER_LOSS_SCALE] = S;
                to_run(c, k, adam, &b, gs, hyper, nsq_s);
                int moved = memcmp(a.p, p0, (size_t)n * 4) != 0;
                char label[160];
                snprintf(label, sizeof label, "%s_%s with loss scale 2^15%s == unscaled on g/S, bit for bit",
                         adam ? "adamw" : "sgd", kname[k], clip ? " and clipping" : "");
                CHECK(label, moved && memcmp(a.p, b.p, (size_t)n * 4) == 0 &&
                                 memcmp(a.m, b.m, (size_t)n * 4) == 0 &&
                                 (!adam || memcmp(a.v, b.v, (size_t)n * 4) == 0) &&
                                 (k == 0 || memcmp(a.h, b.h, (size_t)n * 2) == 0),
                      "differ (moved %d)", moved);
                to_free(&a);
                to_free(&b);
            }
    }
    /* a non-finite norm: nothing moves, in every variant */
    hyper[MOEK_HYPER_MAX_NORM] = 1.0f;
    hyper[MOEK_HYPER_LOSS_SCALE] = S;
    float bad[3] = {INFINITY, NAN, -INFINITY};
    for (int adam = 0; adam < 2; adam++)
        for (int k = 0; k < 3; k++) {
            int same = 1;
            for (int b = 0; b < 3; b++) {
                to_state s = to_copy(n, p0, m0, v0);
                if (k == 1)
                    moek_cast_f32_bf16(c, p0, s.h, n);
                else if (k == 2)
                    moek_cast_f32_f16(c, p0, s.h, n);
                uint16_t *h0 = malloc((size_t)n * 2);
                memcpy(h0, s.h, (size_t)n * 2);
                float nsq[1] = {bad[b]};
                to_run(c, k, adam, &s, gs, hyper, nsq);
                same &= memcmp(s.p, p0, (size_t)n * 4) == 0 && memcmp(s.m, m0, (size_t)n * 4) == 0 &&
                        memcmp(s.v, v0, (size_t)n * 4) == 0 && memcmp(s.h, h0, (size_t)n * 2) == 0;
                free(h0);
                to_free(&s);
            }
            char label[160];
            snprintf(label, sizeof label, "%s_%s with a non-finite norm (Inf, NaN): params and moments "
                     "unchanged", adam ? "adamw" : "sgd", kname[k]);
            CHECK(label, same, "something moved");
        }
    /* S = 0 (fp32/bf16 plans, zeroed hyper in other tests) is the old update */
    hyper[MOEK_HYPER_LOSS_SCALE] = 0.0f;
    hyper[MOEK_HYPER_MAX_NORM] = 0.0f;
    to_state a = to_copy(n, p0, m0, v0);
    moek_sgd(c, a.p, gr, a.m, n, hyper, NULL, 0.0f);
    int ok = 1;
    for (int64_t i = 0; i < n; i++)
        ok &= a.p[i] == p0[i] - 1e-2f * (0.9f * m0[i] + gr[i]);
    CHECK("sgd with S = 0 and no norm: p -= lr (mom buf + g), as before", ok, "differs");
    to_free(&a);
    tb_status("optimizers with loss scaling", e);
    free(p0); free(gr); free(m0); free(v0); free(gs);
}

int main(void)
{
    tk_rng g = {0x5EEDF16ull};
    void *ws = aligned_alloc(64, TB_WS_BYTES);
    tb_env e;
    tb_env_init(&e, ws, TB_WS_BYTES);
    test_round_patterns();
    test_round_oracle();
    test_elementwise(&e, &g);
    test_embedding(&e, &g);
    test_dense(&e, &g);
    test_attention(&e, &g);
    test_losses(&e, &g);
    test_moe(&e, &g);
    test_optim(&e, &g);
    test_workspace(&g);
    test_layer_ops(&e, &g);
    test_loss_scale(&e, &g);
    free(ws);
    CHECK_DONE();
}
