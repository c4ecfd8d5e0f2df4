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
#include <ffi.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/internal_ops.h"
#include "../../compiler/memplan.h"
#include "../../compiler/passes.h"
#include "../../kernels/moek.h"

typedef void (*ps_fn)(void);
#define K(name) {#name, (ps_fn)name}
static const struct { const char *sym; ps_fn fn; } ps_kernels[] = {
    K(moek_fill), K(moek_copy), K(moek_add_fwd), K(moek_accumulate), K(moek_scale_fwd),
    K(moek_scale_bwd), K(moek_gelu_fwd), K(moek_gelu_bwd), K(moek_swiglu_fwd), K(moek_swiglu_bwd),
    K(moek_embedding_fwd), K(moek_embedding_bwd), K(moek_matmul_fwd), K(moek_matmul_bwd),
    K(moek_rmsnorm_fwd), K(moek_rmsnorm_bwd), K(moek_rope_fwd), K(moek_rope_bwd),
    K(moek_attention_fwd), K(moek_attention_bwd), K(moek_cross_entropy_fwd),
    K(moek_cross_entropy_bwd), K(moek_softmax_fwd), K(moek_softmax_bwd), K(moek_topk_fwd),
    K(moek_topk_bwd), K(moek_balance_loss_fwd), K(moek_balance_loss_bwd), K(moek_zloss_fwd),
    K(moek_zloss_bwd), K(moek_dispatch_fwd), K(moek_dispatch_bwd), K(moek_grouped_matmul_fwd),
    K(moek_grouped_matmul_bwd), K(moek_combine_fwd), K(moek_combine_bwd), K(moek_sumsq_accum),
    K(moek_adamw), K(moek_expert_load),
};

typedef int (*ps_pass)(ir_graph *, moec_error *);
/* compiler/main.c's table, by level */
static const struct { const char *name; ps_pass run; int level; } ps_pipeline[] = {
    {"cse", pass_cse, 1}, {"autodiff", pass_autodiff, 0}, {"parallel", pass_parallel, 0},
    {"optimizer", pass_optimizer, 0}, {"dce", pass_dce, 1}, {"recompute", pass_recompute, 0},
    {"schedule", pass_schedule, 2}, {"inplace", pass_inplace, 2}, {"memplan", pass_memplan, 0},
};

/* Copies ROOT/examples/<model>.moe to path, with `extra` added to train { }. */
static int ps_variant(const char *root, const char *model, const char *extra, const char *path)
{
    char src[1024];
    snprintf(src, sizeof src, "%s/examples/%s.moe", root, model);
    FILE *in = fopen(src, "r"), *out = fopen(path, "w");
    if (!in || !out) {
        if (in)
            fclose(in);
        if (out)
            fclose(out);
        return -1;
    }
    char line[4096];
    while (fgets(line, sizeof line, in)) {
        if (extra && strncmp(line, "train {", 7) == 0)
            fprintf(out, "train { %s\n%s", extra, line + 7);
        else
            fputs(line, out);
    }
    fclose(in);
    fclose(out);
    return 0;
}

static ir_graph *ps_compile(const char *root, const char *path, int level, char *why, size_t n)
{
    char stdlib_dir[1024];
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    diag_ctx *d = diag_new(stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    ir_graph *g = elaborate(path, &opt, d);
    diag_free(d);
    if (!g) {
        snprintf(why, n, "%s does not elaborate", path);
        return NULL;
    }
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

typedef struct ps_run {
    unsigned char *pool[PLAN_ST_COUNT];
    float loss[8];
    int unknown, status;
} ps_run;

static void *ps_ptr(const ir_graph *g, ps_run *r, int v)
{
    return r->pool[g->values[v].pool] + g->values[v].offset;
}

static void ps_call(const ir_graph *g, ps_run *r, const moek_ctx *ctx, const ir_node *n)
{
    const char *sym = iop_symbol(n);
    ps_fn fn = NULL;
    for (size_t k = 0; k < sizeof ps_kernels / sizeof *ps_kernels; k++)
        if (strcmp(ps_kernels[k].sym, sym) == 0)
            fn = ps_kernels[k].fn;
    if (!fn) {
        printf("# no kernel %s\n", sym);
        r->unknown++;
        return;
    }
    int count;
    const ir_ref *t = iop_template(n, &count);
    ffi_type *types[PLAN_MAX_KERNEL_ARGS + 1];
    void *vals[PLAN_MAX_KERNEL_ARGS + 1];
    union { void *p; int64_t i; float f; double d; } slot[PLAN_MAX_KERNEL_ARGS + 1];
    types[0] = &ffi_type_pointer;
    vals[0] = &ctx;
    for (int a = 0; a < count; a++) {
        int v = iop_ref_value(n, &t[a]);
        vals[a + 1] = &slot[a];
        if (v >= 0) {
            slot[a].p = ps_ptr(g, r, v);
            types[a + 1] = &ffi_type_pointer;
        } else if (t[a].kind == IR_REF_DIM) {
            slot[a].i = n->dims[t[a].index];
            types[a + 1] = &ffi_type_sint64;
        } else if (t[a].kind == IR_REF_INT) {
            slot[a].i = t[a].i;
            types[a + 1] = &ffi_type_sint64;
        } else if (t[a].kind == IR_REF_FLOAT) {
            slot[a].f = (float)t[a].f;
            types[a + 1] = &ffi_type_float;
        } else if (n->def->attr_kinds[t[a].index] == PLAN_ARG_I64) {
            slot[a].i = n->attrs[t[a].index].i;
            types[a + 1] = &ffi_type_sint64;
        } else {
            slot[a].f = (float)n->attrs[t[a].index].f;
            types[a + 1] = &ffi_type_float;
        }
    }
    ffi_cif cif;
    if (ffi_prep_cif(&cif, FFI_DEFAULT_ABI, (unsigned)count + 1, &ffi_type_void, types) != FFI_OK) {
        r->unknown++;
        return;
    }
    ffi_call(&cif, fn, NULL, vals);
}

/* steps x (forward, backward, optimizer) with fixed data and weights. */
static void ps_execute(const ir_graph *g, ps_run *r, int steps)
{
    memset(r, 0, sizeof *r);
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        r->pool[s] = calloc(1, (size_t)g->pool_bytes[s] + PLAN_ALIGN);
    unsigned st = 4242;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *val = &g->values[v];
        if (val->pool < 0)
            continue;
        int64_t n = ir_value_numel(val);
        if (val->role == PLAN_ROLE_TOKENS || val->role == PLAN_ROLE_TARGETS) {
            int32_t *ids = ps_ptr(g, r, v);
            for (int64_t k = 0; k < n; k++)
                ids[k] = (int32_t)((k * (val->role == PLAN_ROLE_TOKENS ? 7 : 13) + 3) % g->train.vocab);
        } else if (val->role == PLAN_ROLE_LOSS_SEED) {
            *(float *)ps_ptr(g, r, v) = 1.0f;
        } else if (val->role == PLAN_ROLE_HYPER) {
            float *h = ps_ptr(g, r, v);
            h[MOEK_HYPER_LR] = 1e-3f;
            h[MOEK_HYPER_BETA1] = 0.9f;
            h[MOEK_HYPER_BETA2] = 0.95f;
            h[MOEK_HYPER_EPS] = 1e-8f;
            h[MOEK_HYPER_BC1] = 0.1f;
            h[MOEK_HYPER_BC2] = 0.05f;
            h[MOEK_HYPER_MAX_NORM] = 1.0f;
        } else if (val->storage == PLAN_ST_PARAM && val->param >= 0 &&
                   g->params[val->param].tied_to < 0) {
            float *w = ps_ptr(g, r, v);
            for (int64_t k = 0; k < n; k++) {
                st = st * 1103515245u + 12345u;
                float u = (float)((st >> 16) & 0x7fff) / 32768.0f - 0.5f;
                w[k] = val->ndim == 1 ? 1.0f + 0.2f * u : 0.2f * u;
            }
        }
    }
    moek_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    char err[256];
    if (moek_device_init(&ctx, 0, 1 << 20, err, sizeof err) != 0) {
        r->status = -1;
        return;
    }
    ctx.status = &r->status;
    for (int step = 0; step < steps && step < 8; step++) {
        for (int ni = 0; ni < g->nnodes; ni++)
            ps_call(g, r, &ctx, &g->nodes[ni]);
        r->loss[step] = *(float *)ps_ptr(g, r, g->loss);
    }
    moek_device_fini(&ctx);
}

static void ps_free(ps_run *r)
{
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        free(r->pool[s]);
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
    ps_variant(root, model, NULL, path);
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
    ps_run run[3];
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
            differ += memcmp(ps_ptr(g[0], &run[0], a->value), ps_ptr(g[l], &run[l], b->value),
                             ir_value_bytes(&g[0]->values[a->value])) != 0;
            checked++;
            if (a->state0 >= 0)
                differ += memcmp(ps_ptr(g[0], &run[0], a->state0), ps_ptr(g[l], &run[l], b->state0),
                                 ir_value_bytes(&g[0]->values[a->state0])) != 0;
        }
        snprintf(name, sizeof name, "passes: %s -O%d = -O0 bit for bit (loss x%d, weights, Adam m)",
                 model, l, STEPS);
        CHECK(name, differ == 0 && checked > 10 && memcmp(run[0].loss, run[l].loss, sizeof run[0].loss) == 0,
              "%d of %d tensors differ; last loss %.9g vs %.9g", differ, checked,
              run[0].loss[STEPS - 1], run[l].loss[STEPS - 1]);
    }
    for (int l = 0; l < 3; l++)
        ps_free(&run[l]);
out:
    for (int l = 0; l < 3; l++)
        ir_graph_free(g[l]);
}

/* train { freeze = (...) }: frozen weights cost no backward or optimizer work */
static void frozen(const char *root, const char *tmp)
{
    char path[1100], why[512] = "";
    snprintf(path, sizeof path, "%s/fz.moe", tmp);
    if (ps_variant(root, "tiny_dense", "freeze = (\"embed.*\", \"layers.0.*\")", path) != 0) {
        SKIP("passes: freeze", "no tiny_dense example");
        return;
    }
    ir_graph *g = ps_compile(root, path, 2, why, sizeof why);
    char base_path[1100];
    snprintf(base_path, sizeof base_path, "%s/base.moe", tmp);
    ps_variant(root, "tiny_dense", NULL, base_path);
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
    ps_run r;
    ps_execute(g, &r, 3);
    /* the initial weights again, for comparison */
    ps_run init;
    ps_execute(g, &init, 0);
    int changed_frozen = 0, changed_train = 0;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->tied_to >= 0)
            continue;
        int same = memcmp(ps_ptr(g, &r, pp->value), ps_ptr(g, &init, pp->value),
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
    ps_free(&r);
    ps_free(&init);
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
