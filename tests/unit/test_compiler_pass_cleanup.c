/* test_compiler_pass_cleanup.c - dce, cse, inplace and schedule on
 * hand-built graphs (tests/unit/test_compiler_graphs.h), before and after. */
#include <string.h>

#include "check.h"
#include "test_compiler_graphs.h"
#include "../../compiler/memplan.h"
#include "../../compiler/pass_util.h"

static int count_what(const ir_graph *g, const char *suffix)
{
    int n = 0;
    size_t k = strlen(suffix);
    for (int i = 0; i < g->nnodes; i++) {
        size_t len = g->nodes[i].what ? strlen(g->nodes[i].what) : 0;
        n += len >= k && strcmp(g->nodes[i].what + len - k, suffix) == 0;
    }
    return n;
}

/* a planted dead forward op, a dead backward op and a metric nobody reads */
static void dce(void)
{
    tg_ids t;
    ir_graph *g = tg_chain(&t);
    int dead = tg_value(g, "dead", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int ins[] = {t.h, t.w1}, outs[] = {dead};
    int64_t dims[] = {TG_N, TG_D, TG_D};
    tg_node(g, tg_def_matmul(g), ins, outs, dims, 0, 7);
    int metric = tg_value(g, "metric", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    g->values[metric].role = PLAN_ROLE_METRIC;
    int outs2[] = {metric};
    tg_node(g, tg_def_matmul(g), ins, outs2, dims, 0, 8);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_autodiff(g, &err) || pass_optimizer(g, &err);
    /* a backward op whose gradients nothing reads: a second matmul backward */
    int bwd = tg_bwd_of(g, t.n_mm1);
    ir_node copy = g->nodes[bwd];
    for (int i = 0; i < IR_MAX_PORTS; i++)
        if (copy.grads_out[i] >= 0)
            copy.grads_out[i] = ir_value_add(g, "d.spare", PLAN_F32, PLAN_ST_ACT, g->values[copy.grads_out[i]].ndim,
                                             g->values[copy.grads_out[i]].shape);
    ir_node_add(g, &copy);
    int before = g->nnodes, mm = tg_count_def(g, "matmul");
    rc |= pass_dce(g, &err);
    int after = g->nnodes;
    bool metric_kept = false, dead_gone = true;
    for (int i = 0; i < g->nnodes; i++) {
        metric_kept |= g->nodes[i].outputs[0] == metric;
        dead_gone &= g->nodes[i].outputs[0] != dead;
    }
    CHECK("dce: removes the dead forward op and the dead backward op, keeps the metric",
          rc == 0 && before - after == 2 && dead_gone && metric_kept && tg_count_def(g, "matmul") == mm - 2,
          "rc %d, %d -> %d nodes", rc, before, after);
    /* grad_of and producers follow the new indices */
    bool ok = true;
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        if (n->is_backward)
            ok &= n->grad_of >= 0 && n->grad_of < i && g->nodes[n->grad_of].def == n->def;
        if (!n->is_backward && n->def->noutputs > 0 && n->outputs[0] >= 0)
            ok &= g->values[n->outputs[0]].producer == i;
    }
    char why[256] = "";
    rc = pass_memplan(g, &err);
    CHECK("dce: indices stay right and the plan verifies", ok && rc == 0 && memplan_verify(g, why, sizeof why) == 0,
          "%s", why);
    int n0 = g->nnodes;
    pass_dce(g, &err);
    CHECK("dce: a second run removes nothing", g->nnodes == n0, "%d -> %d", n0, g->nnodes);
    ir_graph_free(g);
}

/* a planted duplicate matmul is merged; different attributes and recompute
 * copies are not */
static void cse(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, false, true);
    /* a2 = matmul(n, w1) again, and s = a + a2 feeds the residual */
    int a2 = tg_value(g, "a2", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int ins[] = {t.n, t.w1}, outs[] = {a2};
    int64_t dims[] = {TG_N, TG_D, TG_D};
    int dup = tg_node(g, tg_def_matmul(g), ins, outs, dims, 0, 10);
    (void)dup;
    /* a second rmsnorm with another eps: not the same op */
    int n2 = tg_value(g, "n2", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D), r2 = tg_value(g, "rstd2", PLAN_F32, PLAN_ST_ACT, TG_N, 0);
    int nin[] = {t.h, t.gnorm}, nout[] = {n2, r2};
    int64_t ndims[] = {TG_N, TG_D};
    tg_node(g, tg_def_rmsnorm(g), nin, nout, ndims, 1e-6, 11);
    /* a copy labelled as a recompute of the first rmsnorm: never merged */
    int n3 = tg_value(g, "rc.n", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D), r3 = tg_value(g, "rc.rstd", PLAN_F32, PLAN_ST_ACT, TG_N, 0);
    int nout3[] = {n3, r3};
    int rcn = tg_node(g, tg_def_rmsnorm(g), nin, nout3, ndims, 1e-5, 12);
    g->nodes[rcn].what = "rmsnorm (recompute)";
    int s = tg_value(g, "s", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int sin[] = {a2, n2}, sout[] = {s};
    int64_t sdims[] = {TG_N * TG_D};
    int sn = tg_node(g, tg_def_add(g), sin, sout, sdims, 0, 13);
    int s2 = tg_value(g, "s2", PLAN_F32, PLAN_ST_ACT, TG_N, TG_D);
    int s2in[] = {s, n3}, s2out[] = {s2};
    tg_node(g, tg_def_add(g), s2in, s2out, sdims, 0, 14);
    /* make the loss read s2: logits = matmul(s2, wte) replaces r's */
    g->nodes[t.n_mm2].inputs[0] = s2;
    /* move the loss after: nodes must stay in order, so rebuild it */
    int lo = tg_value(g, "logits2", PLAN_F32, PLAN_ST_ACT, TG_N, TG_V);
    int lin[] = {s2, t.wte}, lout[] = {lo};
    int64_t ldims[] = {TG_N, TG_D, TG_V};
    g->nodes[t.n_mm2].inputs[0] = t.r;
    tg_node(g, tg_def_matmul(g), lin, lout, ldims, 0, 15);
    int loss2 = tg_value(g, "loss2", PLAN_F32, PLAN_ST_ACT, 1, 0), lse2 = tg_value(g, "lse2", PLAN_F32, PLAN_ST_ACT, TG_N, 0);
    int cin[] = {lo, t.targets}, cout[] = {loss2, lse2};
    int64_t cdims[] = {TG_N, TG_V};
    tg_node(g, tg_def_ce(g), cin, cout, cdims, 0, 16);
    g->values[t.loss].role = PLAN_ROLE_METRIC;   /* the first loss becomes a metric */
    g->values[loss2].role = PLAN_ROLE_LOSS;
    g->loss = loss2;
    int before = g->nnodes, mm = tg_count_def(g, "matmul"), norms = tg_count_def(g, "rmsnorm");
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_cse(g, &err);
    CHECK("cse: merges the duplicate matmul, its reader reads the first one",
          rc == 0 && g->nnodes == before - 1 && tg_count_def(g, "matmul") == mm - 1 &&
          g->nodes[sn - 1].inputs[0] == t.a, "%d -> %d nodes, add reads v%d (want v%d)", before, g->nnodes,
          g->nodes[sn - 1].inputs[0], t.a);
    CHECK("cse: keeps the rmsnorm with another eps and the recompute copy",
          tg_count_def(g, "rmsnorm") == norms && count_what(g, "(recompute)") == 1, "%d rmsnorms",
          tg_count_def(g, "rmsnorm"));
    char why[256] = "";
    rc = pass_autodiff(g, &err) || pass_optimizer(g, &err) || pass_memplan(g, &err);
    CHECK("cse: the merged graph differentiates and plans", rc == 0 && memplan_verify(g, why, sizeof why) == 0,
          "%s %s", err.msg, why);
    ir_graph_free(g);
}

/* recompute copies of a compiled graph survive a cse run after recompute */
static void cse_after_recompute(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, false, true);
    g->recompute = MEMPLAN_RECOMPUTE_FULL;
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_autodiff(g, &err) || pass_optimizer(g, &err) || pass_recompute(g, &err);
    int copies = count_what(g, "(recompute)"), n = g->nnodes;
    rc |= pass_cse(g, &err);
    CHECK("cse: never merges recompute copies back (run after recompute on purpose)",
          rc == 0 && copies >= 2 && count_what(g, "(recompute)") == copies && g->nnodes == n,
          "rc %d, %d copies -> %d, %d -> %d nodes", rc, copies, count_what(g, "(recompute)"), n, g->nnodes);
    ir_graph_free(g);
}

static void inplace_and_schedule(void)
{
    tg_ids t;
    ir_graph *g = tg_fanout(&t, false, false);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_autodiff(g, &err) || pass_optimizer(g, &err);
    uint64_t peak0 = pu_peak_bytes(g);
    rc |= pass_schedule(g, &err);
    uint64_t peak1 = pu_peak_bytes(g);
    /* here every tensor is a few bytes (64-byte slots), so no order is
     * better and the pass must keep this one (the examples test the moves) */
    bool valid = true;
    for (int i = 0; i < g->nnodes; i++) {
        int count;
        const ir_ref *tt = iop_template(&g->nodes[i], &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(&g->nodes[i], &tt[a]);
            if (v >= 0 && g->values[v].storage == PLAN_ST_ACT && !pu_writes(&g->nodes[i], &tt[a]) &&
                g->values[v].role == PLAN_ROLE_NONE)
                valid &= g->values[v].producer >= 0 && g->values[v].producer < i;
        }
    }
    CHECK("schedule: a valid order, peak no higher", rc == 0 && valid && peak1 <= peak0,
          "peak %llu -> %llu", (unsigned long long)peak0, (unsigned long long)peak1);
    rc |= pass_memplan(g, &err);
    int64_t pool0 = g->pool_bytes[PLAN_ST_ACT];
    rc |= pass_inplace(g, &err);
    rc |= pass_memplan(g, &err);
    int64_t pool1 = g->pool_bytes[PLAN_ST_ACT];
    int add = -1;
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].phase == PLAN_PHASE_FORWARD && strcmp(g->nodes[i].def->name, "add") == 0)
            add = i;
    char why[256] = "";
    /* r = h + a may take a's bytes (a dies there); the trial plan keeps the
     * rewrite only if the act pool does not grow */
    bool rewritten = add >= 0 && g->nodes[add].outputs[0] == t.a;
    CHECK("inplace: a rewrite is kept only when the act pool does not grow",
          rc == 0 && add >= 0 && pool1 <= pool0 &&
          (rewritten || (g->nodes[add].outputs[0] == t.r && g->nodes[add].inputs[1] == t.a)),
          "pool %lld -> %lld, add writes v%d", (long long)pool0, (long long)pool1,
          add >= 0 ? g->nodes[add].outputs[0] : -1);
    /* forced (or as made), it is well formed: the add reads and writes a */
    g->nodes[add].outputs[0] = t.a;
    for (int i = add + 1; i < g->nnodes; i++)
        for (int k = 0; k < IR_MAX_PORTS; k++) {
            if (g->nodes[i].inputs[k] == t.r) g->nodes[i].inputs[k] = t.a;
            if (g->nodes[i].outputs[k] == t.r) g->nodes[i].outputs[k] = t.a;
        }
    rc |= pass_memplan(g, &err);
    CHECK("inplace: the plan verifies", rc == 0 && memplan_verify(g, why, sizeof why) == 0, "%s", why);
    CHECK("inplace: the whitelist names the audited elementwise kernels",
          pass_inplace_rule(0) && strcmp(pass_inplace_rule(0), "moek_add_fwd") == 0 && pass_inplace_rule(100) == NULL,
          "%s", pass_inplace_rule(0) ? pass_inplace_rule(0) : "(null)");
    ir_graph_free(g);
}

int main(void)
{
    dce();
    cse();
    cse_after_recompute();
    inplace_and_schedule();
    CHECK_DONE();
}
