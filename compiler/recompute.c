/* recompute.c - trade FLOPs for activation memory (train { recompute }).
 *
 * Runs after autodiff (and the optimizer pass) and before the memory plan.
 * A forward value that a backward op reads is normally live from the
 * forward pass until that backward op.  For the forward nodes the policy
 * picks ("candidates"), the pass instead clones the node into the backward
 * phase right before the first backward op that reads one of its outputs,
 * and points every backward reader at the clone's outputs; the original
 * outputs then die at their last forward use.  A clone whose input is
 * itself a candidate's output reads that candidate's clone (made first), so
 * chains are re-run in order.  Kernels are deterministic, so a clone
 * recomputes exactly the bytes the forward pass produced.
 *
 *   selective  candidates are cheap ops (elementwise or per-row: no weight
 *              matrix, no integer inputs, no attention kernel, every output
 *              the size of input 0 or one number per row of it), and only
 *              when everything they read is kept anyway: a param or input,
 *              a value backward reads regardless, or another candidate's
 *              output.  So selective never extends what the forward keeps.
 *   full       every forward op except those whose gradient passes straight
 *              through (add: the residual stream, which is the checkpoint
 *              between blocks); each block is re-run from its input.
 *
 * Never recomputed: ops writing a value the runtime reads between ops
 * (loss, logits, metrics) and the compiler's internal ops.
 */
#include <stdlib.h>
#include <string.h>

#include "explain.h"
#include "internal_ops.h"
#include "memplan.h"
#include "passes.h"

typedef struct rc_state {
    ir_graph *g;
    int nforward;      /* forward nodes 0 .. nforward-1 (they precede the rest) */
    bool *cand;        /* per forward node */
    int *clone;        /* per forward node: its clone's node index, or -1 */
    int *remap;        /* per value: the clone's copy of a forward value, or -1 */
    int *order;        /* the new node order, as old (or clone) indices */
    int norder, cap_order;
} rc_state;

const char *memplan_recompute_name(int policy)
{
    static const char *const names[] = {"none", "selective", "full"};
    return policy >= 0 && policy <= MEMPLAN_RECOMPUTE_FULL ? names[policy] : "?";
}

static bool rc_is_float(int dtype)
{
    return dtype == PLAN_F32 || dtype == PLAN_BF16 || dtype == PLAN_F16;
}

/* Elementwise or per-row work: cheap enough to run twice. */
static bool rc_cheap(const ir_graph *g, const ir_node *n)
{
    if (explain_is_attention(n) || n->inputs[0] < 0)
        return false;
    const ir_value *x = &g->values[n->inputs[0]];
    int64_t numel = ir_value_numel(x);
    int64_t rows = x->ndim > 0 && x->shape[x->ndim - 1] > 0 ? numel / x->shape[x->ndim - 1] : numel;
    for (int i = 0; i < n->def->ninputs; i++) {
        int v = n->inputs[i];
        if (v < 0)
            continue;
        const ir_value *iv = &g->values[v];
        if (!rc_is_float(iv->dtype))
            return false;   /* ids: a gather or scatter */
        if ((iv->storage == PLAN_ST_PARAM || iv->storage == PLAN_ST_BUFFER) && iv->ndim >= 2)
            return false;   /* a weight matrix: a matmul */
    }
    for (int o = 0; o < n->def->noutputs; o++) {
        int v = n->outputs[o];
        if (v < 0)
            continue;
        int64_t on = ir_value_numel(&g->values[v]);
        if (on != numel && on != rows)
            return false;   /* reshapes, reduces or expands */
    }
    return true;
}

/* Forward node ni may be re-run at all (either policy). */
static bool rc_allowed(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    if (iop_is_internal(n->def))
        return false;
    for (int o = 0; o < n->def->noutputs; o++) {
        int v = n->outputs[o];
        if (v >= 0 && (g->values[v].storage != PLAN_ST_ACT || memplan_pinned(g, v)))
            return false;
    }
    return true;
}

static void rc_push(rc_state *s, int node)
{
    if (s->norder == s->cap_order) {
        s->cap_order = s->cap_order ? s->cap_order * 2 : 256;
        s->order = realloc(s->order, (size_t)s->cap_order * sizeof *s->order);
        if (!s->order)
            abort();   /* out of memory, as ir_alloc */
    }
    s->order[s->norder++] = node;
}

/* The forward node producing value v if it is a candidate, else -1. */
static int rc_cand_producer(const rc_state *s, int v)
{
    int p = v >= 0 ? s->g->values[v].producer : -1;
    return p >= 0 && p < s->nforward && s->cand[p] ? p : -1;
}

/* Clones candidate ni (and first any candidate it reads) at the end of the
 * new order; sets remap for its outputs. */
static void rc_clone(rc_state *s, int ni)
{
    if (s->clone[ni] >= 0)
        return;
    ir_graph *g = s->g;
    for (int i = 0; i < g->nodes[ni].def->ninputs; i++) {
        int p = rc_cand_producer(s, g->nodes[ni].inputs[i]);
        if (p >= 0)
            rc_clone(s, p);
    }
    ir_node c = g->nodes[ni];
    for (int i = 0; i < c.def->ninputs; i++)
        if (c.inputs[i] >= 0 && s->remap[c.inputs[i]] >= 0)
            c.inputs[i] = s->remap[c.inputs[i]];
    for (int o = 0; o < c.def->noutputs; o++) {
        int v = c.outputs[o];
        if (v < 0)
            continue;
        ir_value ov = g->values[v];   /* copy: adding values may move the array */
        int nv = ir_value_add(g, ir_strfmt(g, "rc.%s", ov.name), ov.dtype, PLAN_ST_ACT, ov.ndim,
                              ov.shape);
        c.outputs[o] = nv;
        s->remap[v] = nv;
    }
    c.phase = PLAN_PHASE_BACKWARD;
    c.is_backward = false;
    c.grad_of = -1;
    c.what = ir_strfmt(g, "%s (recompute)", c.what ? c.what : c.def->name);
    s->clone[ni] = ir_node_add(g, &c);
    rc_push(s, s->clone[ni]);
}

/* Picks the candidates: the policy's choice, then drops (to a fixed point)
 * any whose inputs would not be available in the backward phase. */
static void rc_pick(rc_state *s, const bool *bwd_read)
{
    ir_graph *g = s->g;
    for (int ni = 0; ni < s->nforward; ni++) {
        const ir_node *n = &g->nodes[ni];
        bool want = g->recompute == MEMPLAN_RECOMPUTE_FULL ? n->def->bwd_kind != IR_BWD_PASSTHROUGH
                                                            : rc_cheap(g, n);
        s->cand[ni] = want && rc_allowed(g, ni);
    }
    for (bool changed = true; changed;) {
        changed = false;
        for (int ni = 0; ni < s->nforward; ni++) {
            if (!s->cand[ni])
                continue;
            const ir_node *n = &g->nodes[ni];
            for (int i = 0; i < n->def->ninputs; i++) {
                int u = n->inputs[i];
                if (u < 0)
                    continue;
                const ir_value *uv = &g->values[u];
                bool avail = uv->storage != PLAN_ST_ACT || uv->producer < 0 || bwd_read[u] ||
                             rc_cand_producer(s, u) >= 0;
                if (!avail) {
                    s->cand[ni] = false;
                    changed = true;
                    break;
                }
            }
        }
    }
}

int pass_recompute(ir_graph *g, moec_error *err)
{
    if (g->recompute == MEMPLAN_RECOMPUTE_NONE)
        return 0;
    if (g->recompute != MEMPLAN_RECOMPUTE_SELECTIVE && g->recompute != MEMPLAN_RECOMPUTE_FULL) {
        memset(err, 0, sizeof *err);
        err->loc = g->train_loc;
        snprintf(err->msg, sizeof err->msg, "internal error: unknown recompute policy %d",
                 g->recompute);
        return -1;
    }
    rc_state s;
    memset(&s, 0, sizeof s);
    s.g = g;
    while (s.nforward < g->nnodes && g->nodes[s.nforward].phase == PLAN_PHASE_FORWARD &&
           !g->nodes[s.nforward].is_backward)
        s.nforward++;
    for (int ni = s.nforward; ni < g->nnodes; ni++) {
        if (g->nodes[ni].phase == PLAN_PHASE_FORWARD) {
            memset(err, 0, sizeof *err);
            err->loc = g->nodes[ni].loc;
            snprintf(err->msg, sizeof err->msg, "internal error: forward op %d ('%s') comes after "
                     "the backward pass starts; recompute needs forward ops first", ni,
                     g->nodes[ni].what ? g->nodes[ni].what : g->nodes[ni].def->name);
            return -1;
        }
    }
    int nold = g->nnodes;
    /* every value a backward op reads or writes, by its kernel template */
    bool *bwd_read = calloc((size_t)g->nvalues + 1, sizeof *bwd_read);
    s.cand = calloc((size_t)s.nforward + 1, sizeof *s.cand);
    s.clone = malloc(sizeof(int) * ((size_t)s.nforward + 1));
    if (!bwd_read || !s.cand || !s.clone)
        abort();
    for (int ni = s.nforward; ni < nold; ni++) {
        int count;
        const ir_ref *t = iop_template(&g->nodes[ni], &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(&g->nodes[ni], &t[a]);
            if (v >= 0 && v < g->nvalues)
                bwd_read[v] = true;
        }
    }
    rc_pick(&s, bwd_read);
    free(bwd_read);
    for (int ni = 0; ni < s.nforward; ni++)
        s.clone[ni] = -1;

    /* the value count grows as clones are made: remap is sized for the worst
     * case, one new value per forward output */
    int maxv = g->nvalues;
    for (int ni = 0; ni < s.nforward; ni++)
        maxv += g->nodes[ni].def->noutputs;
    s.remap = malloc(sizeof(int) * ((size_t)maxv + 1));
    if (!s.remap)
        abort();
    for (int v = 0; v <= maxv; v++)
        s.remap[v] = -1;

    for (int ni = 0; ni < nold; ni++) {
        if (ni >= s.nforward) {
            /* the forward values this op's kernel reads (a port the template
             * does not pass costs nothing): clones first, then rewire */
            int count;
            const ir_ref *t = iop_template(&g->nodes[ni], &count);
            for (int a = 0; a < count; a++) {
                bool in = t[a].kind == IR_REF_IN;
                /* a backward op's outputs[] are the forward outputs it reads */
                bool out = t[a].kind == IR_REF_OUT && g->nodes[ni].is_backward;
                if ((!in && !out) || t[a].index < 0 || t[a].index >= IR_MAX_PORTS)
                    continue;
                int *port = in ? &g->nodes[ni].inputs[t[a].index] : &g->nodes[ni].outputs[t[a].index];
                int p = rc_cand_producer(&s, *port);
                if (p < 0)
                    continue;
                rc_clone(&s, p);   /* may move g->nodes: port is re-read below */
                port = in ? &g->nodes[ni].inputs[t[a].index] : &g->nodes[ni].outputs[t[a].index];
                *port = s.remap[*port];
            }
        }
        rc_push(&s, ni);
    }

    /* put the nodes in the new order; forward nodes keep their indices */
    ir_node *tmp = malloc(sizeof *tmp * ((size_t)s.norder + 1));
    if (!tmp)
        abort();
    for (int k = 0; k < s.norder; k++)
        tmp[k] = g->nodes[s.order[k]];
    memcpy(g->nodes, tmp, sizeof *tmp * (size_t)s.norder);
    free(tmp);
    for (int k = 0; k < g->nnodes; k++) {
        const ir_node *n = &g->nodes[k];
        const int *outs = n->is_backward ? n->grads_out : n->outputs;
        int nouts = n->is_backward ? n->def->ninputs : n->def->noutputs;
        for (int i = 0; i < nouts; i++)
            if (outs[i] >= 0)
                g->values[outs[i]].producer = k;
    }
    free(s.cand), free(s.clone), free(s.remap), free(s.order);
    return 0;
}
