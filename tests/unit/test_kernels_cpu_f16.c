/* test_kernels_cpu_f16.c - the CPU fp16 variants (kernels/cpu/f16.c) and
 * loss scaling in the optimizers (kernels/cpu/optim.c):
 *  - fp32 -> half rounding against hand-computed bit patterns (ties,
 *    overflow to Inf from 65520 on, subnormals, NaN), against an independent
 *    nearest-value oracle on random bits, and widen/round on all 65536 halves;
 *  - every variant bit for bit against round(fp32 kernel on the widened
 *    inputs) and within 1e-2 of fp32 on the unrounded inputs (the checks
 *    of half_kernel_checks.h, shared with the bf16 test), the issue 2 layer
 *    ops too;
 *  - adamw/sgd (fp32, _bf16, _f16) with a loss scale S equal the unscaled
 *    update on g / S, and a non-finite norm leaves params and moments alone. */
#include <stdint.h>

#define TH_T moek_f16
#define TH_FN(name) name##_f16
#define TH_CAST_TO_F32 moek_cast_f16_f32
#define TH_NAME "f16"
#define TH_WS_PREFIX "f16 "
#include "half_kernel_checks.h"

/* the value of a half, computed from its fields in double (the oracle's own
 * decoding, independent of moek_f16_to_f32) */
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
