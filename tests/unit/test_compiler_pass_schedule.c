/* test_compiler_pass_schedule.c - the optimisation levels on the examples,
 * run with the real CPU kernels.
 *
 * Each example is compiled at -O0 (autodiff, parallel, optimizer,
 * recompute, memplan), -O1 (+ cse, dce) and -O2 (+ schedule, inplace), the
 * pass order of compiler/main.c.  Checks: every plan verifies; -O2 needs no
 * more activation bytes than -O0 (peak live and act pool); schedule moved
 * something and inplace made outputs share inputs; and 3 full training
 * steps (forward, backward, AdamW; kernels called through libffi the way
 * ./run calls them, in the planned pools) give the same loss every step and
 * the same weights and gradients at the end, bit for bit.  Reordering never
 * changes a sum's order here: every kernel sees the same inputs, and the
 * ops that accumulate into one tensor (gradient sums, the grad norm) keep
 * their order through the write-after-write dependencies.
 *
 * Frozen parameters (train { freeze = (...) }): no gradient, no optimizer
 * state, no backward op whose gradients all belong to frozen weights, and
 * the weights are bit for bit unchanged after the steps. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../compiler/memplan.h"
#include "../../compiler/passes.h"
#include "plan_exec_harness.h"

/* a full training step's kernels: forward, backward, grad norm, AdamW */
static const pe_kernel ps_kernels[] = {PE_KERNELS_FWD_BWD, PE_K(moek_sumsq_accum), PE_K(moek_adamw)};

typedef int (*ps_pass)(ir_graph *, moec_error *);
/* compiler/main.c's table, by level */
static const struct { const char *name; ps_pass run; int level; } ps_pipeline[] = {
    {"cse", pass_cse, 1}, {"autodiff", pass_autodiff, 0}, {"parallel", pass_parallel, 0},
    {"optimizer", pass_optimizer, 0}, {"dce", pass_dce, 1}, {"recompute", pass_recompute, 0},
    {"schedule", pass_schedule, 2}, {"inplace", pass_inplace, 2}, {"memplan", pass_memplan, 0},
};

static ir_graph *ps_compile(const char *root, const char *path, int level, char *why, size_t n)
{
    ir_graph *g = pe_elaborate(root, path, why, n);
    if (!g)
        return NULL;
    moec_error err;
    memset(&err, 0, sizeof err);
    for (size_t i = 0; i < sizeof ps_pipeline / sizeof *ps_pipeline; i++) {
        if (ps_pipeline[i].level > level)
            continue;
        if (ps_pipeline[i].run(g, &err)) {
            snprintf(why, n, "%.40s: %.400s", ps_pipeline[i].name, err.msg);
            ir_graph_free(g);
            return NULL;
        }
    }
    return g;
}

/* steps x (forward, backward, optimizer) with fixed data and weights. */
static void ps_execute(const ir_graph *g, pe_run *r, int steps)
{
    const pe_options o = {ps_kernels, sizeof ps_kernels / sizeof *ps_kernels, steps, 1, 1, 0};
    pe_execute(g, r, &o);
}

/* Nodes whose position or arguments differ between a and b. */
static int ps_moved(const ir_graph *a, const ir_graph *b)
{
    int n = 0;
    for (int i = 0; i < a->nnodes && i < b->nnodes; i++)
        n += strcmp(a->nodes[i].def->name, b->nodes[i].def->name) != 0 ||
             memcmp(a->nodes[i].inputs, b->nodes[i].inputs, sizeof a->nodes[i].inputs) != 0;
    return n;
}

/* Ops reading and writing one value (the in-place rewrites). */
static int ps_inplace_ops(const ir_graph *g)
{
    int n = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *nd = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(nd, &count);
        bool hit = false;
        for (int a = 0; a < count && !hit; a++)
            for (int b = 0; b < count && !hit; b++) {
                int va = iop_ref_value(nd, &t[a]), vb = iop_ref_value(nd, &t[b]);
                hit = a != b && va >= 0 && va == vb && g->values[va].storage == PLAN_ST_ACT &&
                      (t[a].kind == IR_REF_OUT || t[a].kind == IR_REF_DIN);
            }
        n += hit;
    }
    return n;
}

static void levels(const char *root, const char *model, const char *tmp)
{
    char path[1100], why[512] = "", name[256];
    snprintf(path, sizeof path, "%s/examples/%s.moe", root, model);
    if (access(path, R_OK) != 0) {
        snprintf(name, sizeof name, "passes: %s", model);
        SKIP(name, "%s not found", path);
        return;
    }
    snprintf(path, sizeof path, "%s/%s.moe", tmp, model);
    pe_variant(root, model, NULL, path);
    ir_graph *g[3];
    for (int l = 0; l < 3; l++) {
        g[l] = ps_compile(root, path, l, why, sizeof why);
        snprintf(name, sizeof name, "passes: %s compiles at -O%d", model, l);
        CHECK(name, g[l] != NULL, "%s", why);
    }
    unlink(path);
    if (!g[0] || !g[1] || !g[2])
        goto out;
    for (int l = 0; l < 3; l++) {
        snprintf(name, sizeof name, "passes: %s -O%d plan verifies", model, l);
        CHECK(name, memplan_verify(g[l], why, sizeof why) == 0, "%s", why);
    }
    uint64_t p0 = memplan_peak_live(g[0]), p2 = memplan_peak_live(g[2]);
    int64_t a0 = g[0]->pool_bytes[PLAN_ST_ACT], a2 = g[2]->pool_bytes[PLAN_ST_ACT];
    printf("# %s -O0 peak %" PRIu64 " act pool %" PRId64 " ops %d | -O2 peak %" PRIu64 " act pool %"
           PRId64 " ops %d, %d in place, %d ops moved\n", model, p0, a0, g[0]->nnodes, p2, a2,
           g[2]->nnodes, ps_inplace_ops(g[2]), ps_moved(g[1], g[2]));
    snprintf(name, sizeof name, "passes: %s -O2 peak live and act pool below -O0", model);
    CHECK(name, p2 < p0 && a2 <= a0, "peak %" PRIu64 " vs %" PRIu64 ", pool %" PRId64 " vs %" PRId64,
          p2, p0, a2, a0);
    snprintf(name, sizeof name, "passes: %s -O1 changes nothing here (no dead or duplicate op)", model);
    CHECK(name, g[1]->nnodes == g[0]->nnodes && ps_moved(g[0], g[1]) == 0, "%d vs %d nodes",
          g[1]->nnodes, g[0]->nnodes);
    snprintf(name, sizeof name, "passes: %s -O2 schedules and rewrites in place", model);
    CHECK(name, ps_moved(g[1], g[2]) > 0 && ps_inplace_ops(g[2]) > 0 && ps_inplace_ops(g[0]) == 0,
          "moved %d, in place %d", ps_moved(g[1], g[2]), ps_inplace_ops(g[2]));

    /* the scheduler's main catch: each weight gradient is added into its
     * GRAD tensor right after the op that completes it, not at the end */
    int late0 = 0, late2 = 0;
    for (int l = 0; l < 3; l += 2) {
        const ir_graph *h = g[l];
        for (int i = 0; i < h->nnodes; i++) {
            if (strncmp(h->nodes[i].def->name, "__accumulate", 12) != 0)
                continue;
            int src = h->nodes[i].inputs[1], last = -1;
            for (int k = 0; k < i; k++) {
                int count;
                const ir_ref *tt = iop_template(&h->nodes[k], &count);
                for (int a = 0; a < count; a++)
                    if (iop_ref_value(&h->nodes[k], &tt[a]) == src)
                        last = k;
            }
            *(l ? &late2 : &late0) += i - last;   /* ops between the gradient and its sum */
        }
    }
    snprintf(name, sizeof name, "passes: %s -O2 accumulates gradients much earlier", model);
    CHECK(name, late0 > 0 && late2 * 4 < late0, "-O0 %d ops between, -O2 %d", late0, late2);

    enum { STEPS = 3 };
    pe_run run[3];
    for (int l = 0; l < 3; l++)
        ps_execute(g[l], &run[l], STEPS);
    snprintf(name, sizeof name, "passes: %s runs %d steps on the CPU kernels", model, STEPS);
    CHECK(name, run[0].unknown + run[1].unknown + run[2].unknown == 0 && run[0].status == 0 &&
          run[2].status == 0 && isfinite(run[0].loss[STEPS - 1]) && run[0].loss[0] > 0 &&
          run[0].loss[STEPS - 1] != run[0].loss[0],
          "unknown %d status %d loss %g -> %g", run[0].unknown, run[0].status, run[0].loss[0],
          run[0].loss[STEPS - 1]);
    for (int l = 1; l < 3; l++) {
        int differ = 0, checked = 0;
        for (int k = 0; k < g[0]->nparams; k++) {
            const ir_param *a = &g[0]->params[k], *b = &g[l]->params[k];
            if (a->tied_to >= 0)
                continue;
            differ += memcmp(pe_ptr(g[0], &run[0], a->value), pe_ptr(g[l], &run[l], b->value),
                             ir_value_bytes(&g[0]->values[a->value])) != 0;
            checked++;
            if (a->state0 >= 0)
                differ += memcmp(pe_ptr(g[0], &run[0], a->state0), pe_ptr(g[l], &run[l], b->state0),
                                 ir_value_bytes(&g[0]->values[a->state0])) != 0;
        }
        snprintf(name, sizeof name, "passes: %s -O%d = -O0 bit for bit (loss x%d, weights, Adam m)",
                 model, l, STEPS);
        CHECK(name, differ == 0 && checked > 10 && memcmp(run[0].loss, run[l].loss, sizeof run[0].loss) == 0,
              "%d of %d tensors differ; last loss %.9g vs %.9g", differ, checked,
              run[0].loss[STEPS - 1], run[l].loss[STEPS - 1]);
    }
    for (int l = 0; l < 3; l++)
        pe_free(&run[l]);
out:
    for (int l = 0; l < 3; l++)
        ir_graph_free(g[l]);
}

/* train { freeze = (...) }: frozen weights cost no backward or optimizer work */
static void frozen(const char *root, const char *tmp)
{
    char path[1100], why[512] = "";
    snprintf(path, sizeof path, "%s/fz.moe", tmp);
    if (pe_variant(root, "tiny_dense", "freeze = (\"embed.*\", \"layers.0.*\")", path) != 0) {
        SKIP("passes: freeze", "no tiny_dense example");
        return;
    }
    ir_graph *g = ps_compile(root, path, 2, why, sizeof why);
    char base_path[1100];
    snprintf(base_path, sizeof base_path, "%s/base.moe", tmp);
    pe_variant(root, "tiny_dense", NULL, base_path);
    ir_graph *base = ps_compile(root, base_path, 2, why, sizeof why);
    unlink(path);
    unlink(base_path);
    CHECK("passes: freeze compiles", g && base, "%s", why);
    if (!g || !base) {
        ir_graph_free(g);
        ir_graph_free(base);
        return;
    }
    int nfrozen = 0, bad = 0, ntrain = 0;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        const char *n = g->values[pp->value].name;
        bool want = strncmp(n, "embed.", 6) == 0 || strncmp(n, "layers.0.", 9) == 0;
        nfrozen += pp->frozen;
        ntrain += !pp->frozen;
        bad += want != pp->frozen || (pp->frozen && (pp->grad >= 0 || pp->state0 >= 0));
    }
    CHECK("passes: freeze marks exactly the matching params, without grads or state",
          bad == 0 && nfrozen >= 10 && ntrain >= 10, "%d wrong, %d frozen", bad, nfrozen);
    /* no backward op whose wanted gradients are all of frozen weights (or of
     * values that only lead to them): layer 0 and the embedding have none */
    int layer0_bwd = 0, optimizer_ops_frozen = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        if (n->is_backward && n->what && strncmp(n->what, "layers.0.", 9) == 0)
            layer0_bwd++;
        if (n->phase == PLAN_PHASE_OPTIMIZER)
            for (int i = 0; i < n->def->ninputs; i++)
                if (n->inputs[i] >= 0 && g->values[n->inputs[i]].param >= 0 &&
                    g->params[g->values[n->inputs[i]].param].frozen)
                    optimizer_ops_frozen++;
    }
    CHECK("passes: freeze leaves no backward op in layer 0 and no optimizer op on frozen weights",
          layer0_bwd == 0 && optimizer_ops_frozen == 0 && g->nnodes < base->nnodes,
          "%d layer-0 backward ops, %d optimizer reads; %d vs %d ops", layer0_bwd,
          optimizer_ops_frozen, g->nnodes, base->nnodes);
    pe_run r;
    ps_execute(g, &r, 3);
    /* the initial weights again, for comparison */
    pe_run init;
    ps_execute(g, &init, 0);
    int changed_frozen = 0, changed_train = 0;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->tied_to >= 0)
            continue;
        int same = memcmp(pe_ptr(g, &r, pp->value), pe_ptr(g, &init, pp->value),
                          ir_value_bytes(&g->values[pp->value])) == 0;
        if (pp->frozen)
            changed_frozen += !same;
        else
            changed_train += !same;
    }
    CHECK("passes: frozen weights unchanged after 3 steps, the others trained",
          r.unknown == 0 && r.status == 0 && changed_frozen == 0 && changed_train == ntrain &&
          r.loss[2] < r.loss[0], "%d frozen changed, %d of %d trained changed, loss %g -> %g",
          changed_frozen, changed_train, ntrain, r.loss[0], r.loss[2]);
    pe_free(&r);
    pe_free(&init);
    ir_graph_free(g);
    ir_graph_free(base);
}

int main(void)
{
    const char *root = getenv("ROOT") ? getenv("ROOT") : ".";
    char tmp[] = "/tmp/moec-passes-XXXXXX";
    if (!mkdtemp(tmp)) {
        CHECK("passes: temp folder", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    levels(root, "tiny_dense", tmp);
    levels(root, "tiny_moe", tmp);
    frozen(root, tmp);
    rmdir(tmp);
    CHECK_DONE();
}
