/* test_compiler_exec.c - runs the compiled step with tiny reference kernels
 * written here, in the planned pools at the planned offsets, and checks
 * the numbers: parameter gradients against central finite differences of
 * the forward loss (so autodiff's wiring, gradient sums, tied weights and the
 * memory planner's reuse are all checked together), accumulation over
 * micro-steps, and one AdamW step with its weight decay and grad zeroing. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "test_compiler_graphs.h"

typedef struct tx {
    const ir_graph *g;
    unsigned char *pool[PLAN_ST_COUNT];
    int unknown;       /* a kernel this file has no reference for */
} tx;

static float *tx_f(tx *x, int v)
{
    const ir_value *val = &x->g->values[v];
    return (float *)(x->pool[val->pool] + val->offset);
}

static void k_matmul_fwd(const float *a, const float *w, float *y, int64_t N, int64_t K, int64_t M)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++)
                s += (double)a[n * K + k] * w[m * K + k];
            y[n * M + m] = (float)s;
        }
}

static void k_matmul_bwd(const float *dy, const float *a, const float *w, float *dx, float *dw,
                         int64_t N, int64_t K, int64_t M)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            double s = 0;
            for (int64_t m = 0; m < M; m++)
                s += (double)dy[n * M + m] * w[m * K + k];
            dx[n * K + k] = (float)s;
        }
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            double s = 0;
            for (int64_t n = 0; n < N; n++)
                s += (double)dy[n * M + m] * a[n * K + k];
            dw[m * K + k] = (float)s;
        }
}

static void k_ce_fwd(const float *lg, const int32_t *tg, float *loss, float *lse, int64_t N, int64_t V)
{
    double total = 0;
    for (int64_t n = 0; n < N; n++) {
        double mx = lg[n * V];
        for (int64_t v = 1; v < V; v++)
            mx = fmax(mx, lg[n * V + v]);
        double s = 0;
        for (int64_t v = 0; v < V; v++)
            s += exp(lg[n * V + v] - mx);
        lse[n] = (float)(mx + log(s));
        total += lse[n] - lg[n * V + tg[n]];
    }
    loss[0] = (float)(total / (double)N);
}

static void k_ce_bwd(const float *dl, const float *lg, const int32_t *tg, const float *lse, float *d,
                     int64_t N, int64_t V)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t v = 0; v < V; v++)
            d[n * V + v] = (float)(dl[0] / (double)N *
                                   (exp(lg[n * V + v] - lse[n]) - (v == tg[n] ? 1.0 : 0.0)));
}

static void k_rms_fwd(const float *x, const float *w, float *y, float *rstd, int64_t N, int64_t D,
                      float eps)
{
    for (int64_t n = 0; n < N; n++) {
        double s = 0;
        for (int64_t d = 0; d < D; d++)
            s += (double)x[n * D + d] * x[n * D + d];
        rstd[n] = (float)(1.0 / sqrt(s / (double)D + eps));
        for (int64_t d = 0; d < D; d++)
            y[n * D + d] = x[n * D + d] * rstd[n] * w[d];
    }
}

static void k_rms_bwd(const float *dy, const float *x, const float *w, const float *rstd, float *dx,
                      float *dw, int64_t N, int64_t D)
{
    for (int64_t d = 0; d < D; d++)
        dw[d] = 0;
    for (int64_t n = 0; n < N; n++) {
        double dot = 0;
        for (int64_t d = 0; d < D; d++) {
            double xh = x[n * D + d] * rstd[n];
            dw[d] += (float)(dy[n * D + d] * xh);
            dot += dy[n * D + d] * w[d] * xh;
        }
        for (int64_t d = 0; d < D; d++) {
            double xh = x[n * D + d] * rstd[n];
            dx[n * D + d] = (float)(rstd[n] * (dy[n * D + d] * w[d] - xh * dot / (double)D));
        }
    }
}

/* Runs every node of one phase through the references. */
static void tx_phase(tx *x, int phase)
{
    const ir_graph *g = x->g;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        if (n->phase != phase)
            continue;
        int count;
        const ir_ref *t = iop_template(n, &count);
        void *p[PLAN_MAX_KERNEL_ARGS] = {0};
        int64_t i[PLAN_MAX_KERNEL_ARGS] = {0};
        double f[PLAN_MAX_KERNEL_ARGS] = {0};
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0)
                p[a] = tx_f(x, v);
            else if (t[a].kind == IR_REF_DIM)
                i[a] = n->dims[t[a].index];
            else if (t[a].kind == IR_REF_ATTR)
                f[a] = n->attrs[t[a].index].f;
        }
        const char *s = iop_symbol(n);
        if (!strcmp(s, "moek_embedding_fwd")) {
            const int32_t *ids = p[0];
            for (int64_t r = 0; r < i[3]; r++)
                memcpy((float *)p[2] + r * i[5], (float *)p[1] + ids[r] * i[5], sizeof(float) * (size_t)i[5]);
        } else if (!strcmp(s, "moek_embedding_bwd")) {
            const int32_t *ids = p[1];
            float *dt = p[2];
            memset(dt, 0, sizeof(float) * (size_t)(i[4] * i[5]));
            for (int64_t r = 0; r < i[3]; r++)
                for (int64_t d = 0; d < i[5]; d++)
                    dt[ids[r] * i[5] + d] += ((float *)p[0])[r * i[5] + d];
        } else if (!strcmp(s, "moek_matmul_fwd")) {
            k_matmul_fwd(p[0], p[1], p[2], i[3], i[4], i[5]);
        } else if (!strcmp(s, "moek_matmul_bwd")) {
            k_matmul_bwd(p[0], p[1], p[2], p[3], p[4], i[5], i[6], i[7]);
        } else if (!strcmp(s, "moek_rmsnorm_fwd")) {
            k_rms_fwd(p[0], p[1], p[2], p[3], i[4], i[5], (float)f[6]);
        } else if (!strcmp(s, "moek_rmsnorm_bwd")) {
            k_rms_bwd(p[0], p[1], p[2], p[3], p[4], p[5], i[6], i[7]);
        } else if (!strcmp(s, "moek_cross_entropy_fwd")) {
            k_ce_fwd(p[0], p[1], p[2], p[3], i[4], i[5]);
        } else if (!strcmp(s, "moek_cross_entropy_bwd")) {
            k_ce_bwd(p[0], p[1], p[2], p[3], p[4], i[5], i[6]);
        } else if (!strcmp(s, "moek_add_fwd")) {
            for (int64_t k = 0; k < i[3]; k++)
                ((float *)p[2])[k] = ((float *)p[0])[k] + ((float *)p[1])[k];
        } else if (!strcmp(s, "moek_fill")) {
            for (int64_t k = 0; k < i[1]; k++)
                ((float *)p[0])[k] = (float)f[2];
        } else if (!strcmp(s, "moek_accumulate")) {
            for (int64_t k = 0; k < i[2]; k++)
                ((float *)p[0])[k] += ((float *)p[1])[k];
        } else if (!strcmp(s, "moek_sumsq_accum")) {
            double acc = 0;
            for (int64_t k = 0; k < i[2]; k++)
                acc += (double)((float *)p[0])[k] * ((float *)p[0])[k];
            ((float *)p[1])[0] += (float)acc;
        } else if (!strcmp(s, "moek_adamw")) {
            float *pp = p[0], *gg = p[1], *m = p[2], *v = p[3];
            const float *h = p[5];
            for (int64_t k = 0; k < i[4]; k++) {
                m[k] = h[1] * m[k] + (1 - h[1]) * gg[k];
                v[k] = h[2] * v[k] + (1 - h[2]) * gg[k] * gg[k];
                double mh = m[k] / h[4], vh = v[k] / h[5];
                pp[k] -= (float)(h[0] * (mh / (sqrt(vh) + h[3]) + f[7] * pp[k]));
            }
        } else {
            x->unknown++;
            printf("# no reference kernel for %s\n", s);
        }
    }
}

/* forward + backward once with loss_seed = 1 */
static double tx_step(tx *x, int seed, int loss, bool backward)
{
    tx_f(x, seed)[0] = 1.0f;
    tx_phase(x, PLAN_PHASE_FORWARD);
    if (backward)
        tx_phase(x, PLAN_PHASE_BACKWARD);
    return tx_f(x, loss)[0];
}

static int find_role(const ir_graph *g, int role)
{
    for (int v = 0; v < g->nvalues; v++)
        if (g->values[v].role == role)
            return v;
    return -1;
}

static void run_case(const char *label, ir_graph *g, tg_ids *t)
{
    moec_error err;
    char name[160];
    snprintf(name, sizeof name, "%s: compiles", label);
    CHECK(name, tg_compile(g, &err) == 0, "%s", err.msg);
    tx x;
    memset(&x, 0, sizeof x);
    x.g = g;
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        x.pool[s] = calloc(1, (size_t)g->pool_bytes[s] + 64);
    /* deterministic data and weights; the memory plan decides where they live */
    int32_t *tok = (int32_t *)tx_f(&x, t->tokens), *tgt = (int32_t *)tx_f(&x, t->targets);
    for (int k = 0; k < TG_N; k++) {
        tok[k] = (k * 3 + 1) % TG_V;
        tgt[k] = (k * 2 + 3) % TG_V;
    }
    unsigned seed_state = 12345;
    for (int p = 0; p < g->nparams; p++) {
        if (g->params[p].tied_to >= 0)
            continue;
        float *w = tx_f(&x, g->params[p].value);
        for (int64_t k = 0; k < ir_value_numel(&g->values[g->params[p].value]); k++) {
            seed_state = seed_state * 1103515245u + 12345u;
            w[k] = ((float)((seed_state >> 16) & 0x7fff) / 32768.0f - 0.5f);
        }
    }
    int seed = find_role(g, PLAN_ROLE_LOSS_SEED);
    tx_step(&x, seed, t->loss, true);
    snprintf(name, sizeof name, "%s: every kernel has a reference", label);
    CHECK(name, x.unknown == 0, "%d unknown", x.unknown);

    /* analytic grads (GRAD pool after one accumulate) vs central differences */
    double worst = 0;
    int checked = 0;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->tied_to >= 0 || pp->grad < 0)
            continue;
        float *w = tx_f(&x, pp->value), *gr = tx_f(&x, pp->grad);
        for (int64_t k = 0; k < ir_value_numel(&g->values[pp->value]); k++) {
            float keep = w[k];
            const float h = 1e-2f;
            w[k] = keep + h;
            double up = tx_step(&x, seed, t->loss, false);
            w[k] = keep - h;
            double dn = tx_step(&x, seed, t->loss, false);
            w[k] = keep;
            double fd = (up - dn) / (2.0 * h);
            double e = fabs(fd - gr[k]) / (1e-3 + fabs(fd));
            if (e > worst)
                worst = e;
            checked++;
        }
    }
    snprintf(name, sizeof name, "%s: grads match finite differences", label);
    CHECK(name, checked > 20 && worst < 2e-2, "worst relative error %g over %d weights", worst,
          checked);

    /* a second micro-step accumulates: grads double */
    int w1g = g->params[g->values[t->w1].param].grad;
    float before = tx_f(&x, w1g)[1];
    tx_step(&x, seed, t->loss, true);
    snprintf(name, sizeof name, "%s: grads accumulate over micro-steps", label);
    CHECK(name, check_close(tx_f(&x, w1g)[1], 2 * before, 1e-6, 1e-5) && before != 0,
          "%g vs 2 x %g", tx_f(&x, w1g)[1], before);

    /* one AdamW step: first step moves each weight by lr*(sign(g) + wd*w) */
    float *hyper = tx_f(&x, find_role(g, PLAN_ROLE_HYPER));
    const float hv[8] = {0.01f, 0.9f, 0.999f, 1e-8f, 0.1f, 0.001f, 0.0f, 0.0f};
    memcpy(hyper, hv, sizeof hv);
    float w_old = tx_f(&x, t->w1)[1], g_w = tx_f(&x, w1g)[1];
    tx_phase(&x, PLAN_PHASE_OPTIMIZER);
    double want = w_old - 0.01 * ((g_w > 0 ? 1.0 : -1.0) + 0.1 * w_old);
    snprintf(name, sizeof name, "%s: adamw step with weight decay", label);
    CHECK(name, check_close(tx_f(&x, t->w1)[1], want, 1e-6, 1e-4), "%g vs %g",
          tx_f(&x, t->w1)[1], want);
    double zero = 0;
    for (int64_t k = 0; k < ir_value_numel(&g->values[w1g]); k++)
        zero += fabs(tx_f(&x, w1g)[k]);
    snprintf(name, sizeof name, "%s: grads zeroed after the step", label);
    CHECK(name, zero == 0.0, "sum |g| = %g", zero);
    float *nsq = tx_f(&x, find_role(g, PLAN_ROLE_NORM_SQ));
    snprintf(name, sizeof name, "%s: grad norm squared computed", label);
    CHECK(name, nsq[0] > 0 && isfinite(nsq[0]), "%g", nsq[0]);
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        free(x.pool[s]);
}

int main(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    run_case("chain", g, &t);
    ir_graph_free(g);
    g = tg_fanout(&t, false, true);
    run_case("fanout+tied value+rmsnorm", g, &t);
    ir_graph_free(g);
    g = tg_fanout(&t, true, false);
    run_case("tied param", g, &t);
    ir_graph_free(g);
    CHECK_DONE();
}
