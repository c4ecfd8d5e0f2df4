/* kernels_cpu.c - micro-benchmark of the CPU kernels at the tiny models'
 * sizes (B=16, T=128, d_model=128, 4 heads, d_ff=256, vocab=256, 8 experts
 * top-2): median wall time of many calls per kernel.  Not a test.
 *
 *   make BUILD=build-kperf bench-kernels && ./build-kperf/bench/kernels_cpu [reps] [threads]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../kernels/moek.h"

enum { B = 16, T = 128, C = 128, H = 4, DH = C / H, FF = 256, V = 256, E = 8, K = 2, N = B * T, R = N * K };

static uint64_t bk_state = 88172645463325252ull;

static float bk_uniform(float lo, float hi)
{
    bk_state ^= bk_state << 13;
    bk_state ^= bk_state >> 7;
    bk_state ^= bk_state << 17;
    return lo + (hi - lo) * (float)((bk_state >> 40) * (1.0 / 16777216.0));
}

static float *bk_rand(int64_t n, float lo, float hi)
{
    float *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++)
        p[i] = bk_uniform(lo, hi);
    return p;
}

static double bk_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int bk_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Everything a kernel call needs, so one macro times any of them. */
static int bk_reps = 50;

#define BENCH(name, call)                                                        \
    do {                                                                         \
        double t_[1024];                                                         \
        int r_ = bk_reps < 1024 ? bk_reps : 1024;                                \
        for (int w_ = 0; w_ < 3; w_++) { call; }                                 \
        for (int i_ = 0; i_ < r_; i_++) {                                        \
            double s_ = bk_now();                                                \
            call;                                                                \
            t_[i_] = bk_now() - s_;                                              \
        }                                                                        \
        qsort(t_, (size_t)r_, sizeof t_[0], bk_cmp);                             \
        printf("| %-28s | %9.1f |\n", name, 1e6 * t_[r_ / 2]);                   \
    } while (0)

int main(int argc, char **argv)
{
    if (argc > 1)
        bk_reps = atoi(argv[1]);
    int status = 0;
    moek_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.status = &status;
    ctx.num_threads = argc > 2 ? atoi(argv[2]) : 0;

    int32_t *ids = malloc(N * sizeof *ids), *tgt = malloc(N * sizeof *tgt);
    for (int i = 0; i < N; i++) {
        ids[i] = (int32_t)(bk_uniform(0, 1) * V) % V;
        tgt[i] = (int32_t)(bk_uniform(0, 1) * V) % V;
    }
    float *table = bk_rand(V * C, -1, 1), *x = bk_rand(N * C, -1, 1), *dx = bk_rand(N * C, -1, 1);
    float *y = bk_rand(N * C, -1, 1), *dy = bk_rand(N * C, -1, 1), *wn = bk_rand(C, 0.5f, 1.5f);
    float *rstd = bk_rand(N, 0, 1), *dwn = bk_rand(C, 0, 1);
    float *wqkv = bk_rand(C * C, -0.1f, 0.1f), *dw = bk_rand(V * C, -1, 1);
    float *q = bk_rand(N * C, -1, 1), *k = bk_rand(N * C, -1, 1), *v = bk_rand(N * C, -1, 1);
    float *o = bk_rand(N * C, -1, 1), *lse = bk_rand(B * H * T, 0, 1);
    float *dq = bk_rand(N * C, -1, 1), *dk = bk_rand(N * C, -1, 1), *dv = bk_rand(N * C, -1, 1);
    float *wlm = bk_rand(V * C, -0.1f, 0.1f), *logits = bk_rand(N * V, -3, 3), *dlogits = bk_rand(N * V, -1, 1);
    float loss[1], dloss[1] = {1.0f}, *lsev = bk_rand(N, 0, 1);
    float *rlog = bk_rand(N * E, -1, 1), *probs = bk_rand(N * E, 0, 1), *dprobs = bk_rand(N * E, -1, 1);
    float *gates = bk_rand(N * K, 0, 1), *dgates = bk_rand(N * K, 0, 1);
    int32_t *idx = malloc(N * K * sizeof *idx), *slot = malloc(N * K * sizeof *slot), erows[2 * E];
    float *xs = bk_rand(R * C, -1, 1), *dxs = bk_rand(R * C, -1, 1), *w1 = bk_rand(E * FF * C, -0.1f, 0.1f);
    float *dw1 = bk_rand(E * FF * C, -1, 1), *w2 = bk_rand(E * C * FF, -0.1f, 0.1f);
    float *hg = bk_rand(R * FF, -2, 2), *hu = bk_rand(R * FF, -2, 2), *hy = bk_rand(R * FF, -2, 2);
    float *dhg = bk_rand(R * FF, -1, 1), *dhu = bk_rand(R * FF, -1, 1), *ys = bk_rand(R * C, -1, 1);
    float *dys = bk_rand(R * C, -1, 1);
    int64_t P = 1 << 20; /* about the tiny MoE's parameter count */
    float *pp = bk_rand(P, -1, 1), *pg = bk_rand(P, -1, 1), *pm = bk_rand(P, -1, 1), *pv = bk_rand(P, 0, 1);
    float hyper[MOEK_HYPER_COUNT] = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.05f, 1.0f, 0.9f}, nsq[1] = {4.0f};

    printf("| kernel (B=%d T=%d C=%d H=%d ff=%d V=%d E=%d k=%d) | median us |\n| --- | ---: |\n",
           B, T, C, H, FF, V, E, K);
    BENCH("embedding_fwd", moek_embedding_fwd(&ctx, ids, table, x, N, V, C));
    BENCH("embedding_bwd", moek_embedding_bwd(&ctx, dy, ids, dw, N, V, C));
    BENCH("rmsnorm_fwd", moek_rmsnorm_fwd(&ctx, x, wn, y, rstd, N, C, 1e-5f));
    BENCH("rmsnorm_bwd", moek_rmsnorm_bwd(&ctx, dy, x, wn, rstd, dx, dwn, N, C));
    BENCH("matmul_fwd 128->128", moek_matmul_fwd(&ctx, x, wqkv, y, N, C, C));
    BENCH("matmul_bwd 128->128", moek_matmul_bwd(&ctx, dy, x, wqkv, dx, dw, N, C, C));
    BENCH("rope_fwd", moek_rope_fwd(&ctx, x, q, B, T, H, DH, 10000.0f));
    BENCH("rope_bwd", moek_rope_bwd(&ctx, dy, dx, B, T, H, DH, 10000.0f));
    BENCH("attention_fwd", moek_attention_fwd(&ctx, q, k, v, o, lse, B, T, H, DH));
    BENCH("attention_bwd", moek_attention_bwd(&ctx, dy, q, k, v, o, lse, dq, dk, dv, B, T, H, DH));
    BENCH("add_fwd", moek_add_fwd(&ctx, x, dx, y, N * C));
    BENCH("accumulate", moek_accumulate(&ctx, y, dx, N * C));
    BENCH("matmul_fwd router 128->8", moek_matmul_fwd(&ctx, x, wqkv, rlog, N, C, E));
    BENCH("softmax_fwd", moek_softmax_fwd(&ctx, rlog, probs, N, E));
    BENCH("softmax_bwd", moek_softmax_bwd(&ctx, dprobs, probs, rlog, N, E));
    BENCH("topk_fwd", moek_topk_fwd(&ctx, probs, idx, gates, N, E, K, 1));
    BENCH("topk_bwd", moek_topk_bwd(&ctx, dgates, probs, idx, dprobs, N, E, K, 1));
    BENCH("balance_loss_fwd", moek_balance_loss_fwd(&ctx, probs, idx, loss, N, E, K));
    BENCH("balance_loss_bwd", moek_balance_loss_bwd(&ctx, dloss, probs, idx, dprobs, N, E, K));
    BENCH("dispatch_fwd", moek_dispatch_fwd(&ctx, x, idx, xs, slot, erows, N, C, E, K, 0));
    BENCH("dispatch_bwd", moek_dispatch_bwd(&ctx, dxs, slot, dx, N, C, K, R));
    BENCH("grouped_matmul_fwd 128->256", moek_grouped_matmul_fwd(&ctx, xs, w1, erows, hg, R, C, FF, E));
    BENCH("grouped_matmul_bwd 128->256", moek_grouped_matmul_bwd(&ctx, dhg, xs, w1, erows, dxs, dw1, R, C, FF, E));
    BENCH("swiglu_fwd", moek_swiglu_fwd(&ctx, hg, hu, hy, R * FF));
    BENCH("swiglu_bwd", moek_swiglu_bwd(&ctx, hy, hg, hu, dhg, dhu, R * FF));
    BENCH("grouped_matmul_fwd 256->128", moek_grouped_matmul_fwd(&ctx, hy, w2, erows, ys, R, FF, C, E));
    BENCH("combine_fwd", moek_combine_fwd(&ctx, ys, slot, gates, y, N, C, K, R));
    BENCH("combine_bwd", moek_combine_bwd(&ctx, dy, ys, slot, gates, dys, dgates, N, C, K, R));
    BENCH("matmul_fwd lm_head 128->256", moek_matmul_fwd(&ctx, x, wlm, logits, N, C, V));
    BENCH("matmul_bwd lm_head 128->256", moek_matmul_bwd(&ctx, dlogits, x, wlm, dx, dw, N, C, V));
    BENCH("cross_entropy_fwd", moek_cross_entropy_fwd(&ctx, logits, tgt, loss, lsev, N, V));
    BENCH("cross_entropy_bwd", moek_cross_entropy_bwd(&ctx, dloss, logits, tgt, lsev, dlogits, N, V));
    BENCH("gelu_fwd", moek_gelu_fwd(&ctx, hg, hy, R * FF));
    BENCH("gelu_bwd", moek_gelu_bwd(&ctx, hy, hg, dhg, R * FF));
    BENCH("sumsq_accum (1M)", moek_sumsq_accum(&ctx, pg, nsq, P); nsq[0] = 4.0f);
    BENCH("adamw (1M)", moek_adamw(&ctx, pp, pg, pm, pv, P, hyper, nsq, 0.1f));
    if (status)
        fprintf(stderr, "kernel status %d\n", status);
    return status != 0;
}
