/* test_compiler_recompute.c - train { recompute = none | selective | full }.
 *
 * Each example is compiled with each policy (a copy of the .moe with the key
 * added, in a temp folder).  Checks: `none` is the plan without the key;
 * peak activation bytes fall strictly none > selective > full; the plans
 * verify; every backward op reads only values made before it; and, running
 * forward + backward with the real CPU kernels (called through libffi, the
 * way ./run does) in the planned pools, every gradient and the loss are
 * bit-for-bit the same under every policy. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../compiler/explain.h"
#include "../../compiler/memplan.h"
#include "../../compiler/passes.h"
#include "plan_exec_harness.h"

static const pe_kernel rt_kernels[] = {PE_KERNELS_FWD_BWD};

/* Writes ROOT/examples/<model>.moe with `recompute = <policy>` into path;
 * policy NULL copies it unchanged.  Returns 0 on success. */
static int rt_variant(const char *root, const char *model, const char *policy, const char *path)
{
    char extra[64] = "";
    if (policy)
        snprintf(extra, sizeof extra, "recompute = %s", policy);
    return pe_variant(root, model, policy ? extra : NULL, path);
}

static ir_graph *rt_compile(const char *root, const char *path, char *why, size_t n)
{
    ir_graph *g = pe_elaborate(root, path, why, n);
    if (!g)
        return NULL;
    moec_error err;
    memset(&err, 0, sizeof err);
    if (pass_autodiff(g, &err) || pass_optimizer(g, &err) || pass_recompute(g, &err) ||
        pass_memplan(g, &err)) {
        snprintf(why, n, "%s", err.msg);
        ir_graph_free(g);
        return NULL;
    }
    return g;
}

/* Every tensor a backward op reads exists by then: produced by an earlier
 * node, or a param/input.  Returns the first offending node or -1. */
static int rt_order_bad(const ir_graph *g)
{
    for (int ni = 0; ni < g->nnodes; ni++) {
        int count;
        const ir_ref *t = iop_template(&g->nodes[ni], &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(&g->nodes[ni], &t[a]);
            if (v < 0 || g->values[v].storage != PLAN_ST_ACT)
                continue;
            int p = g->values[v].producer;
            bool writes = t[a].kind == IR_REF_DIN || (t[a].kind == IR_REF_OUT && !g->nodes[ni].is_backward);
            if (!writes && (p < 0 || p >= ni) && g->values[v].role == PLAN_ROLE_NONE)
                return ni;
        }
    }
    return -1;
}

/* Forward values that a backward-phase op still reads. */
static int rt_fwd_reads(const ir_graph *g)
{
    int n = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        if (g->nodes[ni].phase != PLAN_PHASE_BACKWARD)
            continue;
        int count;
        const ir_ref *t = iop_template(&g->nodes[ni], &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(&g->nodes[ni], &t[a]);
            if (v >= 0 && g->values[v].storage == PLAN_ST_ACT && g->values[v].producer >= 0 &&
                g->nodes[g->values[v].producer].phase == PLAN_PHASE_FORWARD)
                n++;
        }
    }
    return n;
}

/* Runs the forward and backward phases once with the CPU kernels. */
static void rt_execute(const ir_graph *g, pe_run *r)
{
    const pe_options o = {rt_kernels, sizeof rt_kernels / sizeof *rt_kernels, 1, 0, 0, 1};
    pe_execute(g, r, &o);
}

static void one(const char *root, const char *model, const char *tmp)
{
    static const char *const pol[3] = {"none", "selective", "full"};
    char path[1100], why[512] = "", name[200];
    snprintf(path, sizeof path, "%s/examples/%s.moe", root, model);
    if (access(path, R_OK) != 0) {
        snprintf(name, sizeof name, "recompute: %s", model);
        SKIP(name, "%s not found", path);
        return;
    }
    snprintf(path, sizeof path, "%s/%s.moe", tmp, model);
    rt_variant(root, model, NULL, path);
    ir_graph *base = rt_compile(root, path, why, sizeof why);
    snprintf(name, sizeof name, "recompute: %s compiles without the key", model);
    CHECK(name, base != NULL, "%s", why);
    ir_graph *g[3] = {NULL, NULL, NULL};
    uint64_t peak[3] = {0, 0, 0};
    for (int p = 0; p < 3; p++) {
        snprintf(path, sizeof path, "%s/%s_%s.moe", tmp, model, pol[p]);
        rt_variant(root, model, pol[p], path);
        g[p] = rt_compile(root, path, why, sizeof why);
        unlink(path);
        snprintf(name, sizeof name, "recompute: %s compiles with recompute = %s", model, pol[p]);
        CHECK(name, g[p] != NULL, "%s", why);
        if (!g[p])
            goto out;
        snprintf(name, sizeof name, "recompute: %s %s plan verifies", model, pol[p]);
        CHECK(name, memplan_verify(g[p], why, sizeof why) == 0, "%s", why);
        int bad = rt_order_bad(g[p]);
        snprintf(name, sizeof name, "recompute: %s %s ops read only values made before them", model,
                 pol[p]);
        CHECK(name, bad < 0, "node %d (%s)", bad, bad >= 0 ? g[p]->nodes[bad].what : "");
        peak[p] = memplan_peak_live(g[p]);
        explain_recompute rc;
        explain_recompute_cost(g[p], &rc);
        printf("# %s %-9s peak live %8" PRIu64 "  act pool %8" PRId64 "  re-run ops %2d  "
               "extra FLOPs/token %" PRIu64 " + %" PRIu64 " elementwise\n", model, pol[p], peak[p],
               g[p]->pool_bytes[PLAN_ST_ACT], rc.ops, rc.flops_dense, rc.flops_elementwise);
    }
    snprintf(path, sizeof path, "%s/%s.moe", tmp, model);
    unlink(path);
    if (!base)
        goto out;
    snprintf(name, sizeof name, "recompute: %s none is the plan without the key", model);
    CHECK(name, g[0]->recompute == MEMPLAN_RECOMPUTE_NONE && g[0]->nnodes == base->nnodes &&
          g[0]->nvalues == base->nvalues && g[0]->pool_bytes[PLAN_ST_ACT] == base->pool_bytes[PLAN_ST_ACT] &&
          memplan_peak_live(base) == peak[0], "nodes %d vs %d", g[0]->nnodes, base->nnodes);
    snprintf(name, sizeof name, "recompute: %s peak activations none > selective > full", model);
    CHECK(name, peak[0] > peak[1] && peak[1] > peak[2], "%" PRIu64 " %" PRIu64 " %" PRIu64,
          peak[0], peak[1], peak[2]);
    snprintf(name, sizeof name, "recompute: %s act pool none > selective > full", model);
    CHECK(name, g[0]->pool_bytes[PLAN_ST_ACT] > g[1]->pool_bytes[PLAN_ST_ACT] &&
          g[1]->pool_bytes[PLAN_ST_ACT] > g[2]->pool_bytes[PLAN_ST_ACT], "%" PRId64 " %" PRId64
          " %" PRId64, g[0]->pool_bytes[PLAN_ST_ACT], g[1]->pool_bytes[PLAN_ST_ACT],
          g[2]->pool_bytes[PLAN_ST_ACT]);
    int r0 = rt_fwd_reads(g[0]), r1 = rt_fwd_reads(g[1]), r2 = rt_fwd_reads(g[2]);
    snprintf(name, sizeof name, "recompute: %s backward reads fewer forward values", model);
    CHECK(name, r0 > r1 && r1 > r2, "%d %d %d", r0, r1, r2);
    explain_recompute c1, c2;
    explain_recompute_cost(g[1], &c1);
    explain_recompute_cost(g[2], &c2);
    snprintf(name, sizeof name, "recompute: %s selective re-runs no matmul, full does", model);
    CHECK(name, c1.ops > 0 && c1.flops_dense == 0 && c1.flops_elementwise > 0 && c2.ops > c1.ops &&
          c2.flops_dense > 0, "selective %d ops %" PRIu64 ", full %d ops %" PRIu64, c1.ops,
          c1.flops_dense, c2.ops, c2.flops_dense);

    /* --explain names the policy, the peak and the extra FLOPs */
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    explain_print(g[2], mem);
    fclose(mem);
    char want_peak[128], want_flops[128];
    snprintf(want_peak, sizeof want_peak, "peak activations     %12" PRIu64, peak[2]);
    snprintf(want_flops, sizeof want_flops, "extra FLOPs/token    %12" PRIu64, c2.flops_dense);
    snprintf(name, sizeof name, "recompute: %s --explain shows policy, peak and extra FLOPs", model);
    CHECK(name, text && strstr(text, "policy                       full") && strstr(text, want_peak) &&
          strstr(text, want_flops), "%s", text ? text : "(none)");
    free(text);

    /* the numbers: same loss and gradients, bit for bit */
    pe_run run[3];
    for (int p = 0; p < 3; p++)
        rt_execute(g[p], &run[p]);
    snprintf(name, sizeof name, "recompute: %s runs on the CPU kernels", model);
    CHECK(name, run[0].unknown + run[1].unknown + run[2].unknown == 0 && run[0].status == 0 &&
          run[1].status == 0 && run[2].status == 0 && isfinite(run[0].loss[0]) && run[0].loss[0] > 0,
          "unknown %d status %d loss %g", run[0].unknown, run[0].status, run[0].loss[0]);
    for (int p = 1; p < 3; p++) {
        int differ = 0, checked = 0;
        double gsum = 0;
        for (int k = 0; k < g[0]->nparams; k++) {
            const ir_param *a = &g[0]->params[k], *b = &g[p]->params[k];
            if (a->grad < 0 || a->tied_to >= 0)
                continue;
            const float *ga = pe_ptr(g[0], &run[0], a->grad), *gb = pe_ptr(g[p], &run[p], b->grad);
            size_t bytes = ir_value_bytes(&g[0]->values[a->grad]);
            differ += memcmp(ga, gb, bytes) != 0;
            for (size_t e = 0; e < bytes / sizeof(float); e++)
                gsum += fabs(ga[e]);
            checked++;
        }
        snprintf(name, sizeof name, "recompute: %s %s gives the same loss and grads bit for bit",
                 model, pol[p]);
        CHECK(name, differ == 0 && checked > 10 && gsum > 0 &&
              memcmp(&run[0].loss[0], &run[p].loss[0], sizeof(float)) == 0,
              "%d of %d grads differ; loss %.9g vs %.9g", differ, checked, run[0].loss[0], run[p].loss[0]);
    }
    for (int p = 0; p < 3; p++)
        pe_free(&run[p]);
out:
    for (int p = 0; p < 3; p++)
        ir_graph_free(g[p]);
    ir_graph_free(base);
}

/* A hand-set unknown policy is an internal error, not a crash. */
static void bad_policy(const char *root, const char *tmp)
{
    char path[1100], why[512] = "";
    snprintf(path, sizeof path, "%s/bad.moe", tmp);
    if (rt_variant(root, "tiny_dense", NULL, path) != 0) {
        SKIP("recompute: unknown policy is an error", "no tiny_dense example");
        return;
    }
    char stdlib_dir[1024];
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    diag_ctx *d = diag_new(stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    ir_graph *g = elaborate(path, &opt, d);
    unlink(path);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = g ? pass_autodiff(g, &err) : -1;
    if (g && rc == 0) {
        g->recompute = 7;
        rc = pass_recompute(g, &err);
        snprintf(why, sizeof why, "%s", err.msg);
    }
    CHECK("recompute: unknown policy is an error", rc == -1 && strstr(why, "unknown recompute policy 7"),
          "rc %d: %s", rc, why);
    ir_graph_free(g);
    diag_free(d);
}

int main(void)
{
    const char *root = getenv("ROOT") ? getenv("ROOT") : ".";
    char tmp[] = "/tmp/moec-recompute-XXXXXX";
    if (!mkdtemp(tmp)) {
        CHECK("recompute: temp folder", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    one(root, "tiny_dense", tmp);
    one(root, "tiny_moe", tmp);
    bad_policy(root, tmp);
    rmdir(tmp);
    CHECK_DONE();
}
