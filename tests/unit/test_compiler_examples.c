/* test_compiler_examples.c - the example models through the whole compiler
 * (parser, elaborator, autodiff, optimizer, memory plan, emit) and back
 * through the runtime's own plan validator; and the GPU workspace figure
 * of fused plans against what the CUDA fused kernels need. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/explain.h"
#include "../../compiler/fuse.h"
#include "../../compiler/internal_ops.h"
#include "../../compiler/memplan.h"
#include "../../compiler/passes.h"
#include "../../runtime/plan_load.h"

/* Elaborates path with the tree's stdlib; NULL (errors on stderr) on failure. */
static ir_graph *ex_elaborate(const char *root, const char *path, diag_ctx *d)
{
    char stdlib_dir[1024];
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    return elaborate(path, &opt, d);
}

static void one(const char *root, const char *model, const char *tmpdir)
{
    char path[1024], out[1024], name[160];
    snprintf(path, sizeof path, "%s/examples/%s.moe", root, model);
    snprintf(out, sizeof out, "%s/%s.bin", tmpdir, model);
    if (access(path, R_OK) != 0) {
        snprintf(name, sizeof name, "examples: %s", model);
        SKIP(name, "%s not found", path);
        return;
    }
    diag_ctx *d = diag_new(stderr, 20);
    ir_graph *g = ex_elaborate(root, path, d);
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

/* The GPU workspace figure (explain_gpu_workspace_bytes) against what the
 * CUDA fused kernels check for (kernels/cuda/fused.cu): swiglu_proj_bwd
 * 2 x round256(NM) + NK, matmul_bias_gelu_bwd NM elements of the storage
 * type, softmax_topk_bwd NE floats; attention_bwd's D, B*H*T floats; and,
 * for a half plan, far below the CPU figure (which widens every half
 * tensor). */
static int64_t ex_round256(int64_t b) { return (b + 255) / 256 * 256; }

static void gpu_workspace_pass(const char *root, const char *rel, int half, int fuse)
{
    char path[1024], name[200];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    diag_ctx *d = diag_new(stderr, 20);
    ir_graph *g = ex_elaborate(root, path, d);
    moec_error err;
    memset(&err, 0, sizeof err);
    int rc = !g || (fuse && pass_fuse(g, &err)) || pass_autodiff(g, &err) || pass_optimizer(g, &err) ||
             pass_memplan(g, &err);
    snprintf(name, sizeof name, "workspace: %s compiles %s fusion", rel, fuse ? "with" : "without");
    CHECK(name, rc == 0, "%s", g ? err.msg : "elaboration failed");
    if (rc) {
        ir_graph_free(g);
        diag_free(d);
        return;
    }
    int64_t need = 0, att = 0;
    int nfused = 0, natt = 0;
    for (int i = 0; i < g->nnodes; i++) {
        const char *sym = iop_symbol(&g->nodes[i]);
        int count;
        const ir_ref *t = iop_template(&g->nodes[i], &count);
        int a0 = count > 0 ? iop_ref_value(&g->nodes[i], &t[0]) : -1;
        int a1 = count > 1 ? iop_ref_value(&g->nodes[i], &t[1]) : -1;
        if (!sym || a0 < 0 || a1 < 0)
            continue;
        int64_t n0 = ir_value_numel(&g->values[a0]), n1 = ir_value_numel(&g->values[a1]);
        int64_t es = (int64_t)plan_dtype_size(g->values[a0].dtype), b;
        if (strncmp(sym, "moek_swiglu_proj_bwd", 20) == 0)
            b = 2 * ex_round256(n0 * es) + n1 * es;
        else if (strncmp(sym, "moek_matmul_bias_gelu_bwd", 25) == 0)
            b = n0 * es;
        else if (strncmp(sym, "moek_softmax_topk_bwd", 21) == 0)
            b = n0 * 4;
        else if (strncmp(sym, "moek_attention_bwd", 18) == 0) {
            /* D_i, one float per row: lse's size (argument 5) */
            int a5 = count > 5 ? iop_ref_value(&g->nodes[i], &t[5]) : -1;
            int64_t rows = a5 >= 0 ? ir_value_numel(&g->values[a5]) : 0;
            natt++;
            att = rows * 4 > att ? rows * 4 : att;
            continue;
        } else
            continue;
        nfused++;
        need = b > need ? b : need;
    }
    uint64_t gws = explain_gpu_workspace_bytes(g), cws = explain_workspace_bytes(g);
    snprintf(name, sizeof name, "workspace: %s on cuda covers its %d attention backward ops", rel, natt);
    CHECK(name, natt > 0 && gws >= (uint64_t)att, "gpu figure %" PRIu64 ", attention needs %" PRId64, gws, att);
    if (!fuse) {   /* attention is then the only op with scratch: the figure is its own */
        snprintf(name, sizeof name, "workspace: %s without fusion on cuda is attention's D plus alignment", rel);
        CHECK(name, nfused == 0 && att > 0 && gws == (uint64_t)att + 256, "gpu figure %" PRIu64 ", D %" PRId64,
              gws, att);
        ir_graph_free(g);
        diag_free(d);
        return;
    }
    snprintf(name, sizeof name, "workspace: %s on cuda covers its %d fused backward ops", rel, nfused);
    CHECK(name, nfused > 0 && gws >= (uint64_t)need, "gpu figure %" PRIu64 ", the largest needs %" PRId64,
          gws, need);
    printf("# %s: workspace cpu %" PRIu64 ", cuda %" PRIu64 " (largest fused need %" PRId64 ")\n", rel,
           cws, gws, need);
    if (half) {
        snprintf(name, sizeof name, "workspace: %s on cuda is under a quarter of the cpu figure", rel);
        CHECK(name, gws * 4 < cws, "cuda %" PRIu64 " cpu %" PRIu64, gws, cws);
    }
    ir_graph_free(g);
    diag_free(d);
}

static void gpu_workspace(const char *root, const char *rel, int half)
{
    gpu_workspace_pass(root, rel, half, 1);
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
    gpu_workspace(root, "examples/tiny_gelu.moe", 0);      /* matmul_bias_gelu */
    gpu_workspace(root, "examples/tiny_moe_bf16.moe", 1);  /* softmax_topk, bf16 */
    gpu_workspace(root, "examples/deepseek_like.moe", 0);
    gpu_workspace(root, "bench/models/gpt2_124m.moe", 1);  /* GPT-2 small, bf16 */
    gpu_workspace(root, "bench/models/moe_gpt2s.moe", 1);
    gpu_workspace_pass(root, "bench/models/gpt2_124m.moe", 1, 0);   /* attention alone */
    CHECK_DONE();
}
