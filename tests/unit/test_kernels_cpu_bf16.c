/* test_kernels_cpu_bf16.c - the CPU bf16 variants (kernels/cpu/bf16.c):
 * RNE rounding against hand-computed bit patterns and an independent
 * nearest-value oracle; every variant bit for bit against round(fp32 kernel
 * on the widened inputs), and within the project's bf16 tolerance (1e-2,
 * relative to the tensor's largest magnitude) of the fp32 kernel on the
 * unrounded inputs; the workspace-too-small path; the optimizers' master
 * copies.  The checks of every variant are half_kernel_checks.h, shared with
 * the f16 test. */
#include <stdint.h>

#define TH_T moek_bf16
#define TH_FN(name) name##_bf16
#define TH_CAST_TO_F32 moek_cast_bf16_f32
#define TH_NAME "bf16"
#define TH_WS_PREFIX ""
#include "half_kernel_checks.h"

/* ---- rounding -------------------------------------------------------------- */
static void test_round_patterns(void)
{
    static const struct { uint32_t in; uint16_t want; const char *what; } cases[] = {
        {0x3F800000u, 0x3F80, "1.0 exact"},
        {0x3F808000u, 0x3F80, "tie, even kept part: down"},
        {0x3F818000u, 0x3F82, "tie, odd kept part: up"},
        {0x3F808001u, 0x3F81, "just above a tie: up"},
        {0x3F807FFFu, 0x3F80, "just below a tie: down"},
        {0xBF808000u, 0xBF80, "negative tie, even: towards zero"},
        {0xBF818000u, 0xBF82, "negative tie, odd: away from zero"},
        {0x3FFF8000u, 0x4000, "tie carrying into the exponent"},
        {0x3F7FFFFFu, 0x3F80, "just below 1.0 carries to 1.0"},
        {0x7F7F7FFFu, 0x7F7F, "stays the largest finite bf16"},
        {0x7F7F8000u, 0x7F80, "tie above the largest finite: Inf"},
        {0x7F7FFFFFu, 0x7F80, "largest finite fp32: Inf"},
        {0xFF7FFFFFu, 0xFF80, "most negative finite fp32: -Inf"},
        {0x7F800000u, 0x7F80, "+Inf"},
        {0xFF800000u, 0xFF80, "-Inf"},
        {0x7FC00000u, 0x7FC0, "quiet NaN"},
        {0x7FFFFFFFu, 0x7FFF, "NaN with all ones: no carry"},
        {0x7F800001u, 0x7FC0, "signalling NaN, low payload: quieted, not Inf"},
        {0xFF80FFFFu, 0xFFC0, "negative NaN whose rounding would carry"},
        {0x7FBF8000u, 0x7FFF, "signalling NaN with a kept payload"},
        {0x00000000u, 0x0000, "+0"},
        {0x80000000u, 0x8000, "-0"},
        {0x80008000u, 0x8000, "negative subnormal tie to -0"},
        {0x00008000u, 0x0000, "subnormal tie, even: 0"},
        {0x00018000u, 0x0002, "subnormal tie, odd: up"},
        {0x0000C000u, 0x0001, "subnormal above a tie"},
        {0x00010001u, 0x0001, "smallest bf16 subnormal, just above"},
        {0x007FFFFFu, 0x0080, "largest subnormal carries to the smallest normal"},
        {0x807FFFFFu, 0x8080, "negative largest subnormal"},
    };
    int n = (int)(sizeof cases / sizeof cases[0]);
    float in[64];
    moek_bf16 out[64];
    for (int i = 0; i < n; i++)
        in[i] = tb_float(cases[i].in);
    tb_env e;
    tb_env_init(&e, NULL, 0);
    moek_cast_f32_bf16(&e.c, in, out, n);
    int bad = 0;
    for (int i = 0; i < n; i++) {
        if (out[i] != cases[i].want) {
            printf("  0x%08X -> 0x%04X, want 0x%04X (%s)\n", (unsigned)cases[i].in,
                   (unsigned)out[i], (unsigned)cases[i].want, cases[i].what);
            bad++;
        }
    }
    CHECK("bf16 round: hand-computed patterns (ties both ways, carries, overflow, NaN, -0, subnormals)",
          bad == 0, "%d of %d patterns wrong", bad, n);

    /* widening is exact: the bits land in the top half */
    moek_bf16 h[4] = {0x3F80, 0x8001, 0x7FC1, 0xFF80};
    float w[4];
    moek_cast_bf16_f32(&e.c, h, w, 4);
    CHECK("bf16 widen: exact bit placement",
          w[0] == 1.0f && tb_bits(w[1]) == 0x80010000u && isnan(w[2]) &&
              tb_bits(w[2]) == 0x7FC10000u && isinf(w[3]) && w[3] < 0,
          "got %08X %08X %08X %08X", (unsigned)tb_bits(w[0]), (unsigned)tb_bits(w[1]),
          (unsigned)tb_bits(w[2]), (unsigned)tb_bits(w[3]));
    CHECK("bf16 casts: no error status", e.st == 0, "status %d", e.st);
}

/* Independent oracle: the nearer of the two bf16 neighbours (by value, in
 * double), the even one on a tie; against random bit patterns, on the
 * threaded path (n above the one-thread cut-off). */
static void test_round_oracle(void)
{
    int64_t n = 200000;
    float *x = malloc((size_t)n * sizeof *x), *back = malloc((size_t)n * sizeof *back);
    moek_bf16 *h = malloc((size_t)n * sizeof *h);
    tk_rng g = {0xB16B00B5ull};
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)(tk_next(&g) >> 32);
        if (i % 4 == 1)
            u = (u & 0xFFFF0000u) | 0x8000u; /* force exact ties */
        x[i] = tb_float(u);
    }
    tb_env e;
    tb_env_init(&e, NULL, 0);
    e.c.num_threads = 2;
    moek_cast_f32_bf16(&e.c, x, h, n);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = tb_bits(x[i]);
        uint16_t want;
        if (isnan(x[i])) {
            /* only NaN-ness is required */
            if (!((h[i] & 0x7F80) == 0x7F80 && (h[i] & 0x7F)))
                bad++, first = first < 0 ? i : first;
            continue;
        }
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
        double dl = fabs((double)x[i] - (double)tb_float((uint32_t)lo << 16));
        /* lo + 1 past the largest finite is Inf: measure it as 2^128 */
        double vh = (hi & 0x7FFF) == 0x7F80 ? ldexp(1.0, 128) : fabs((double)tb_float((uint32_t)hi << 16));
        double dh = fabs(fabs((double)x[i]) - vh);
        if (isinf(x[i]))
            want = lo;
        else
            want = dl < dh ? lo : dh < dl ? hi : ((lo & 1) ? hi : lo);
        if (h[i] != want)
            bad++, first = first < 0 ? i : first;
    }
    CHECK("bf16 round: 200000 random fp32 (a quarter exact ties), threaded, vs nearest-even oracle",
          bad == 0, "%lld wrong, first 0x%08X -> 0x%04X", (long long)bad,
          first >= 0 ? (unsigned)tb_bits(x[first]) : 0u, first >= 0 ? (unsigned)h[first] : 0u);

    /* every non-NaN bf16 survives widen + round unchanged */
    moek_bf16 *all = malloc(65536 * sizeof *all), *again = malloc(65536 * sizeof *again);
    for (int i = 0; i < 65536; i++)
        all[i] = (moek_bf16)i;
    moek_cast_bf16_f32(&e.c, all, back, 65536);
    moek_cast_f32_bf16(&e.c, back, again, 65536);
    int64_t diff = 0;
    for (int i = 0; i < 65536; i++) {
        int nan = (i & 0x7F80) == 0x7F80 && (i & 0x7F);
        if (nan ? !(again[i] & 0x40) : again[i] != all[i])
            diff++;
    }
    CHECK("bf16 round(widen(h)) == h for all 65536 patterns (NaN: quiet)", diff == 0,
          "%lld differ", (long long)diff);
    free(x); free(back); free(h); free(all); free(again);
}
int main(void)
{
    tk_rng g = {0x5EED0B16ull};
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
    free(ws);
    CHECK_DONE();
}
