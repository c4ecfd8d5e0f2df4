/* test_moe_routing.c - stdlib/moe.moe in the compiler (bias buffers, the
 * optimizer-phase bias update, expert-load tensors, one shared hyper input)
 * and the aux-loss-free bias balancing a skewed router (kernels, fp32). */
#include <string.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/passes.h"
#include "../../kernels/moek.h"

static int find_value(const ir_graph *g, const char *name)
{
    for (int i = 0; i < g->nvalues; i++)
        if (strcmp(g->values[i].name, name) == 0)
            return i;
    return -1;
}

static void compiler_checks(void)
{
    FILE *sink = tmpfile();
    diag_ctx *d = diag_new(sink, 20);
    elab_options o = {.stdlib_dir = "stdlib"};
    ir_graph *g = elaborate("examples/deepseek_like.moe", &o, d);
    CHECK("deepseek_elaborates", g != NULL, "%d errors", diag_count(d));
    if (!g) {
        diag_free(d);
        fclose(sink);
        return;
    }
    /* the bias is a BUFFER: not trained, not a weight in the counts */
    int b = find_value(g, "layers.1.moe.bias");
    CHECK("bias_is_buffer", b >= 0 && g->values[b].storage == PLAN_ST_BUFFER && g->values[b].dtype == PLAN_F32 &&
          g->values[b].shape[0] == 16, "value %d", b);
    CHECK("bias_frozen", b >= 0 && g->values[b].param >= 0 && g->params[g->values[b].param].frozen &&
          g->params[g->values[b].param].init == PLAN_INIT_ZEROS, "param %d", b >= 0 ? g->values[b].param : -1);
    CHECK("buffers_not_counted", g->train.param_count == 141648 && g->train.active_param_count == 86352,
          "%llu / %llu", (unsigned long long)g->train.param_count,
          (unsigned long long)g->train.active_param_count);
    /* one expert load per MoE layer, [experts + 1] */
    int l1 = find_value(g, "layers.1.moe.load"), l2 = find_value(g, "layers.2.moe.load");
    CHECK("expert_load_roles", l1 >= 0 && l2 >= 0 && g->values[l1].role == PLAN_ROLE_EXPERT_LOAD &&
          g->values[l2].shape[0] == 17, "%d %d", l1, l2);
    /* the bias updates run in the optimizer phase, after every forward op */
    int nupd = 0, last_fwd = -1, first_upd = g->nnodes;
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        if (n->def->fwd_symbol && strcmp(n->def->fwd_symbol, "moek_router_bias_update") == 0) {
            nupd++;
            CHECK("update_phase", n->phase == PLAN_PHASE_OPTIMIZER && n->inputs[0] >= 0 &&
                  g->values[n->inputs[0]].storage == PLAN_ST_BUFFER, "node %d phase %d", i, n->phase);
            first_upd = i < first_upd ? i : first_upd;
        } else if (n->phase == PLAN_PHASE_FORWARD) {
            last_fwd = i;
        }
    }
    CHECK("two_updates_after_forward", nupd == 2 && first_upd > last_fwd, "%d updates, first %d, last fwd %d",
          nupd, first_upd, last_fwd);
    moec_error err;
    int rc = pass_autodiff(g, &err);
    rc = rc ? rc : pass_optimizer(g, &err);
    CHECK("passes_run", rc == 0, "%s", err.msg);
    int nhyper = 0;
    for (int i = 0; i < g->nvalues; i++)
        nhyper += g->values[i].role == PLAN_ROLE_HYPER;
    CHECK("one_hyper", nhyper == 1, "%d hyper values", nhyper);
    if (b >= 0 && rc == 0) {
        const ir_param *p = &g->params[g->values[b].param];
        CHECK("bias_no_grad_no_state", p->grad < 0 && p->state0 < 0 && p->state1 < 0, "grad %d state %d",
              p->grad, p->state0);
    }
    ir_graph_free(g);

    /* jitter reads the runtime's hyper: the optimizer reuses that one input */
    const char *src = "import \"nn\"\nconfig { vocab = 256 d_model = 16 seq = 8 }\n"
                      "model m(tokens: i32[B, seq], targets: i32[B, seq]) {\n"
                      "  x = embedding(tokens, vocab, d_model)\n"
                      "  x = x + moe(x, 4, 1, 16, router = \"topk_softmax\", jitter = 0.01, balance = 0.0)\n"
                      "  return cross_entropy(linear(x, vocab), targets)\n}\ntrain { batch = 2 }\n";
    elab_options o2 = {.stdlib_dir = "stdlib", .text = src, .text_len = strlen(src)};
    g = elaborate("jitter.moe", &o2, d);
    CHECK("jitter_elaborates", g != NULL, "%d errors", diag_count(d));
    if (g) {
        rc = pass_autodiff(g, &err);
        rc = rc ? rc : pass_optimizer(g, &err);
        int nh = 0, jit = 0;
        for (int i = 0; i < g->nvalues; i++)
            nh += g->values[i].role == PLAN_ROLE_HYPER;
        for (int i = 0; i < g->nnodes; i++)
            jit += !g->nodes[i].is_backward && g->nodes[i].def->fwd_symbol && strcmp(g->nodes[i].def->fwd_symbol, "moek_jitter_fwd") == 0;
        CHECK("jitter_shares_hyper", rc == 0 && nh == 1 && jit == 1, "rc %d hyper %d jitter ops %d", rc, nh, jit);
        ir_graph_free(g);
    }
    diag_free(d);
    fclose(sink);
}

static double cv_of(const float *load, int E)
{
    double m = 0, s = 0;
    for (int e = 0; e < E; e++)
        m += load[e];
    m /= E;
    for (int e = 0; e < E; e++)
        s += (load[e] - m) * (load[e] - m);
    return sqrt(s / E) / m;
}

/* A router whose scores favour low expert ids: the bias update alone
 * (no gradient) must spread the load. */
static void bias_balances(void)
{
    enum { N = 256, E = 8, K = 2 };
    static float scores[N * E], gates[N * K], load[E + 1];
    static int32_t idx[N * K];
    float bias[E] = {0};
    int status = 0;
    moek_ctx ctx = {.status = &status};
    uint32_t r = 12345;
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            r = r * 1664525u + 1013904223u;
            float u = (float)(r >> 8) / 16777216.0f;
            scores[n * E + e] = 1.0f / (1.0f + expf(-(u * 0.4f + 0.3f - 0.05f * (float)e)));
        }
    double cv0 = 0, cv = 0;
    int dead0 = 0, dead = 0;
    for (int step = 0; step < 200; step++) {
        moek_topk_biased_fwd(&ctx, scores, bias, idx, gates, N, E, K, 1, 1.0f);
        moek_expert_load(&ctx, idx, NULL, load, N, E, K);
        if (step == 0) {
            cv0 = cv_of(load, E);
            for (int e = 0; e < E; e++)
                dead0 += load[e] == 0;
        }
        moek_router_bias_update(&ctx, bias, load, E, 0.002f);
    }
    moek_topk_biased_fwd(&ctx, scores, bias, idx, gates, N, E, K, 1, 1.0f);
    moek_expert_load(&ctx, idx, NULL, load, N, E, K);
    cv = cv_of(load, E);
    for (int e = 0; e < E; e++)
        dead += load[e] == 0;
    printf("# aux-loss-free bias, 256 tokens top-2 of 8 skewed experts: cv %.3f -> %.3f, dead %d -> %d\n",
           cv0, cv, dead0, dead);
    CHECK("bias_skewed_start", cv0 > 0.8 && dead0 >= 1, "cv0 %.3f dead0 %d", cv0, dead0);
    CHECK("bias_balances_load", cv < 0.2 && dead == 0 && status == 0, "cv %.3f dead %d status %d", cv, dead,
          status);
    CHECK("bias_low_ids_pushed_down", bias[0] < 0 && bias[E - 1] > 0, "bias %g .. %g", bias[0], bias[E - 1]);
}

int main(void)
{
    compiler_checks();
    bias_balances();
    CHECK_DONE();
}
