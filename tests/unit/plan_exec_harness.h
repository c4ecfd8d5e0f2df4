/* plan_exec_harness.h - runs a compiled graph with the real CPU kernels in
 * its planned pools, the way ./run does (each kernel called through libffi
 * from its argument template), for the compiler tests that compare plans by
 * their results (test_compiler_pass_schedule.c, test_compiler_recompute.c).
 * Also: a copy of an example with something added to train { }, and
 * elaboration of it with the stdlib of the tree.
 *
 * What differs between the tests is a pe_options:
 *   kernels/nkernels  the kernels a test may call (PE_KERNELS_FWD_BWD, plus
 *                     the optimizer's for a full step); a symbol not there
 *                     is printed ("# no kernel ...") and counted in unknown
 *   steps             how many steps (at most 8; 0: only the set-up)
 *   full_step         1: every node in graph order (forward, backward,
 *                     optimizer) each step; 0: the forward then the backward
 *                     phase's nodes only
 *   hyper             1: fill the PLAN_ROLE_HYPER value with fixed AdamW
 *                     settings
 *   attr_f64          how an attribute that is neither PLAN_ARG_I64 nor
 *                     PLAN_ARG_F32 is passed: 1 as a double, 0 as a float
 *                     (a PLAN_ARG_F32 attribute is always a float)
 * Data: tokens and targets a fixed pattern of the vocab, a loss seed of 1,
 * untied parameters from a fixed LCG (1-D ones around 1, others around 0),
 * every other byte zero.  After each step loss[step] is the loss value. */
#ifndef PLAN_EXEC_HARNESS_H
#define PLAN_EXEC_HARNESS_H

#include <ffi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "diag.h"
#include "../../compiler/elaborate.h"
#include "../../compiler/internal_ops.h"
#include "../../kernels/moek.h"

typedef void (*pe_fn)(void);
typedef struct { const char *sym; pe_fn fn; } pe_kernel;
#define PE_K(name) {#name, (pe_fn)name}
/* the fp32 kernels of a forward and backward pass (moek_expert_load:
 * stdlib/moe.moe's per-layer load statistics) */
#define PE_KERNELS_FWD_BWD                                                                         \
    PE_K(moek_fill), PE_K(moek_copy), PE_K(moek_add_fwd), PE_K(moek_accumulate),                   \
    PE_K(moek_scale_fwd), PE_K(moek_scale_bwd), PE_K(moek_gelu_fwd), PE_K(moek_gelu_bwd),          \
    PE_K(moek_swiglu_fwd), PE_K(moek_swiglu_bwd), PE_K(moek_embedding_fwd),                        \
    PE_K(moek_embedding_bwd), PE_K(moek_matmul_fwd), PE_K(moek_matmul_bwd), PE_K(moek_rmsnorm_fwd), \
    PE_K(moek_rmsnorm_bwd), PE_K(moek_rope_fwd), PE_K(moek_rope_bwd), PE_K(moek_attention_fwd),    \
    PE_K(moek_attention_bwd), PE_K(moek_cross_entropy_fwd), PE_K(moek_cross_entropy_bwd),          \
    PE_K(moek_softmax_fwd), PE_K(moek_softmax_bwd), PE_K(moek_topk_fwd), PE_K(moek_topk_bwd),      \
    PE_K(moek_balance_loss_fwd), PE_K(moek_balance_loss_bwd), PE_K(moek_zloss_fwd),                \
    PE_K(moek_zloss_bwd), PE_K(moek_dispatch_fwd), PE_K(moek_dispatch_bwd),                        \
    PE_K(moek_grouped_matmul_fwd), PE_K(moek_grouped_matmul_bwd), PE_K(moek_combine_fwd),          \
    PE_K(moek_combine_bwd), PE_K(moek_expert_load)

typedef struct {
    const pe_kernel *kernels;
    size_t nkernels;
    int steps, full_step, hyper, attr_f64;
} pe_options;

typedef struct pe_run {
    unsigned char *pool[PLAN_ST_COUNT];
    float loss[8];
    int unknown, status;
} pe_run;

/* Copies ROOT/examples/<model>.moe to path, with `extra` (NULL: nothing)
 * added to train { }.  Returns 0 on success. */
static int pe_variant(const char *root, const char *model, const char *extra, const char *path)
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

/* Elaborates path with ROOT/stdlib; NULL (and why) on failure. */
static ir_graph *pe_elaborate(const char *root, const char *path, char *why, size_t n)
{
    char stdlib_dir[1024];
    snprintf(stdlib_dir, sizeof stdlib_dir, "%s/stdlib", root);
    diag_ctx *d = diag_new(stderr, 20);
    elab_options opt;
    memset(&opt, 0, sizeof opt);
    opt.stdlib_dir = stdlib_dir;
    ir_graph *g = elaborate(path, &opt, d);
    diag_free(d);
    if (!g)
        snprintf(why, n, "%s does not elaborate", path);
    return g;
}

static void *pe_ptr(const ir_graph *g, pe_run *r, int v)
{
    return r->pool[g->values[v].pool] + g->values[v].offset;
}

static void pe_call(const ir_graph *g, pe_run *r, const pe_options *o, const moek_ctx *ctx,
                    const ir_node *n)
{
    const char *sym = iop_symbol(n);
    pe_fn fn = NULL;
    for (size_t k = 0; k < o->nkernels; k++)
        if (strcmp(o->kernels[k].sym, sym) == 0)
            fn = o->kernels[k].fn;
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
            slot[a].p = pe_ptr(g, r, v);
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
        } else if (o->attr_f64 && n->def->attr_kinds[t[a].index] != PLAN_ARG_F32) {
            slot[a].d = n->attrs[t[a].index].f;
            types[a + 1] = &ffi_type_double;
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

/* Allocates the pools, fills them (see above) and runs o->steps steps. */
static void pe_execute(const ir_graph *g, pe_run *r, const pe_options *o)
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
            int32_t *ids = pe_ptr(g, r, v);
            for (int64_t k = 0; k < n; k++)
                ids[k] = (int32_t)((k * (val->role == PLAN_ROLE_TOKENS ? 7 : 13) + 3) % g->train.vocab);
        } else if (val->role == PLAN_ROLE_LOSS_SEED) {
            *(float *)pe_ptr(g, r, v) = 1.0f;
        } else if (val->role == PLAN_ROLE_HYPER) {
            if (o->hyper) {
                float *h = pe_ptr(g, r, v);
                h[MOEK_HYPER_LR] = 1e-3f;
                h[MOEK_HYPER_BETA1] = 0.9f;
                h[MOEK_HYPER_BETA2] = 0.95f;
                h[MOEK_HYPER_EPS] = 1e-8f;
                h[MOEK_HYPER_BC1] = 0.1f;
                h[MOEK_HYPER_BC2] = 0.05f;
                h[MOEK_HYPER_MAX_NORM] = 1.0f;
            }
        } else if (val->storage == PLAN_ST_PARAM && val->param >= 0 &&
                   g->params[val->param].tied_to < 0) {
            float *w = pe_ptr(g, r, v);
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
    for (int step = 0; step < o->steps && step < 8; step++) {
        if (o->full_step) {
            for (int ni = 0; ni < g->nnodes; ni++)
                pe_call(g, r, o, &ctx, &g->nodes[ni]);
        } else {
            for (int phase = PLAN_PHASE_FORWARD; phase <= PLAN_PHASE_BACKWARD; phase++)
                for (int ni = 0; ni < g->nnodes; ni++)
                    if (g->nodes[ni].phase == phase)
                        pe_call(g, r, o, &ctx, &g->nodes[ni]);
        }
        r->loss[step] = *(float *)pe_ptr(g, r, g->loss);
    }
    moek_device_fini(&ctx);
}

static void pe_free(pe_run *r)
{
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        free(r->pool[s]);
}

#endif
