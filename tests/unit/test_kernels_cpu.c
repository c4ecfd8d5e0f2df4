/* test_kernels_cpu.c - CPU kernels' forward results against straightforward
 * double-precision loops, routing edge cases, optimizer steps against
 * torch.optim values, bad data, device services, and thread-count
 * independence.  (Backward kernels: test_kernels_cpu_grad.c.) */
#include <stdint.h>

#include "test_kernels_cpu.h"

static moek_ctx tk_ctx(int *status, int threads)
{
    moek_ctx c;
    memset(&c, 0, sizeof c);
    c.status = status;
    c.num_threads = threads;
    return c;
}

static double *dzeros(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(double)); }

static void test_matmul(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t N = 9, K = 13, M = 7;
    float *x = tk_rand(g, N * K, -1, 1), *w = tk_rand(g, M * K, -1, 1), *y = tk_junk(N * M);
    double *ref = dzeros(N * M);
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++)
                ref[n * M + m] += (double)x[n * K + k] * w[m * K + k];
    moek_matmul_fwd(&c, x, w, y, N, K, M);
    double d = tk_maxdiff(y, ref, N * M);
    CHECK("matmul fwd vs double loops", d < 1e-5, "max diff %g", d);
    /* empty batch: dw must still be overwritten (with zeros) */
    float *dw = tk_junk(M * K);
    moek_matmul_bwd(&c, y, x, w, NULL, dw, 0, K, M);
    int zero = 1;
    for (int64_t i = 0; i < M * K; i++)
        zero &= dw[i] == 0.0f;
    CHECK("matmul bwd with N = 0 zeroes dw", zero, "dw not zero");
    free(x); free(w); free(y); free(ref); free(dw);
}

static void test_rmsnorm(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t N = 6, D = 19;
    float eps = 1e-5f;
    float *x = tk_rand(g, N * D, -2, 2), *w = tk_rand(g, D, 0.5f, 1.5f), *y = tk_junk(N * D),
          *rstd = tk_junk(N);
    double *ref = dzeros(N * D), *rref = dzeros(N);
    for (int64_t n = 0; n < N; n++) {
        double ss = 0;
        for (int64_t d = 0; d < D; d++)
            ss += (double)x[n * D + d] * x[n * D + d];
        rref[n] = 1.0 / sqrt(ss / D + eps);
        for (int64_t d = 0; d < D; d++)
            ref[n * D + d] = x[n * D + d] * rref[n] * w[d];
    }
    moek_rmsnorm_fwd(&c, x, w, y, rstd, N, D, eps);
    double d1 = tk_maxdiff(y, ref, N * D), d2 = tk_maxdiff(rstd, rref, N);
    CHECK("rmsnorm fwd vs double loops", d1 < 1e-5 && d2 < 1e-5, "y diff %g rstd diff %g", d1, d2);
    free(x); free(w); free(y); free(rstd); free(ref); free(rref);
}

static void test_rope(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t B = 2, T = 5, H = 3, Dh = 6, W = H * Dh, n = B * T * W;
    float theta = 10000.0f;
    float *x = tk_rand(g, n, -1, 1), *y = tk_junk(n), *back = tk_junk(n);
    double *ref = dzeros(n);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < Dh / 2; i++) {
                    double ang = t * pow(theta, -2.0 * i / Dh);
                    int64_t o = (b * T + t) * W + h * Dh + 2 * i;
                    ref[o] = x[o] * cos(ang) - x[o + 1] * sin(ang);
                    ref[o + 1] = x[o] * sin(ang) + x[o + 1] * cos(ang);
                }
    moek_rope_fwd(&c, x, y, B, T, H, Dh, theta);
    double d = tk_maxdiff(y, ref, n);
    CHECK("rope fwd vs double loops (angle t * theta^(-2i/Dh))", d < 1e-5, "max diff %g", d);
    /* the backward is the inverse rotation: bwd(fwd(x)) = x */
    moek_rope_bwd(&c, y, back, B, T, H, Dh, theta);
    for (int64_t i = 0; i < n; i++)
        ref[i] = x[i];
    d = tk_maxdiff(back, ref, n);
    CHECK("rope bwd inverts fwd", d < 1e-5, "max diff %g", d);
    /* position 0 is the identity, and rows of the second sequence restart at t = 0 */
    int same = memcmp(y, x, (size_t)W * sizeof *x) == 0 && memcmp(y + T * W, x + T * W, (size_t)W * sizeof *x) == 0;
    CHECK("rope position restarts per sequence", same, "t = 0 rows changed");
    free(x); free(y); free(back); free(ref);
}

/* naive softmax(Q K^T / sqrt(Dh) + causal mask) V with a full T x T matrix */
static void test_attention(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t B = 2, T = 9, H = 3, Dh = 5, W = H * Dh, n = B * T * W;
    float *q = tk_rand(g, n, -2, 2), *k = tk_rand(g, n, -2, 2), *v = tk_rand(g, n, -1, 1);
    float *o = tk_junk(n), *lse = tk_junk(B * H * T);
    double *ref = dzeros(n), *lref = dzeros(B * H * T), S[9][9];
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < T; i++)
                for (int64_t j = 0; j < T; j++) {
                    double s = 0;
                    for (int64_t d = 0; d < Dh; d++)
                        s += (double)q[(b * T + i) * W + h * Dh + d] * k[(b * T + j) * W + h * Dh + d];
                    S[i][j] = j <= i ? s / sqrt((double)Dh) : -INFINITY;
                }
            for (int64_t i = 0; i < T; i++) {
                double m = -INFINITY, sum = 0;
                for (int64_t j = 0; j < T; j++)
                    m = S[i][j] > m ? S[i][j] : m;
                for (int64_t j = 0; j < T; j++)
                    sum += exp(S[i][j] - m);
                lref[(b * H + h) * T + i] = m + log(sum);
                for (int64_t j = 0; j < T; j++) {
                    double p = exp(S[i][j] - m) / sum;
                    for (int64_t d = 0; d < Dh; d++)
                        ref[(b * T + i) * W + h * Dh + d] += p * v[(b * T + j) * W + h * Dh + d];
                }
            }
        }
    moek_attention_fwd(&c, q, k, v, o, lse, B, T, H, Dh);
    double d1 = tk_maxdiff(o, ref, n), d2 = tk_maxdiff(lse, lref, B * H * T);
    CHECK("attention fwd vs naive causal softmax(QK^T/sqrt(Dh))V", d1 < 1e-5, "max diff %g", d1);
    CHECK("attention lse vs naive log-sum-exp", d2 < 1e-5, "max diff %g", d2);
    /* row 0 attends only to itself: o = v */
    double d3 = 0;
    for (int64_t d = 0; d < W; d++)
        d3 = fmax(d3, fabs(o[d] - v[d]));
    CHECK("attention first position copies v", d3 < 1e-6, "max diff %g", d3);
    free(q); free(k); free(v); free(o); free(lse); free(ref); free(lref);
}

static void test_elementwise(void)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    float x[5] = {-3.0f, -0.5f, 0.0f, 1.0f, 2.5f}, up[5] = {1.0f, 2.0f, -1.0f, 0.5f, -2.0f};
    float y[5], dst[5] = {1, 1, 1, 1, 1};
    double err = 0;
    moek_gelu_fwd(&c, x, y, 5);
    for (int i = 0; i < 5; i++) {
        double v = x[i];
        double r = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
        err = fmax(err, fabs(y[i] - r));
    }
    /* gelu_tanh(1) = 0.841191990607... (PyTorch gelu(approximate="tanh")) */
    CHECK("gelu fwd (tanh approximation)", err < 1e-6 && check_close(y[3], 0.8411919906, 1e-6, 0),
          "max diff %g, gelu(1) = %.9f", err, y[3]);
    moek_swiglu_fwd(&c, x, up, y, 5);
    err = 0;
    for (int i = 0; i < 5; i++)
        err = fmax(err, fabs(y[i] - x[i] / (1 + exp(-(double)x[i])) * up[i]));
    CHECK("swiglu fwd = silu(gate) * up", err < 1e-6, "max diff %g", err);
    moek_add_fwd(&c, x, up, y, 5);
    moek_accumulate(&c, dst, y, 5);
    moek_scale_fwd(&c, dst, y, 5, 2.0f);
    err = 0;
    for (int i = 0; i < 5; i++)
        err = fmax(err, fabs(y[i] - 2.0 * (1.0 + x[i] + up[i])));
    CHECK("add, accumulate, scale", err < 1e-6, "max diff %g", err);
    moek_fill(&c, y, 5, -7.0f);
    moek_copy(&c, y, dst, 5);
    CHECK("fill and copy", dst[0] == -7.0f && dst[4] == -7.0f, "got %g %g", dst[0], dst[4]);
}

static void test_embedding_and_bad_ids(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t V = 5, D = 3;
    int32_t ids[4] = {4, 0, 4, 2};
    float *table = tk_rand(g, V * D, -1, 1), out[12];
    moek_embedding_fwd(&c, ids, table, out, 4, V, D);
    CHECK("embedding fwd gathers rows",
          st == 0 && out[0] == table[12] && out[5] == table[2] && out[9] == table[6],
          "status %d", st);
    int32_t bad[4] = {1, 5, 0, -1};
    moek_embedding_fwd(&c, bad, table, out, 4, V, D);
    CHECK("embedding id out of range sets MOEK_E_INDEX", st == MOEK_E_INDEX && out[3] == 0.0f,
          "status %d", st);
    /* the first error wins: a later, different error does not overwrite it */
    st = MOEK_E_SHAPE;
    moek_embedding_fwd(&c, bad, table, out, 4, V, D);
    CHECK("status keeps the first error", st == MOEK_E_SHAPE, "status %d", st);
    /* a NULL status pointer is allowed */
    moek_ctx c2 = tk_ctx(NULL, 0);
    moek_embedding_fwd(&c2, bad, table, out, 4, V, D);
    CHECK("bad id with no status pointer does not crash", out[3] == 0.0f, "row not zeroed");
    free(table);
}

static void test_cross_entropy(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t N = 7, V = 13;
    int32_t t[7] = {0, 12, 3, 3, 7, 1, 9};
    float *lg = tk_rand(g, N * V, -4, 4), loss = -1, *lse = tk_junk(N);
    double ref = 0;
    for (int64_t n = 0; n < N; n++) {
        double m = -INFINITY, s = 0;
        for (int64_t v = 0; v < V; v++)
            m = fmax(m, lg[n * V + v]);
        for (int64_t v = 0; v < V; v++)
            s += exp(lg[n * V + v] - m);
        ref += m + log(s) - lg[n * V + t[n]];
    }
    ref /= N;
    moek_cross_entropy_fwd(&c, lg, t, &loss, lse, N, V);
    CHECK("cross_entropy fwd vs double loops", check_close(loss, ref, 1e-6, 1e-6) && st == 0,
          "loss %.9g ref %.9g", loss, ref);
    /* uniform logits: loss = log V exactly */
    float flat[26] = {0};
    int32_t t2[2] = {3, 12};
    moek_cross_entropy_fwd(&c, flat, t2, &loss, lse, 2, V);
    CHECK("cross_entropy of uniform logits = log V", check_close(loss, log(13.0), 1e-6, 0),
          "loss %.9g", loss);
    /* large logits stay finite (max-shifted) */
    float big[2] = {1000.0f, -1000.0f};
    int32_t t3[1] = {1};
    moek_cross_entropy_fwd(&c, big, t3, &loss, lse, 1, 2);
    CHECK("cross_entropy stable for large logits", check_close(loss, 2000.0, 1e-3, 0), "loss %g", loss);
    int32_t bad[7] = {0, 13, 3, 3, 7, 1, 9};
    moek_cross_entropy_fwd(&c, lg, bad, &loss, lse, N, V);
    CHECK("cross_entropy target = V sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    st = 0;
    float dl = 1.0f, *d = tk_junk(N * V);
    bad[1] = -1;
    moek_cross_entropy_bwd(&c, &dl, lg, bad, lse, d, N, V);
    CHECK("cross_entropy bwd target = -1 sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    free(lg); free(lse); free(d);
}

static void test_router(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    /* ties break towards the lower index; descending order */
    float s[2 * 5] = {0.5f, 0.2f, 0.5f, 0.1f, 0.5f, /* */ 0.1f, 0.3f, 0.3f, 0.9f, NAN};
    int32_t idx[6];
    float gt[6];
    moek_topk_fwd(&c, s, idx, gt, 2, 5, 3, 0);
    CHECK("topk ties -> lower index, descending",
          idx[0] == 0 && idx[1] == 2 && idx[2] == 4 && idx[3] == 3 && idx[4] == 1 && idx[5] == 2,
          "got %d %d %d | %d %d %d", idx[0], idx[1], idx[2], idx[3], idx[4], idx[5]);
    CHECK("topk gates are the scores without renorm", gt[0] == 0.5f && gt[3] == 0.9f && gt[5] == 0.3f,
          "gates %g %g %g", gt[0], gt[3], gt[5]);
    moek_topk_fwd(&c, s, idx, gt, 2, 5, 3, 1);
    CHECK("topk renorm divides by the sum of the k", check_close(gt[3], 0.9 / 1.5, 1e-6, 0) &&
          check_close(gt[0] + gt[1] + gt[2], 1.0, 1e-6, 0), "gates %g %g", gt[3], gt[0] + gt[1] + gt[2]);
    int32_t all[5];
    float ga[5];
    moek_topk_fwd(&c, s + 5, all, ga, 1, 5, 5, 0);
    CHECK("topk k = E orders every expert, NaN last",
          all[0] == 3 && all[1] == 1 && all[2] == 2 && all[3] == 0 && all[4] == 4,
          "got %d %d %d %d %d", all[0], all[1], all[2], all[3], all[4]);
    CHECK("topk status clean", st == 0, "status %d", st);
    moek_topk_fwd(&c, s, idx, gt, 1, 5, 6, 0);
    CHECK("topk k > E sets MOEK_E_SHAPE", st == MOEK_E_SHAPE, "status %d", st);
    st = 0;

    /* softmax rows sum to 1 and match exp(x)/sum */
    int64_t N = 4, E = 7;
    float *lg = tk_rand(g, N * E, -3, 3), *p = tk_junk(N * E), z = -1;
    double *ref = dzeros(N * E), zref = 0;
    for (int64_t n = 0; n < N; n++) {
        double sum = 0;
        for (int64_t e = 0; e < E; e++)
            sum += exp(lg[n * E + e]);
        for (int64_t e = 0; e < E; e++)
            ref[n * E + e] = exp(lg[n * E + e]) / sum;
        zref += log(sum) * log(sum);
    }
    zref /= N;
    moek_softmax_fwd(&c, lg, p, N, E);
    double d = tk_maxdiff(p, ref, N * E);
    CHECK("softmax fwd vs double loops", d < 1e-6, "max diff %g", d);
    moek_zloss_fwd(&c, lg, &z, N, E);
    CHECK("zloss fwd = mean logsumexp^2", check_close(z, zref, 1e-6, 1e-6), "z %.9g ref %.9g", z, zref);

    /* balance loss closed form on hand-built routings */
    float uni[4 * 4];
    for (int i = 0; i < 16; i++)
        uni[i] = 0.25f;
    int32_t bal[4] = {0, 1, 2, 3}, one[4] = {2, 2, 2, 2};
    float bl = -1;
    moek_balance_loss_fwd(&c, uni, bal, &bl, 4, 4, 1);
    CHECK("balance loss = 1 at perfect balance (top-1, uniform probs)", check_close(bl, 1.0, 1e-6, 0),
          "loss %.9g", bl);
    /* every token to expert 2, whose mean probability is 0.7: E * 1 * 0.7 */
    float skew[4 * 4] = {0.1f, 0.1f, 0.7f, 0.1f, 0.0f, 0.2f, 0.8f, 0.0f,
                         0.2f, 0.1f, 0.6f, 0.1f, 0.1f, 0.1f, 0.7f, 0.1f};
    moek_balance_loss_fwd(&c, skew, one, &bl, 4, 4, 1);
    CHECK("balance loss all tokens to one expert = E * P_e", check_close(bl, 4 * 0.7, 1e-6, 0),
          "loss %.9g", bl);
    /* top-2: f = (3/8, 1/8, 3/8, 1/8) */
    int32_t two[8] = {0, 2, 0, 1, 2, 3, 2, 0};
    double P[4] = {0.1, 0.125, 0.7, 0.075}, f[4] = {3 / 8.0, 1 / 8.0, 3 / 8.0, 1 / 8.0}, cf = 0;
    for (int i = 0; i < 4; i++)
        cf += 4 * f[i] * P[i];
    moek_balance_loss_fwd(&c, skew, two, &bl, 4, 4, 2);
    CHECK("balance loss top-2 = E sum f_i P_i", check_close(bl, cf, 1e-6, 1e-6), "loss %.9g want %.9g", bl, cf);
    float dprobs[16], dl = 2.0f;
    moek_balance_loss_bwd(&c, &dl, skew, two, dprobs, 4, 4, 2);
    CHECK("balance loss bwd = dloss E f_i / N", check_close(dprobs[4 + 2], 2.0 * 4 * (3 / 8.0) / 4, 1e-6, 0) &&
          check_close(dprobs[15], 2.0 * 4 * (1 / 8.0) / 4, 1e-6, 0), "got %g %g", dprobs[6], dprobs[15]);
    int32_t badi[4] = {0, 1, 4, 3};
    moek_balance_loss_fwd(&c, uni, badi, &bl, 4, 4, 1);
    CHECK("balance loss expert id = E sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    free(lg); free(p); free(ref);
}

/* dispatch on a hand-built routing, checked slot by slot */
static void test_dispatch(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t N = 5, D = 3, E = 4, k = 2, C = 2;
    /* token:  0     1     2     3     4   ; expert 3 gets nothing, expert 1 overflows */
    int32_t idx[10] = {1, 0, 1, 2, 0, 1, 1, 0, 1, 2};
    float *x = tk_rand(g, N * D, -1, 1), *xs = tk_junk(E * C * D);
    int32_t slot[10], er[8];
    moek_dispatch_fwd(&c, x, idx, xs, slot, er, N, D, E, k, C);
    /* expert 1 slots in token order: (0,0) (1,0) (2,1) (3,0) (4,0) -> first two kept */
    int32_t want_slot[10] = {2, 0, 3, 4, 1, -1, -1, -1, -1, 5};
    int32_t want_er[8] = {0, 2, 2, 2, 4, 2, 6, 0};
    CHECK("dispatch capacity: slot rows in token order, overflow dropped",
          memcmp(slot, want_slot, sizeof slot) == 0, "slot_row %d %d %d %d %d %d %d %d %d %d",
          slot[0], slot[1], slot[2], slot[3], slot[4], slot[5], slot[6], slot[7], slot[8], slot[9]);
    CHECK("dispatch capacity: expert_rows (e*C, min(count, C)), empty expert",
          memcmp(er, want_er, sizeof er) == 0, "expert_rows %d %d %d %d %d %d %d %d",
          er[0], er[1], er[2], er[3], er[4], er[5], er[6], er[7]);
    int ok = 1;
    for (int s = 0; s < 10; s++)
        if (slot[s] >= 0)
            ok &= memcmp(xs + slot[s] * D, x + (s / k) * D, (size_t)D * sizeof *x) == 0;
    for (int64_t i = 6 * D; i < 8 * D; i++)
        ok &= xs[i] == 0.0f; /* expert 3's unused rows */
    CHECK("dispatch capacity: rows copied, unused rows zero", ok, "xs wrong");

    /* combine of the dispatched rows, gates 1: dropped slots contribute nothing */
    float gates[10], out[15];
    for (int i = 0; i < 10; i++)
        gates[i] = 1.0f;
    moek_combine_fwd(&c, xs, slot, gates, out, N, D, k, E * C);
    ok = 1;
    for (int64_t t = 0; t < N; t++) {
        int kept = (slot[2 * t] >= 0) + (slot[2 * t + 1] >= 0);
        for (int64_t d = 0; d < D; d++)
            ok &= fabs(out[t * D + d] - kept * x[t * D + d]) < 1e-6;
    }
    CHECK("combine: out = sum of kept slots (dropped -> 0)", ok, "out wrong");

    /* dropless: R = N*k, blocks packed, nothing dropped */
    float *xd = tk_junk(N * k * D);
    moek_dispatch_fwd(&c, x, idx, xd, slot, er, N, D, E, k, 0);
    int32_t want_er0[8] = {0, 3, 3, 5, 8, 2, 10, 0};
    int32_t want_slot0[10] = {3, 0, 4, 8, 1, 5, 6, 2, 7, 9};
    CHECK("dispatch dropless: packed blocks, stable order",
          memcmp(er, want_er0, sizeof er) == 0 && memcmp(slot, want_slot0, sizeof slot) == 0,
          "expert_rows %d %d %d %d %d %d %d %d", er[0], er[1], er[2], er[3], er[4], er[5], er[6], er[7]);

    /* every token to one expert, capacity 1 (smaller than one token per expert) */
    int32_t same[10] = {2, 2, 2, 2, 2, 2, 2, 2, 2, 2};
    moek_dispatch_fwd(&c, x, same, xs, slot, er, N, D, E, 1, 1);
    CHECK("dispatch all tokens to one expert, capacity 1: only token 0 kept",
          slot[0] == 2 && slot[1] == -1 && slot[4] == -1 && er[4] == 2 && er[5] == 1 && er[1] == 0 &&
          xs[0] == 0.0f && memcmp(xs + 2 * D, x, (size_t)D * sizeof *x) == 0,
          "slot %d %d expert_rows[2] = (%d, %d)", slot[0], slot[1], er[4], er[5]);
    moek_dispatch_fwd(&c, x, same, xd, slot, er, N, D, E, k, 0);
    CHECK("dispatch all tokens to one expert, dropless", er[4] == 0 && er[5] == 10 && er[6] == 10 &&
          er[7] == 0 && slot[9] == 9, "expert_rows[2] = (%d, %d)", er[4], er[5]);

    /* a single token, k = E */
    int32_t single[4] = {3, 1, 0, 2};
    float xs1[4 * 3];
    moek_dispatch_fwd(&c, x, single, xs1, slot, er, 1, D, E, 4, 0);
    CHECK("dispatch single token, k = E", slot[0] == 3 && slot[1] == 1 && slot[2] == 0 && slot[3] == 2 &&
          er[6] == 3 && er[7] == 1 && st == 0, "slots %d %d %d %d", slot[0], slot[1], slot[2], slot[3]);

    int32_t bad[10] = {1, 0, 1, 4, 0, 1, 1, 0, 1, 2};
    moek_dispatch_fwd(&c, x, bad, xd, slot, er, N, D, E, k, 0);
    int zero_tail = 1;
    for (int64_t i = 9 * D; i < 10 * D; i++)
        zero_tail &= xd[i] == 0.0f;
    CHECK("dispatch expert id = E sets MOEK_E_INDEX, slot dropped, row zero",
          st == MOEK_E_INDEX && slot[3] == -1 && zero_tail, "status %d slot %d", st, slot[3]);
    st = 0;
    int32_t badrow[2] = {0, 99};
    float dx[3];
    moek_dispatch_bwd(&c, xd, badrow, dx, 1, D, 2, 10);
    CHECK("dispatch bwd slot row >= R sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    st = 0;
    moek_combine_fwd(&c, xd, badrow, gates, dx, 1, D, 2, 10);
    CHECK("combine slot row >= R sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    free(x); free(xs); free(xd);
}

static void test_grouped_matmul(tk_rng *g)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    int64_t R = 12, K = 5, M = 3, E = 4;
    int32_t er[8] = {0, 3, 4, 0, 4, 2, 8, 4}; /* row 3 and rows 6-7 belong to nobody, expert 1 empty */
    float *xs = tk_rand(g, R * K, -1, 1), *w = tk_rand(g, E * M * K, -1, 1), *ys = tk_junk(R * M);
    double *ref = dzeros(R * M);
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = er[2 * e]; r < er[2 * e] + er[2 * e + 1]; r++)
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < K; k++)
                    ref[r * M + m] += (double)xs[r * K + k] * w[(e * M + m) * K + k];
    moek_grouped_matmul_fwd(&c, xs, w, er, ys, R, K, M, E);
    double d = tk_maxdiff(ys, ref, R * M);
    CHECK("grouped_matmul fwd vs per-expert loops, unowned rows 0", d < 1e-5 && st == 0, "max diff %g", d);
    int32_t bad[8] = {0, 3, 4, 0, 4, 2, 8, 5};
    moek_grouped_matmul_fwd(&c, xs, w, bad, ys, R, K, M, E);
    CHECK("grouped_matmul block past R sets MOEK_E_INDEX", st == MOEK_E_INDEX, "status %d", st);
    free(xs); free(w); free(ys); free(ref);
}

/* Values from torch.optim (PyTorch 2.x, fp32): two steps on
 * p0 = [0.5,-1.2,2,0.1,-0.7], g1 = [0.3,-0.4,1.5,-0.05,0.2],
 * g2 = [-0.1,0.25,0.02,0.4,-0.3]; clip_grad_norm_ before each step. */
static void test_optimizers(void)
{
    int st = 0;
    moek_ctx c = tk_ctx(&st, 0);
    const float p0[5] = {0.5f, -1.2f, 2.0f, 0.1f, -0.7f};
    const float gr[2][5] = {{0.3f, -0.4f, 1.5f, -0.05f, 0.2f}, {-0.1f, 0.25f, 0.02f, 0.4f, -0.3f}};
    /* AdamW(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), clip 1.0 */
    const double want_p[5] = {0.486571014, -1.18812048, 1.97906697, 0.1029789, -0.704345584};
    const double want_m[5] = {0.00693296408, 0.00242271274, 0.0866648182, 0.0371778384, -0.0187113583};
    const double want_v[5] = {0.00218141382, 0.0061141802, 0.0420553461, 0.00804670621, 0.00524729537};
    const double want_noclip[5] = {0.48496744, -1.18586576, 1.97912574, 0.103315212, -0.706125557};
    for (int clip = 1; clip >= 0; clip--) {
        float p[5], m[5] = {0}, v[5] = {0};
        memcpy(p, p0, sizeof p);
        for (int t = 1; t <= 2; t++) {
            float hy[MOEK_HYPER_COUNT] = {0};
            hy[MOEK_HYPER_LR] = 0.01f;
            hy[MOEK_HYPER_BETA1] = 0.9f;
            hy[MOEK_HYPER_BETA2] = 0.95f;
            hy[MOEK_HYPER_EPS] = 1e-8f;
            hy[MOEK_HYPER_BC1] = (float)(1 - pow(0.9, t));
            hy[MOEK_HYPER_BC2] = (float)(1 - pow(0.95, t));
            hy[MOEK_HYPER_MAX_NORM] = clip ? 1.0f : 0.0f;
            float nsq = 0;
            moek_sumsq_accum(&c, gr[t - 1], &nsq, 5);
            moek_adamw(&c, p, gr[t - 1], m, v, 5, hy, &nsq, 0.1f);
        }
        int ok = 1;
        for (int i = 0; i < 5; i++) {
            ok &= check_close(p[i], clip ? want_p[i] : want_noclip[i], 1e-7, 1e-6);
            if (clip)
                ok &= check_close(m[i], want_m[i], 1e-9, 1e-5) && check_close(v[i], want_v[i], 1e-9, 1e-5);
        }
        CHECK(clip ? "adamw 2 steps with clipping = torch.optim.AdamW" : "adamw 2 steps, no clipping = torch.optim.AdamW",
              ok, "p = %.9g %.9g %.9g %.9g %.9g", p[0], p[1], p[2], p[3], p[4]);
    }
    /* SGD(lr=0.1, momentum=0.9, weight_decay=0.01), clip 0.5 */
    const double sgd_p[5] = {0.489485234, -1.19469976, 1.90312076, 0.0674913302, -0.683483124};
    const double sgd_b[5] = {0.00607535988, 0.0844269544, 0.478431821, 0.339765429, -0.220883667};
    float p[5], b[5] = {0};
    memcpy(p, p0, sizeof p);
    for (int t = 1; t <= 2; t++) {
        float hy[MOEK_HYPER_COUNT] = {0};
        hy[MOEK_HYPER_LR] = 0.1f;
        hy[MOEK_HYPER_MOMENTUM] = 0.9f;
        hy[MOEK_HYPER_MAX_NORM] = 0.5f;
        float nsq = 0;
        moek_sumsq_accum(&c, gr[t - 1], &nsq, 2);  /* the global norm over two pieces */
        moek_sumsq_accum(&c, gr[t - 1] + 2, &nsq, 3);
        moek_sgd(&c, p, gr[t - 1], b, 5, hy, &nsq, 0.01f);
    }
    int ok = 1;
    for (int i = 0; i < 5; i++)
        ok &= check_close(p[i], sgd_p[i], 1e-7, 1e-6) && check_close(b[i], sgd_b[i], 1e-8, 1e-5);
    CHECK("sgd momentum 2 steps with clipping = torch.optim.SGD", ok,
          "p = %.9g %.9g %.9g %.9g %.9g", p[0], p[1], p[2], p[3], p[4]);
    float acc = 1.0f, xs[3] = {1, 2, 3};
    moek_sumsq_accum(&c, xs, &acc, 3);
    CHECK("sumsq_accum adds to the accumulator", acc == 15.0f, "acc %g", acc);
}

static void test_device(void)
{
    char err[256] = "";
    moek_ctx c;
    memset(&c, 0, sizeof c);
    CHECK("device count is 1", moek_device_count() == 1, "count %d", moek_device_count());
    int rc = moek_device_init(&c, 0, 1000, err, sizeof err);
    CHECK("device init allocates the workspace", rc == 0 && c.workspace && c.workspace_bytes == 1000 &&
          !c.stream && !c.blas && ((uintptr_t)c.workspace % 64) == 0, "rc %d: %s", rc, err);
    unsigned char *p = moek_device_alloc(&c, 100, err, sizeof err), *q = moek_device_alloc(&c, 100, err, sizeof err);
    int zero = p && q && ((uintptr_t)p % 64) == 0;
    for (int i = 0; zero && i < 100; i++)
        zero &= p[i] == 0;
    CHECK("device alloc is zeroed and 64-byte aligned", zero, "alloc failed: %s", err);
    for (int i = 0; p && i < 100; i++)
        p[i] = (unsigned char)i;
    rc = moek_device_copy(&c, q, p, 100, MOEK_COPY_D2D, err, sizeof err);
    CHECK("device copy", rc == 0 && q[99] == 99, "rc %d", rc);
    rc = moek_device_copy(&c, q, p, 100, 7, err, sizeof err);
    printf("# %s\n", err);
    CHECK("device copy rejects an unknown kind", rc == -1 && strstr(err, "unknown copy kind 7"), "rc %d: %s", rc, err);
    CHECK("device sync", moek_device_sync(&c, err, sizeof err) == 0, "sync failed");
    void *gr = &c;
    rc = moek_graph_begin(&c, err, sizeof err);
    printf("# %s\n", err);
    CHECK("graph begin unsupported on CPU", rc == -1 && strstr(err, "CUDA graphs need the CUDA kernel library"),
          "rc %d: %s", rc, err);
    CHECK("graph end/launch unsupported on CPU", moek_graph_end(&c, &gr, err, sizeof err) == -1 && !gr &&
          moek_graph_launch(&c, NULL, err, sizeof err) == -1, "graph calls succeeded");
    moek_graph_free(NULL);
    moek_device_free(&c, p);
    moek_device_free(&c, q);
    moek_device_fini(&c);
    CHECK("device fini releases the workspace", !c.workspace && c.workspace_bytes == 0, "workspace left");
    moek_ctx c2;
    memset(&c2, 0, sizeof c2);
    rc = moek_device_init(&c2, 1, 0, err, sizeof err);
    printf("# %s\n", err);
    CHECK("device init rejects index 1", rc == -1 && strstr(err, "index 1 out of range"), "rc %d: %s", rc, err);
    void *big = moek_device_alloc(&c, -5, err, sizeof err);
    printf("# %s\n", err);
    CHECK("device alloc rejects a negative size", !big && strstr(err, "negative allocation size"), "%s", err);
#ifdef __SANITIZE_ADDRESS__
    /* AddressSanitizer aborts on an impossible allocation instead of
     * returning NULL, so the out-of-memory paths run only in normal builds */
    SKIP("device alloc reports out of memory", "AddressSanitizer build");
    (void)big;
#else
    big = moek_device_alloc(&c, INT64_MAX / 2, err, sizeof err);
    printf("# %s\n", err);
    CHECK("device alloc reports out of memory", !big && strstr(err, "out of memory"), "%s", err);
    rc = moek_device_init(&c2, 0, INT64_MAX / 2, err, sizeof err);
    printf("# %s\n", err);
    CHECK("device init reports a workspace it cannot allocate", rc == -1 && strstr(err, "cannot allocate"), "%s", err);
#endif
}

/* Sizes above the parallel threshold: 1 thread and 2 threads agree bit for bit. */
static void test_threads(tk_rng *g)
{
    int st = 0;
    moek_ctx c1 = tk_ctx(&st, 1), c2 = tk_ctx(&st, 2);
    int64_t B = 2, T = 67, H = 2, Dh = 17, n = B * T * H * Dh;
    float *q = tk_rand(g, n, -1, 1), *k = tk_rand(g, n, -1, 1), *v = tk_rand(g, n, -1, 1),
          *dout = tk_rand(g, n, -1, 1);
    float *o1 = tk_zeros(n), *o2 = tk_zeros(n), *l1 = tk_zeros(B * H * T), *l2 = tk_zeros(B * H * T);
    float *g1 = tk_zeros(3 * n), *g2 = tk_zeros(3 * n);
    moek_attention_fwd(&c1, q, k, v, o1, l1, B, T, H, Dh);
    moek_attention_fwd(&c2, q, k, v, o2, l2, B, T, H, Dh);
    moek_attention_bwd(&c1, dout, q, k, v, o1, l1, g1, g1 + n, g1 + 2 * n, B, T, H, Dh);
    moek_attention_bwd(&c2, dout, q, k, v, o2, l2, g2, g2 + n, g2 + 2 * n, B, T, H, Dh);
    CHECK("attention fwd+bwd identical with 1 and 2 threads",
          !memcmp(o1, o2, (size_t)n * 4) && !memcmp(g1, g2, (size_t)3 * n * 4), "results differ");
    int64_t N = 300, D = 131;
    float *x = tk_rand(g, N * D, -1, 1), *w = tk_rand(g, D, 0.5f, 1.5f), *y1 = tk_zeros(N * D),
          *y2 = tk_zeros(N * D), *r1 = tk_zeros(N), *r2 = tk_zeros(N), *dw1 = tk_zeros(D), *dw2 = tk_zeros(D);
    moek_rmsnorm_fwd(&c1, x, w, y1, r1, N, D, 1e-5f);
    moek_rmsnorm_fwd(&c2, x, w, y2, r2, N, D, 1e-5f);
    moek_rmsnorm_bwd(&c1, x, x, w, r1, y1, dw1, N, D);
    moek_rmsnorm_bwd(&c2, x, x, w, r2, y2, dw2, N, D);
    CHECK("rmsnorm fwd+bwd identical with 1 and 2 threads",
          !memcmp(y1, y2, (size_t)(N * D) * 4) && !memcmp(dw1, dw2, (size_t)D * 4), "results differ");
    CHECK("thread tests status clean", st == 0, "status %d", st);
    free(q); free(k); free(v); free(dout); free(o1); free(o2); free(l1); free(l2); free(g1); free(g2);
    free(x); free(w); free(y1); free(y2); free(r1); free(r2); free(dw1); free(dw2);
}

int main(void)
{
    tk_rng g = {0x0DDBA11CAFEF00Dull};
    test_matmul(&g);
    test_rmsnorm(&g);
    test_rope(&g);
    test_attention(&g);
    test_elementwise();
    test_embedding_and_bad_ids(&g);
    test_cross_entropy(&g);
    test_router(&g);
    test_dispatch(&g);
    test_grouped_matmul(&g);
    test_optimizers();
    test_device();
    test_threads(&g);
    CHECK_DONE();
}
