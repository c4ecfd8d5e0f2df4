/* test_kernels_cpu_grad.c - every backward kernel of the CPU library against
 * central finite differences of its forward.  The scalar differentiated is
 * L = sum(r * out) for a fixed random r, measured in double; the backward
 * is fed dout = r.  fp32 forwards, so h = 1e-2 and |a - fd| <= 1e-3 + 2e-2|fd|:
 * rounding noise in L is ~1e-6, truncation error O(h^2) ~ 1e-4. */
#include "test_kernels_cpu.h"

#define H_STEP 1e-2f
#define ATOL 1e-3
#define RTOL 2e-2

static moek_ctx tk_ctx(int *status)
{
    moek_ctx c;
    memset(&c, 0, sizeof c);
    c.status = status;
    return c;
}

/* ---- matmul ------------------------------------------------------------ */
typedef struct { moek_ctx c; float *x, *w, *y, *r; int64_t N, K, M; } st_matmul;
static double loss_matmul(void *p)
{
    st_matmul *s = p;
    moek_matmul_fwd(&s->c, s->x, s->w, s->y, s->N, s->K, s->M);
    return tk_dot(s->r, s->y, s->N * s->M);
}
static void grad_matmul(tk_rng *g)
{
    int status = 0;
    st_matmul s = {tk_ctx(&status), NULL, NULL, NULL, NULL, 7, 13, 5};
    s.x = tk_rand(g, s.N * s.K, -1, 1);
    s.w = tk_rand(g, s.M * s.K, -1, 1);
    s.y = tk_zeros(s.N * s.M);
    s.r = tk_rand(g, s.N * s.M, -1, 1);
    float *dx = tk_junk(s.N * s.K), *dw = tk_junk(s.M * s.K);
    loss_matmul(&s);
    moek_matmul_bwd(&s.c, s.r, s.x, s.w, dx, dw, s.N, s.K, s.M);
    tk_gradcheck("grad matmul dx", loss_matmul, &s, s.x, s.N * s.K, dx, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad matmul dw", loss_matmul, &s, s.w, s.M * s.K, dw, H_STEP, ATOL, RTOL);
    free(s.x); free(s.w); free(s.y); free(s.r); free(dx); free(dw);
}

/* ---- rmsnorm ----------------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *w, *y, *rstd, *r; int64_t N, D; } st_rms;
static double loss_rms(void *p)
{
    st_rms *s = p;
    moek_rmsnorm_fwd(&s->c, s->x, s->w, s->y, s->rstd, s->N, s->D, 1e-5f);
    return tk_dot(s->r, s->y, s->N * s->D);
}
static void grad_rmsnorm(tk_rng *g)
{
    int status = 0;
    st_rms s = {tk_ctx(&status), NULL, NULL, NULL, NULL, NULL, 5, 11};
    s.x = tk_rand(g, s.N * s.D, -1.5f, 1.5f);
    s.w = tk_rand(g, s.D, 0.5f, 1.5f);
    s.y = tk_zeros(s.N * s.D);
    s.rstd = tk_zeros(s.N);
    s.r = tk_rand(g, s.N * s.D, -1, 1);
    float *dx = tk_junk(s.N * s.D), *dw = tk_junk(s.D);
    loss_rms(&s);
    moek_rmsnorm_bwd(&s.c, s.r, s.x, s.w, s.rstd, dx, dw, s.N, s.D);
    tk_gradcheck("grad rmsnorm dx", loss_rms, &s, s.x, s.N * s.D, dx, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad rmsnorm dw", loss_rms, &s, s.w, s.D, dw, H_STEP, ATOL, RTOL);
    free(s.x); free(s.w); free(s.y); free(s.rstd); free(s.r); free(dx); free(dw);
}

/* ---- rope -------------------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *y, *r; int64_t B, T, H, Dh; } st_rope;
static double loss_rope(void *p)
{
    st_rope *s = p;
    moek_rope_fwd(&s->c, s->x, s->y, s->B, s->T, s->H, s->Dh, 10000.0f);
    return tk_dot(s->r, s->y, s->B * s->T * s->H * s->Dh);
}
static void grad_rope(tk_rng *g)
{
    int status = 0;
    st_rope s = {tk_ctx(&status), NULL, NULL, NULL, 2, 5, 3, 6};
    int64_t n = s.B * s.T * s.H * s.Dh;
    s.x = tk_rand(g, n, -1, 1);
    s.y = tk_zeros(n);
    s.r = tk_rand(g, n, -1, 1);
    float *dx = tk_junk(n);
    loss_rope(&s);
    moek_rope_bwd(&s.c, s.r, dx, s.B, s.T, s.H, s.Dh, 10000.0f);
    tk_gradcheck("grad rope dx", loss_rope, &s, s.x, n, dx, H_STEP, ATOL, RTOL);
    free(s.x); free(s.y); free(s.r); free(dx);
}

/* ---- attention --------------------------------------------------------- */
typedef struct { moek_ctx c; float *q, *k, *v, *o, *lse, *r; int64_t B, T, H, Dh; } st_att;
static double loss_att(void *p)
{
    st_att *s = p;
    moek_attention_fwd(&s->c, s->q, s->k, s->v, s->o, s->lse, s->B, s->T, s->H, s->Dh);
    return tk_dot(s->r, s->o, s->B * s->T * s->H * s->Dh);
}
static void grad_attention(tk_rng *g)
{
    int status = 0;
    st_att s = {tk_ctx(&status), NULL, NULL, NULL, NULL, NULL, NULL, 2, 7, 3, 5};
    int64_t n = s.B * s.T * s.H * s.Dh;
    s.q = tk_rand(g, n, -1.5f, 1.5f);
    s.k = tk_rand(g, n, -1.5f, 1.5f);
    s.v = tk_rand(g, n, -1, 1);
    s.o = tk_zeros(n);
    s.lse = tk_zeros(s.B * s.H * s.T);
    s.r = tk_rand(g, n, -1, 1);
    float *dq = tk_junk(n), *dk = tk_junk(n), *dv = tk_junk(n);
    loss_att(&s);
    moek_attention_bwd(&s.c, s.r, s.q, s.k, s.v, s.o, s.lse, dq, dk, dv, s.B, s.T, s.H, s.Dh);
    tk_gradcheck("grad attention dq", loss_att, &s, s.q, n, dq, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad attention dk", loss_att, &s, s.k, n, dk, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad attention dv", loss_att, &s, s.v, n, dv, H_STEP, ATOL, RTOL);
    free(s.q); free(s.k); free(s.v); free(s.o); free(s.lse); free(s.r); free(dq); free(dk); free(dv);
}

/* ---- gelu / swiglu ----------------------------------------------------- */
typedef struct { moek_ctx c; float *a, *b, *y, *r; int64_t n; int which; } st_ew;
static double loss_ew(void *p)
{
    st_ew *s = p;
    if (s->which == 0)
        moek_gelu_fwd(&s->c, s->a, s->y, s->n);
    else
        moek_swiglu_fwd(&s->c, s->a, s->b, s->y, s->n);
    return tk_dot(s->r, s->y, s->n);
}
static void grad_elementwise(tk_rng *g)
{
    int status = 0;
    st_ew s = {tk_ctx(&status), NULL, NULL, NULL, NULL, 37, 0};
    s.a = tk_rand(g, s.n, -3, 3);
    s.b = tk_rand(g, s.n, -2, 2);
    s.y = tk_zeros(s.n);
    s.r = tk_rand(g, s.n, -1, 1);
    float *da = tk_junk(s.n), *db = tk_junk(s.n);
    moek_gelu_bwd(&s.c, s.r, s.a, da, s.n);
    tk_gradcheck("grad gelu dx", loss_ew, &s, s.a, s.n, da, H_STEP, ATOL, RTOL);
    s.which = 1;
    moek_swiglu_bwd(&s.c, s.r, s.a, s.b, da, db, s.n);
    tk_gradcheck("grad swiglu dgate", loss_ew, &s, s.a, s.n, da, H_STEP, ATOL, RTOL);
    tk_gradcheck("grad swiglu dup", loss_ew, &s, s.b, s.n, db, H_STEP, ATOL, RTOL);
    free(s.a); free(s.b); free(s.y); free(s.r); free(da); free(db);
}

/* ---- embedding --------------------------------------------------------- */
typedef struct { moek_ctx c; int32_t *ids; float *table, *out, *r; int64_t N, V, D; } st_emb;
static double loss_emb(void *p)
{
    st_emb *s = p;
    moek_embedding_fwd(&s->c, s->ids, s->table, s->out, s->N, s->V, s->D);
    return tk_dot(s->r, s->out, s->N * s->D);
}
static void grad_embedding(tk_rng *g)
{
    int status = 0;
    int32_t ids[9] = {3, 0, 3, 5, 1, 3, 0, 2, 5}; /* repeats; id 4 unused */
    st_emb s = {tk_ctx(&status), ids, NULL, NULL, NULL, 9, 6, 5};
    s.table = tk_rand(g, s.V * s.D, -1, 1);
    s.out = tk_zeros(s.N * s.D);
    s.r = tk_rand(g, s.N * s.D, -1, 1);
    float *dt = tk_junk(s.V * s.D);
    moek_embedding_bwd(&s.c, s.r, ids, dt, s.N, s.V, s.D);
    tk_gradcheck("grad embedding dtable", loss_emb, &s, s.table, s.V * s.D, dt, H_STEP, ATOL, RTOL);
    int zero = 1;
    for (int64_t d = 0; d < s.D; d++)
        zero &= dt[4 * s.D + d] == 0.0f;
    CHECK("grad embedding unused row is zero", zero && status == 0, "row 4 not zero / status %d", status);
    free(s.table); free(s.out); free(s.r); free(dt);
}

/* ---- cross entropy ----------------------------------------------------- */
typedef struct { moek_ctx c; float *logits, loss, *lse, dloss; int32_t *t; int64_t N, V; } st_ce;
static double loss_ce(void *p)
{
    st_ce *s = p;
    moek_cross_entropy_fwd(&s->c, s->logits, s->t, &s->loss, s->lse, s->N, s->V);
    return (double)s->dloss * s->loss;
}
static void grad_cross_entropy(tk_rng *g)
{
    int status = 0;
    int32_t t[6] = {0, 10, 4, 4, 7, 2};
    st_ce s = {tk_ctx(&status), NULL, 0, NULL, 0.7f, t, 6, 11};
    s.logits = tk_rand(g, s.N * s.V, -2, 2);
    s.lse = tk_zeros(s.N);
    float *d = tk_junk(s.N * s.V);
    loss_ce(&s);
    moek_cross_entropy_bwd(&s.c, &s.dloss, s.logits, t, s.lse, d, s.N, s.V);
    /* the loss is a mean of N rows, so gradients are ~1/N: scale atol with it */
    tk_gradcheck("grad cross_entropy dlogits", loss_ce, &s, s.logits, s.N * s.V, d, H_STEP, ATOL / 10, RTOL);
    free(s.logits); free(s.lse); free(d);
}

/* ---- softmax, z-loss, balance loss -------------------------------------- */
typedef struct { moek_ctx c; float *x, *y, *r, loss, dloss; int32_t *idx; int64_t N, E, k; int which; } st_rt;
static double loss_rt(void *p)
{
    st_rt *s = p;
    switch (s->which) {
    case 0:
        moek_softmax_fwd(&s->c, s->x, s->y, s->N, s->E);
        return tk_dot(s->r, s->y, s->N * s->E);
    case 1:
        moek_zloss_fwd(&s->c, s->x, &s->loss, s->N, s->E);
        return (double)s->dloss * s->loss;
    default:
        moek_balance_loss_fwd(&s->c, s->x, s->idx, &s->loss, s->N, s->E, s->k);
        return (double)s->dloss * s->loss;
    }
}
static void grad_router_losses(tk_rng *g)
{
    int status = 0;
    int32_t idx[20] = {0, 1, 1, 2, 0, 1, 3, 1, 1, 0, 2, 3, 0, 1, 1, 2, 3, 0, 1, 2}; /* expert 4 unused */
    st_rt s = {tk_ctx(&status), NULL, NULL, NULL, 0, 1.3f, idx, 10, 5, 2, 0};
    int64_t n = s.N * s.E;
    s.x = tk_rand(g, n, -2, 2);
    s.y = tk_zeros(n);
    s.r = tk_rand(g, n, -1, 1);
    float *d = tk_junk(n);
    loss_rt(&s);
    moek_softmax_bwd(&s.c, s.r, s.y, d, s.N, s.E);
    tk_gradcheck("grad softmax dlogits", loss_rt, &s, s.x, n, d, H_STEP, ATOL, RTOL);
    s.which = 1;
    moek_zloss_bwd(&s.c, &s.dloss, s.x, d, s.N, s.E);
    tk_gradcheck("grad zloss dlogits", loss_rt, &s, s.x, n, d, H_STEP, ATOL / 10, RTOL);
    s.which = 2;
    for (int64_t i = 0; i < n; i++) /* probabilities-like inputs */
        s.x[i] = 0.05f + 0.9f * (s.x[i] + 2) / 4;
    moek_balance_loss_bwd(&s.c, &s.dloss, s.x, idx, d, s.N, s.E, s.k);
    tk_gradcheck("grad balance_loss dprobs", loss_rt, &s, s.x, n, d, H_STEP, ATOL / 10, RTOL);
    CHECK("grad router losses status clean", status == 0, "status %d", status);
    free(s.x); free(s.y); free(s.r); free(d);
}

/* ---- top-k ------------------------------------------------------------- */
typedef struct { moek_ctx c; float *x, *gates, *r; int32_t *idx, *idx0; int64_t N, E, k, renorm; } st_topk;
static double loss_topk(void *p)
{
    st_topk *s = p;
    moek_topk_fwd(&s->c, s->x, s->idx, s->gates, s->N, s->E, s->k, s->renorm);
    if (s->idx0 && memcmp(s->idx, s->idx0, (size_t)(s->N * s->k) * sizeof *s->idx))
        return NAN; /* the selection moved: not differentiable here */
    return tk_dot(s->r, s->gates, s->N * s->k);
}
static void grad_topk(tk_rng *g, int64_t renorm, int64_t k, const char *name)
{
    int status = 0;
    st_topk s = {tk_ctx(&status), NULL, NULL, NULL, NULL, NULL, 6, 9, k, renorm};
    int64_t n = s.N * s.E;
    /* well-separated positive scores: a random permutation of 0.1 .. 0.9
     * plus a little noise, so h never reorders them */
    s.x = tk_zeros(n);
    for (int64_t t = 0; t < s.N; t++) {
        for (int64_t e = 0; e < s.E; e++)
            s.x[t * s.E + e] = 0.1f * (float)(e + 1) + tk_unif(g, -0.02f, 0.02f);
        for (int64_t e = s.E - 1; e > 0; e--) {
            int64_t j = (int64_t)(tk_next(g) % (uint64_t)(e + 1));
            float tmp = s.x[t * s.E + e];
            s.x[t * s.E + e] = s.x[t * s.E + j];
            s.x[t * s.E + j] = tmp;
        }
    }
    s.gates = tk_zeros(s.N * s.k);
    s.r = tk_rand(g, s.N * s.k, -1, 1);
    s.idx = calloc((size_t)(s.N * s.k), sizeof *s.idx);
    s.idx0 = NULL;
    loss_topk(&s);
    s.idx0 = malloc((size_t)(s.N * s.k) * sizeof *s.idx0);
    memcpy(s.idx0, s.idx, (size_t)(s.N * s.k) * sizeof *s.idx);
    float *d = tk_junk(n);
    moek_topk_bwd(&s.c, s.r, s.x, s.idx, d, s.N, s.E, s.k, s.renorm);
    tk_gradcheck(name, loss_topk, &s, s.x, n, d, H_STEP, ATOL, RTOL);
    free(s.x); free(s.gates); free(s.r); free(s.idx); free(s.idx0); free(d);
}

/* ---- dispatch / grouped matmul / combine ---------------------------------- */
typedef struct {
    moek_ctx c; float *x, *xs, *w, *ys, *gates, *out, *r; int32_t *idx, *slot, *er;
    int64_t N, D, E, k, C, R, M; int which;
} st_moe;
static double loss_moe(void *p)
{
    st_moe *s = p;
    switch (s->which) {
    case 0:
        moek_dispatch_fwd(&s->c, s->x, s->idx, s->xs, s->slot, s->er, s->N, s->D, s->E, s->k, s->C);
        return tk_dot(s->r, s->xs, s->R * s->D);
    case 1:
        moek_grouped_matmul_fwd(&s->c, s->xs, s->w, s->er, s->ys, s->R, s->D, s->M, s->E);
        return tk_dot(s->r, s->ys, s->R * s->M);
    default:
        moek_combine_fwd(&s->c, s->ys, s->slot, s->gates, s->out, s->N, s->M, s->k, s->R);
        return tk_dot(s->r, s->out, s->N * s->M);
    }
}
static void grad_moe_parts(tk_rng *g, int64_t C, const char *tag)
{
    int status = 0;
    char name[96];
    /* 9 tokens, top-2 of 4 experts; expert 3 gets none, expert 1 is crowded */
    int32_t idx[18] = {1, 0, 1, 2, 0, 1, 1, 2, 2, 1, 1, 0, 0, 2, 1, 2, 2, 0};
    st_moe s;
    memset(&s, 0, sizeof s);
    s.c = tk_ctx(&status);
    s.N = 9; s.D = 5; s.E = 4; s.k = 2; s.C = C; s.M = 3;
    s.R = C > 0 ? s.E * C : s.N * s.k;
    s.idx = idx;
    s.x = tk_rand(g, s.N * s.D, -1, 1);
    s.xs = tk_zeros(s.R * s.D);
    s.slot = calloc((size_t)(s.N * s.k), sizeof *s.slot);
    s.er = calloc((size_t)(2 * s.E), sizeof *s.er);
    s.w = tk_rand(g, s.E * s.M * s.D, -1, 1);
    s.ys = tk_zeros(s.R * s.M);
    s.gates = tk_rand(g, s.N * s.k, 0.1f, 0.9f);
    s.out = tk_zeros(s.N * s.M);
    float *rd = tk_rand(g, s.R * s.D, -1, 1), *rg = tk_rand(g, s.R * s.M, -1, 1),
          *rc = tk_rand(g, s.N * s.M, -1, 1);
    float *dx = tk_junk(s.N * s.D), *dxs = tk_junk(s.R * s.D), *dw = tk_junk(s.E * s.M * s.D),
          *dys = tk_junk(s.R * s.M), *dg = tk_junk(s.N * s.k);

    s.which = 0; s.r = rd;
    loss_moe(&s);
    moek_dispatch_bwd(&s.c, rd, s.slot, dx, s.N, s.D, s.k, s.R);
    snprintf(name, sizeof name, "grad dispatch dx (%s)", tag);
    tk_gradcheck(name, loss_moe, &s, s.x, s.N * s.D, dx, H_STEP, ATOL, RTOL);

    s.which = 1; s.r = rg;
    loss_moe(&s);
    moek_grouped_matmul_bwd(&s.c, rg, s.xs, s.w, s.er, dxs, dw, s.R, s.D, s.M, s.E);
    snprintf(name, sizeof name, "grad grouped_matmul dxs (%s)", tag);
    tk_gradcheck(name, loss_moe, &s, s.xs, s.R * s.D, dxs, H_STEP, ATOL, RTOL);
    snprintf(name, sizeof name, "grad grouped_matmul dw (%s)", tag);
    tk_gradcheck(name, loss_moe, &s, s.w, s.E * s.M * s.D, dw, H_STEP, ATOL, RTOL);
    int zero = 1;
    for (int64_t i = 0; i < s.M * s.D; i++)
        zero &= dw[3 * s.M * s.D + i] == 0.0f;
    snprintf(name, sizeof name, "grad grouped_matmul dw of an expert with no rows is 0 (%s)", tag);
    CHECK(name, zero, "expert 3 weight gradient not zero");

    s.which = 2; s.r = rc;
    loss_moe(&s);
    moek_combine_bwd(&s.c, rc, s.ys, s.slot, s.gates, dys, dg, s.N, s.M, s.k, s.R);
    snprintf(name, sizeof name, "grad combine dys (%s)", tag);
    tk_gradcheck(name, loss_moe, &s, s.ys, s.R * s.M, dys, H_STEP, ATOL, RTOL);
    snprintf(name, sizeof name, "grad combine dgates (%s)", tag);
    tk_gradcheck(name, loss_moe, &s, s.gates, s.N * s.k, dg, H_STEP, ATOL, RTOL);
    snprintf(name, sizeof name, "grad moe parts status clean (%s)", tag);
    CHECK(name, status == 0, "status %d", status);
    free(s.x); free(s.xs); free(s.slot); free(s.er); free(s.w); free(s.ys); free(s.gates);
    free(s.out); free(rd); free(rg); free(rc); free(dx); free(dxs); free(dw); free(dys); free(dg);
}

/* ---- a whole MoE layer, chained: router -> softmax -> top-k (renorm) ->
 * dispatch -> expert up (grouped) -> gelu -> expert down (grouped) ->
 * combine.  Checks the router's gradient through the combine weights. */
typedef struct {
    moek_ctx c;
    float *x, *wr, *w1, *w2, *logits, *probs, *gates, *xs, *h, *a, *ys, *out, *r;
    int32_t *idx, *idx0, *slot, *er;
    int64_t N, D, E, k, C, R, F;
} st_layer;
static double loss_layer(void *p)
{
    st_layer *s = p;
    moek_matmul_fwd(&s->c, s->x, s->wr, s->logits, s->N, s->D, s->E);
    moek_softmax_fwd(&s->c, s->logits, s->probs, s->N, s->E);
    moek_topk_fwd(&s->c, s->probs, s->idx, s->gates, s->N, s->E, s->k, 1);
    if (s->idx0 && memcmp(s->idx, s->idx0, (size_t)(s->N * s->k) * sizeof *s->idx))
        return NAN;
    moek_dispatch_fwd(&s->c, s->x, s->idx, s->xs, s->slot, s->er, s->N, s->D, s->E, s->k, s->C);
    moek_grouped_matmul_fwd(&s->c, s->xs, s->w1, s->er, s->h, s->R, s->D, s->F, s->E);
    moek_gelu_fwd(&s->c, s->h, s->a, s->R * s->F);
    moek_grouped_matmul_fwd(&s->c, s->a, s->w2, s->er, s->ys, s->R, s->F, s->D, s->E);
    moek_combine_fwd(&s->c, s->ys, s->slot, s->gates, s->out, s->N, s->D, s->k, s->R);
    return tk_dot(s->r, s->out, s->N * s->D);
}
static void grad_moe_layer(tk_rng *g, int64_t C, const char *tag)
{
    int status = 0;
    char name[96];
    st_layer s;
    memset(&s, 0, sizeof s);
    s.c = tk_ctx(&status);
    s.N = 11; s.D = 6; s.E = 5; s.k = 2; s.C = C; s.F = 7;
    s.R = C > 0 ? s.E * C : s.N * s.k;
    s.x = tk_rand(g, s.N * s.D, -1, 1);
    s.wr = tk_rand(g, s.E * s.D, -3, 3); /* spread logits: fewer near-ties */
    s.w1 = tk_rand(g, s.E * s.F * s.D, -0.8f, 0.8f);
    s.w2 = tk_rand(g, s.E * s.D * s.F, -0.8f, 0.8f);
    s.logits = tk_zeros(s.N * s.E); s.probs = tk_zeros(s.N * s.E); s.gates = tk_zeros(s.N * s.k);
    s.xs = tk_zeros(s.R * s.D); s.h = tk_zeros(s.R * s.F); s.a = tk_zeros(s.R * s.F);
    s.ys = tk_zeros(s.R * s.D); s.out = tk_zeros(s.N * s.D);
    s.r = tk_rand(g, s.N * s.D, -1, 1);
    s.idx = calloc((size_t)(s.N * s.k), sizeof *s.idx);
    s.slot = calloc((size_t)(s.N * s.k), sizeof *s.slot);
    s.er = calloc((size_t)(2 * s.E), sizeof *s.er);
    loss_layer(&s);
    s.idx0 = malloc((size_t)(s.N * s.k) * sizeof *s.idx0);
    memcpy(s.idx0, s.idx, (size_t)(s.N * s.k) * sizeof *s.idx);

    /* backward, in reverse; the token gradient is the sum of two paths */
    float *dys = tk_junk(s.R * s.D), *dgates = tk_junk(s.N * s.k), *da = tk_junk(s.R * s.F),
          *dw2 = tk_junk(s.E * s.D * s.F), *dh = tk_junk(s.R * s.F), *dxs = tk_junk(s.R * s.D),
          *dw1 = tk_junk(s.E * s.F * s.D), *dx = tk_junk(s.N * s.D), *dprobs = tk_junk(s.N * s.E),
          *dlogits = tk_junk(s.N * s.E), *dx2 = tk_junk(s.N * s.D), *dwr = tk_junk(s.E * s.D);
    moek_combine_bwd(&s.c, s.r, s.ys, s.slot, s.gates, dys, dgates, s.N, s.D, s.k, s.R);
    moek_grouped_matmul_bwd(&s.c, dys, s.a, s.w2, s.er, da, dw2, s.R, s.F, s.D, s.E);
    moek_gelu_bwd(&s.c, da, s.h, dh, s.R * s.F);
    moek_grouped_matmul_bwd(&s.c, dh, s.xs, s.w1, s.er, dxs, dw1, s.R, s.D, s.F, s.E);
    moek_dispatch_bwd(&s.c, dxs, s.slot, dx, s.N, s.D, s.k, s.R);
    moek_topk_bwd(&s.c, dgates, s.probs, s.idx, dprobs, s.N, s.E, s.k, 1);
    moek_softmax_bwd(&s.c, dprobs, s.probs, dlogits, s.N, s.E);
    moek_matmul_bwd(&s.c, dlogits, s.x, s.wr, dx2, dwr, s.N, s.D, s.E);
    moek_accumulate(&s.c, dx, dx2, s.N * s.D);

    snprintf(name, sizeof name, "grad moe layer dx (%s)", tag);
    tk_gradcheck(name, loss_layer, &s, s.x, s.N * s.D, dx, H_STEP, ATOL, RTOL);
    /* a router weight moves every token's logits, so h = 1e-2 often
     * reorders a top-k; a smaller step keeps the selection (and fp32 noise
     * in L, ~1e-6 / 2h, still far below atol) */
    snprintf(name, sizeof name, "grad moe layer d router weight (%s)", tag);
    tk_gradcheck(name, loss_layer, &s, s.wr, s.E * s.D, dwr, 2e-3f, ATOL, RTOL);
    snprintf(name, sizeof name, "grad moe layer d expert up (%s)", tag);
    tk_gradcheck(name, loss_layer, &s, s.w1, s.E * s.F * s.D, dw1, H_STEP, ATOL, RTOL);
    snprintf(name, sizeof name, "grad moe layer d expert down (%s)", tag);
    tk_gradcheck(name, loss_layer, &s, s.w2, s.E * s.D * s.F, dw2, H_STEP, ATOL, RTOL);
    snprintf(name, sizeof name, "grad moe layer status clean (%s)", tag);
    CHECK(name, status == 0, "status %d", status);
    free(s.x); free(s.wr); free(s.w1); free(s.w2); free(s.logits); free(s.probs); free(s.gates);
    free(s.xs); free(s.h); free(s.a); free(s.ys); free(s.out); free(s.r); free(s.idx); free(s.idx0);
    free(s.slot); free(s.er); free(dys); free(dgates); free(da); free(dw2); free(dh); free(dxs);
    free(dw1); free(dx); free(dprobs); free(dlogits); free(dx2); free(dwr);
}

int main(void)
{
    tk_rng g = {0x1234567887654321ull};
    grad_matmul(&g);
    grad_rmsnorm(&g);
    grad_rope(&g);
    grad_attention(&g);
    grad_elementwise(&g);
    grad_embedding(&g);
    grad_cross_entropy(&g);
    grad_router_losses(&g);
    grad_topk(&g, 0, 3, "grad topk dscores (no renorm)");
    grad_topk(&g, 1, 3, "grad topk dscores (renorm)");
    grad_topk(&g, 1, 9, "grad topk dscores (renorm, k = E)");
    grad_moe_parts(&g, 3, "capacity 3, drops");
    grad_moe_parts(&g, 0, "dropless");
    grad_moe_layer(&g, 0, "dropless");
    grad_moe_layer(&g, 3, "capacity 3");
    CHECK_DONE();
}
