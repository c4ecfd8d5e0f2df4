/* pass_inplace.c - let an elementwise op write over the input it reads
 * last.
 *
 * When node n is the last op that touches activation x and its kernel is
 * safe in place, n's output y can take x's bytes: the pass replaces y by x
 * in every op (x is then written twice: by its producer and by n), so the
 * memory planner (which keys liveness on values) gives them one offset and
 * never holds both.  Conditions: x and y are plain activations (no role,
 * not the loss or logits), same dtype and shape, n reads x through exactly
 * one argument and writes y through one, n is the first op to touch y and
 * the last to touch x.
 *
 * The whitelist is by kernel symbol and argument position of the kernel
 * ABI (kernels/moek.h), checked against both kernel libraries: each of
 * these reads element i of its inputs before it writes element i of its
 * output and touches no other element (kernels/cpu/elementwise.c, the
 * chunked bf16 twins in kernels/cpu/bf16.c, kernels/cuda/elementwise.cu),
 * so an output over an input is safe:
 *
 *   moek_add_fwd[_bf16](a, b, y, n)        y over a or b  (residual adds, gradient sums)
 *   moek_scale_fwd[_bf16](x, y, n, s)      y over x
 *   moek_scale_bwd[_bf16](dy, dx, n, s)    dx over dy
 *   moek_gelu_fwd[_bf16](x, y, n)          y over x
 *   moek_gelu_bwd(dy, x, dx, n)            dx over dy     (fp32 only)
 *   moek_swiglu_fwd[_bf16](gate, up, y, n) y over gate or up
 *
 * Not listed: swiglu_bwd and the other two-output backward kernels (not
 * audited for it), gelu_bwd_bf16, and anything with a reduction, BLAS or a
 * row-wise pass (norms, softmax, matmul, attention).
 *
 * Runs at -O2, last before memplan (after schedule: it fixes the order of
 * the two writes of x).  Fewer bytes live at once can still mean a larger
 * act pool (the best-fit allocator's holes), so a trial plan decides: each
 * rewrite is kept only if the pool does not grow (one plan per candidate:
 * the memory planner is linear in the ops, fine for the model sizes here).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "memplan.h"
#include "pass_util.h"
#include "passes.h"

typedef struct ip_rule {
    const char *symbol;
    int nargs;      /* the ABI's tensor + scalar argument count */
    int out;        /* argument position written */
    int in[2];      /* argument positions it may take over, -1 = none */
} ip_rule;

static const ip_rule ip_rules[] = {
    {"moek_add_fwd", 4, 2, {0, 1}},
    {"moek_add_fwd_bf16", 4, 2, {0, 1}},
    {"moek_scale_fwd", 4, 1, {0, -1}},
    {"moek_scale_fwd_bf16", 4, 1, {0, -1}},
    {"moek_scale_bwd", 4, 1, {0, -1}},
    {"moek_scale_bwd_bf16", 4, 1, {0, -1}},
    {"moek_gelu_fwd", 3, 1, {0, -1}},
    {"moek_gelu_fwd_bf16", 3, 1, {0, -1}},
    {"moek_gelu_bwd", 4, 2, {0, -1}},
    {"moek_swiglu_fwd", 4, 2, {0, 1}},
    {"moek_swiglu_fwd_bf16", 4, 2, {0, 1}},
};

const char *pass_inplace_rule(int i)
{
    return i >= 0 && i < (int)(sizeof ip_rules / sizeof *ip_rules) ? ip_rules[i].symbol : NULL;
}

/* Number of arguments of node n naming value v. */
static int ip_uses(const ir_node *n, int v)
{
    int count, uses = 0;
    const ir_ref *t = iop_template(n, &count);
    for (int a = 0; a < count; a++)
        uses += iop_ref_value(n, &t[a]) == v;
    return uses;
}

static bool ip_same_layout(const ir_value *a, const ir_value *b)
{
    return a->dtype == b->dtype && a->ndim == b->ndim &&
           memcmp(a->shape, b->shape, sizeof a->shape[0] * a->ndim) == 0;
}

/* Replaces value y by x in every port of every node. */
static void ip_rename(ir_graph *g, int y, int x)
{
    for (int ni = 0; ni < g->nnodes; ni++) {
        ir_node *n = &g->nodes[ni];
        for (int i = 0; i < IR_MAX_PORTS; i++) {
            if (n->inputs[i] == y) n->inputs[i] = x;
            if (n->outputs[i] == y) n->outputs[i] = x;
            if (n->grads_in[i] == y) n->grads_in[i] = x;
            if (n->grads_out[i] == y) n->grads_out[i] = x;
        }
    }
}

/* Act pool of a trial memory plan (INT64_MAX if it fails). */
static int64_t ip_pool(ir_graph *g)
{
    moec_error e;
    return pass_memplan(g, &e) == 0 ? g->pool_bytes[PLAN_ST_ACT] : INT64_MAX;
}

int pass_inplace(ir_graph *g, moec_error *err)
{
    (void)err;
    /* the allocator's holes can make a smaller peak a larger pool: keep each
     * rewrite only if a trial plan is no larger than without it */
    int64_t pool = ip_pool(g);
    ir_node *saved = malloc(sizeof *saved * ((size_t)g->nnodes + 1));
    if (!saved)
        abort();   /* out of memory, as ir_alloc */
    int *first = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int *last = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    if (!first || !last)
        abort();   /* out of memory, as ir_alloc */
    memplan_liveness(g, first, last);
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        const char *sym = iop_symbol(n);
        int count;
        const ir_ref *t = iop_template(n, &count);
        const ip_rule *r = NULL;
        for (size_t k = 0; sym && k < sizeof ip_rules / sizeof *ip_rules; k++)
            if (strcmp(ip_rules[k].symbol, sym) == 0 && ip_rules[k].nargs == count)
                r = &ip_rules[k];
        if (!r || !pu_writes(n, &t[r->out]))
            continue;
        int y = iop_ref_value(n, &t[r->out]);
        if (!pu_plain_act(g, y) || first[y] != ni || ip_uses(n, y) != 1)
            continue;
        for (int k = 0; k < 2; k++) {
            if (r->in[k] < 0 || !pu_reads(n, &t[r->in[k]]))
                continue;
            int x = iop_ref_value(n, &t[r->in[k]]);
            if (x == y || !pu_plain_act(g, x) || last[x] != ni || ip_uses(n, x) != 1 ||
                !ip_same_layout(&g->values[x], &g->values[y]))
                continue;
            memcpy(saved, g->nodes, sizeof *saved * (size_t)g->nnodes);
            ip_rename(g, y, x);
            int64_t trial = ip_pool(g);
            if (trial > pool) {
                memcpy(g->nodes, saved, sizeof *saved * (size_t)g->nnodes);
                continue;
            }
            pool = trial;
            last[x] = last[y];
            first[y] = last[y] = -1;
            g->values[y].producer = -1;   /* no op names y any more */
            break;
        }
    }
    free(first), free(last);
    for (int v = 0; v < g->nvalues; v++) {
        g->values[v].pool = -1;   /* the trial plans are dropped; memplan runs next */
        g->values[v].offset = 0;
    }
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        g->pool_bytes[s] = 0;
    free(saved);
    return 0;
}
