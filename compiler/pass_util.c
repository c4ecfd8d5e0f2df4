/* pass_util.c - helpers the optimisation passes share (pass_util.h). */
#include "pass_util.h"

#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "memplan.h"
#include "../runtime/comm.h"

bool pu_writes(const ir_node *n, const ir_ref *r)
{
    if (n->is_backward)
        return r->kind == IR_REF_DIN;
    if (r->kind == IR_REF_OUT)
        return true;
    /* an op without outputs can only work by updating what it is given */
    return r->kind == IR_REF_IN && n->def->noutputs == 0;
}

bool pu_reads(const ir_node *n, const ir_ref *r)
{
    if (n->is_backward)
        return r->kind == IR_REF_IN || r->kind == IR_REF_OUT || r->kind == IR_REF_DOUT;
    return r->kind == IR_REF_IN;
}

bool pu_plain_act(const ir_graph *g, int v)
{
    return v >= 0 && v < g->nvalues && g->values[v].storage == PLAN_ST_ACT && !memplan_pinned(g, v);
}

bool pu_side_effect(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    if (!n->is_backward && n->def->noutputs == 0)
        return true;
    int count, nwrites = 0;
    const ir_ref *t = iop_template(n, &count);
    for (int a = 0; a < count; a++) {
        int v = iop_ref_value(n, &t[a]);
        if (v < 0 || v >= g->nvalues)
            continue;
        if (g->values[v].storage == PLAN_ST_BUFFER)
            return true;
        if (pu_writes(n, &t[a])) {
            nwrites++;
            if (!pu_plain_act(g, v))
                return true;
        }
    }
    return nwrites == 0;   /* writes nothing we can see: keep it, whatever it does */
}

void pu_reorder(ir_graph *g, const int *order, int n)
{
    int *newidx = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    ir_node *tmp = malloc(sizeof *tmp * ((size_t)n + 1));
    if (!newidx || !tmp)
        abort();   /* out of memory, as ir_alloc */
    for (int i = 0; i < g->nnodes; i++)
        newidx[i] = -1;
    for (int k = 0; k < n; k++) {
        tmp[k] = g->nodes[order[k]];
        newidx[order[k]] = k;
    }
    memcpy(g->nodes, tmp, sizeof *tmp * (size_t)n);
    g->nnodes = n;
    free(tmp);
    for (int v = 0; v < g->nvalues; v++)
        g->values[v].producer = -1;
    for (int k = 0; k < n; k++) {
        ir_node *nd = &g->nodes[k];
        if (nd->is_backward && nd->grad_of >= 0)
            nd->grad_of = newidx[nd->grad_of];
        const int *outs = nd->is_backward ? nd->grads_out : nd->outputs;
        int nouts = nd->is_backward ? nd->def->ninputs : nd->def->noutputs;
        for (int i = 0; i < nouts; i++)
            if (outs[i] >= 0 && g->values[outs[i]].producer < 0)
                g->values[outs[i]].producer = k;   /* the first writer (in place: the original) */
    }
    free(newidx);
}

uint64_t pu_peak_bytes(const ir_graph *g)
{
    int *first = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int *last = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int64_t *delta = calloc((size_t)g->nnodes + 2, sizeof *delta);
    if (!first || !last || !delta)
        abort();
    memplan_liveness(g, first, last);
    int64_t pinned = 0, cur = 0, peak = 0;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *val = &g->values[v];
        if (val->storage != PLAN_ST_ACT)
            continue;
        int64_t sz = (int64_t)memplan_size(val);
        if (memplan_pinned(g, v))
            pinned += sz;
        else if (first[v] >= 0) {
            delta[first[v]] += sz;
            delta[last[v] + 1] -= sz;
        }
    }
    for (int i = 0; i < g->nnodes; i++) {
        cur += delta[i];
        if (cur > peak)
            peak = cur;
    }
    free(first), free(last), free(delta);
    return (uint64_t)(peak + pinned);
}

void pu_comm_def_fill(ir_opdef *def, const char *name, const char *sym,
                      const char *const *ins, const char *const *outs,
                      const char *const *dims, const char *const *attrs,
                      const ir_ref *tmpl, int nt)
{
    memset(def, 0, sizeof *def);
    def->name = name;
    def->lib = COMM_LIB;
    for (; ins[def->ninputs]; def->ninputs++)
        def->input_names[def->ninputs] = ins[def->ninputs];
    for (; outs && outs[def->noutputs]; def->noutputs++)
        def->output_names[def->noutputs] = outs[def->noutputs];
    for (; dims[def->ndims]; def->ndims++)
        def->dim_names[def->ndims] = dims[def->ndims];
    for (; attrs[def->nattrs]; def->nattrs++) {
        def->attr_names[def->nattrs] = attrs[def->nattrs];
        def->attr_kinds[def->nattrs] = PLAN_ARG_I64;
    }
    def->bwd_kind = IR_BWD_NONE;
    def->fwd_symbol = sym;
    def->nfwd = nt;
    memcpy(def->fwd, tmpl, sizeof *tmpl * (size_t)nt);
}

const ir_opdef *pu_comm_def(ir_graph *g, const char *name, const char *sym,
                            const char *const *ins, const char *const *outs,
                            const char *const *dims, const char *const *attrs,
                            const ir_ref *tmpl, int nt)
{
    const ir_opdef *d = ir_def_find(g, name);
    if (d)
        return d;
    ir_opdef def;
    pu_comm_def_fill(&def, name, sym, ins, outs, dims, attrs, tmpl, nt);
    return ir_def_add(g, &def);
}
