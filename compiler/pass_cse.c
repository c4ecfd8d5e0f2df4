/* pass_cse.c - common-subexpression elimination over the forward pass.
 *
 * Two forward ops compute the same bytes when they run the same opdef on
 * the same input values with the same dims and attributes: kernels are
 * deterministic functions of their arguments (a random op such as router
 * jitter draws from a counter it is given as an input).  The later one is
 * dropped and its readers read the earlier one's outputs.
 *
 * Runs at -O1 and -O2 before autodiff (compiler/main.c), so autodiff sees
 * one op whose output fans out and emits one backward op for it.  It never
 * runs after recompute, and it would not undo it if it did: only ops of
 * the forward phase are candidates, and a recompute copy lives in the
 * backward phase (labelled "(recompute)"), so it is never merged back into
 * the forward op it re-runs (tests/unit/test_compiler_pass_cse.c).
 *
 * Left alone: internal ops, ops from a user's kernel library (we cannot
 * know they are pure), ops with side effects or with outputs the runtime
 * reads (pass_util.h), and backward ops.
 */
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "pass_util.h"
#include "passes.h"

static bool cse_candidate(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    static const char tag[] = "(recompute)";
    size_t len = n->what ? strlen(n->what) : 0;
    if (len >= sizeof tag - 1 && strcmp(n->what + len - (sizeof tag - 1), tag) == 0)
        return false;
    return n->phase == PLAN_PHASE_FORWARD && !n->is_backward && !iop_is_internal(n->def) &&
           !n->def->lib && n->def->noutputs > 0 && !pu_side_effect(g, ni);
}

static bool cse_same(const ir_graph *g, const ir_node *a, const ir_node *b)
{
    const ir_opdef *d = a->def;
    if (a->def != b->def)
        return false;
    for (int i = 0; i < d->ninputs; i++)
        if (a->inputs[i] != b->inputs[i])
            return false;
    for (int i = 0; i < d->ndims; i++)
        if (a->dims[i] != b->dims[i])
            return false;
    for (int i = 0; i < d->nattrs; i++)
        if (!ir_scalar_same(a->attrs[i], b->attrs[i]))
            return false;
    for (int o = 0; o < d->noutputs; o++) {
        if ((a->outputs[o] < 0) != (b->outputs[o] < 0))
            return false;
        if (a->outputs[o] < 0)
            continue;
        const ir_value *x = &g->values[a->outputs[o]], *y = &g->values[b->outputs[o]];
        if (x->dtype != y->dtype || x->ndim != y->ndim ||
            memcmp(x->shape, y->shape, sizeof x->shape[0] * x->ndim) != 0)
            return false;
    }
    return true;
}

int pass_cse(ir_graph *g, moec_error *err)
{
    (void)err;
    int *remap = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int *order = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    int *kept = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    if (!remap || !order || !kept)
        abort();   /* out of memory, as ir_alloc */
    for (int v = 0; v < g->nvalues; v++)
        remap[v] = v;
    int n = 0, nkept = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        ir_node *nd = &g->nodes[ni];
        for (int i = 0; i < IR_MAX_PORTS; i++) {
            if (nd->inputs[i] >= 0)
                nd->inputs[i] = remap[nd->inputs[i]];
            if (nd->is_backward && nd->outputs[i] >= 0)
                nd->outputs[i] = remap[nd->outputs[i]];   /* forward outputs it reads */
        }
        int same = -1;
        if (cse_candidate(g, ni))
            for (int k = 0; k < nkept && same < 0; k++)
                if (cse_same(g, &g->nodes[kept[k]], nd))
                    same = kept[k];
        if (same < 0) {
            if (cse_candidate(g, ni))
                kept[nkept++] = ni;
            order[n++] = ni;
            continue;
        }
        for (int o = 0; o < nd->def->noutputs; o++)
            if (nd->outputs[o] >= 0)
                remap[nd->outputs[o]] = g->nodes[same].outputs[o];
    }
    if (n != g->nnodes)
        pu_reorder(g, order, n);
    free(remap), free(order), free(kept);
    return 0;
}
