/* test_compiler_examples.c - the example models through the whole compiler
 * (parser, elaborator, autodiff, optimizer, memory plan, emit) and back
 * through the runtime's own plan validator. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/explain.h"
#include "../../compiler/memplan.h"
#include "../../compiler/passes.h"
#include "../../runtime/plan_load.h"

static void one(const char *root, const char *model, const char *tmpdir)
{
    char path[1024], stdlib_dir[1024], out[1024], name[160];
    snprintf(path, sizeof path, "%s/examples/%s.moe", root, model);
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    snprintf(out, sizeof out, "%s/%s.bin", tmpdir, model);
    if (access(path, R_OK) != 0) {
        snprintf(name, sizeof name, "examples: %s", model);
        SKIP(name, "%s not found", path);
        return;
    }
    diag_ctx *d = diag_new(stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    ir_graph *g = elaborate(path, &opt, d);
    snprintf(name, sizeof name, "examples: %s elaborates", model);
    CHECK(name, g != NULL, "elaboration failed (errors above)");
    if (!g) {
        diag_free(d);
        return;
    }
    int nfwd = g->nnodes;
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = pass_autodiff(g, &err);
    if (rc == 0)
        rc = pass_optimizer(g, &err);
    if (rc == 0)
        rc = pass_memplan(g, &err);
    snprintf(name, sizeof name, "examples: %s passes", model);
    CHECK(name, rc == 0, "%s", err.msg);
    int nbwd = 0, nopt = 0;
    for (int i = 0; i < g->nnodes; i++) {
        nbwd += g->nodes[i].phase == PLAN_PHASE_BACKWARD;
        nopt += g->nodes[i].phase == PLAN_PHASE_OPTIMIZER;
    }
    snprintf(name, sizeof name, "examples: %s has backward and optimizer ops", model);
    CHECK(name, nbwd >= nfwd / 2 && nopt >= 3 * g->nparams, "fwd %d bwd %d opt %d", nfwd, nbwd,
          nopt);
    char why[512] = "";
    snprintf(name, sizeof name, "examples: %s memory plan verifies", model);
    CHECK(name, memplan_verify(g, why, sizeof why) == 0, "%s", why);
    uint64_t acts = 0;
    for (int v = 0; v < g->nvalues; v++)
        if (g->values[v].pool == PLAN_ST_ACT)
            acts += memplan_size(&g->values[v]);
    snprintf(name, sizeof name, "examples: %s reuses activation memory", model);
    CHECK(name, (uint64_t)g->pool_bytes[PLAN_ST_ACT] < acts / 2, "pool %" PRId64 " sum %" PRIu64,
          g->pool_bytes[PLAN_ST_ACT], acts);
    snprintf(name, sizeof name, "examples: %s emits", model);
    CHECK(name, pass_emit(g, out, &err) == 0, "%s", err.msg);
    plan_file pf;
    char perr[512] = "";
    snprintf(name, sizeof name, "examples: %s plan passes the runtime's validation", model);
    int lrc = plan_load(out, &pf, perr, sizeof perr);
    CHECK(name, lrc == 0, "%s", perr);
    if (lrc == 0) {
        explain_counts c;
        explain_count(g, &c);
        snprintf(name, sizeof name, "examples: %s plan counts", model);
        CHECK(name, pf.train->param_count == c.params && pf.train->flops_per_token == c.flops_per_token &&
              pf.ntensors > 0 && pf.nops == (uint64_t)g->nnodes, "params %" PRIu64 " vs %" PRIu64,
              pf.train->param_count, c.params);
        plan_close(&pf);
    }
    unlink(out);
    ir_graph_free(g);
    diag_free(d);
}

int main(void)
{
    const char *root = getenv("ROOT") ? getenv("ROOT") : ".";
    char tmp[] = "/tmp/moec-examples-XXXXXX";
    if (!mkdtemp(tmp)) {
        CHECK("examples: temp folder", 0, "mkdtemp failed");
        CHECK_DONE();
    }
    one(root, "tiny_dense", tmp);
    one(root, "tiny_moe", tmp);
    rmdir(tmp);
    CHECK_DONE();
}
