/* parallel_ep.c - expert parallelism: experts sharded over the expert-
 * parallel (EP) group, tokens moved to them by all-to-all (docs/parallel.md).
 *
 * Rank k of an EP group of P ranks holds the experts [k*E/P, (k+1)*E/P) of
 * every MoE layer: each expert param (expert_axis 0) keeps its global name
 * and is shrunk to its E/P slice (the plan marks it, so init and checkpoints
 * map it to global expert ids).  Each rank routes its own tokens (the router
 * is dense and replicated); then, per layer, between dispatch and the
 * grouped matmuls:
 *
 *   dispatch -> xs[R,D], expert_rows[E,2]
 *   __ep_counts(expert_rows) -> counts, local_rows    all-to-all of row counts
 *   __ep_send(xs, ...)       -> xr[Rr,D]              all-to-all of the rows
 *   grouped matmuls on xr with the local experts and local_rows
 *   __ep_recv(ys, ...)       -> yb[R,D]               the reverse all-to-all
 *   combine(yb, slot_row, gates)
 *
 * The backward of __ep_send is the reverse exchange and vice versa, so
 * autodiff (re-run on the rewritten forward graph) adds the backward
 * exchanges.  Everything is static: every rank runs the same collectives in
 * the same order whatever the routing (a zero count is a zero-size block).
 * Receive buffers are sized for the worst case: capacity C gives at most C
 * rows per (source, expert), so Rr = P * E/P * C = R; dropless routing can
 * send every slot of every rank to one rank, Rr = P * R.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "parallel_ep.h"
#include "pass_util.h"
#include "../runtime/comm.h"

static int eperr(moec_error *err, ir_srcloc loc, const char *hint, const char *msg)
{
    memset(err, 0, sizeof *err);
    err->loc = loc;
    snprintf(err->msg, sizeof err->msg, "%s", msg);
    snprintf(err->hint, sizeof err->hint, "%s", hint);
    return -1;
}

/* symbol is base, base_bf16 or base_f16 */
static bool sym_is(const ir_node *n, const char *base)
{
    const char *s = n->def->fwd_symbol;
    size_t l = strlen(base);
    if (!s || strncmp(s, base, l) != 0)
        return false;
    return s[l] == '\0' || strcmp(s + l, "_bf16") == 0 || strcmp(s + l, "_f16") == 0;
}

static bool is_dispatch(const ir_node *n)
{
    return !n->is_backward && (sym_is(n, "moek_dispatch_fwd") ||
                               sym_is(n, "moek_dispatch_by_score_fwd"));
}

static int dim_index(const ir_opdef *d, const char *name)
{
    for (int i = 0; i < d->ndims; i++)
        if (d->dim_names[i] && strcmp(d->dim_names[i], name) == 0)
            return i;
    return -1;
}

static const ir_opdef *counts_def(ir_graph *g)
{
    static const char *const ins[] = {"expert_rows", NULL}, *const outs[] = {"counts", "local_rows", NULL},
                             *const dims[] = {"E", NULL}, *const attrs[] = {"group", "P", NULL};
    const ir_ref t[] = {{IR_REF_ATTR, 0, 0, 0}, {IR_REF_IN, 0, 0, 0}, {IR_REF_OUT, 0, 0, 0},
                        {IR_REF_OUT, 1, 0, 0},  {IR_REF_DIM, 0, 0, 0}, {IR_REF_ATTR, 1, 0, 0}};
    return pu_comm_def(g, "__ep_counts", "moec_comm_ep_counts", ins, outs, dims, attrs, t, 6);
}

/* __ep_send (dir 0 forward) or __ep_recv (dir 1 forward); the backward
 * runs the other direction on the gradients. */
static const ir_opdef *exchange_def(ir_graph *g, int dir)
{
    const char *name = dir == 0 ? "__ep_send" : "__ep_recv";
    const ir_opdef *d = ir_def_find(g, name);
    if (d)
        return d;
    static const char *const ins[] = {"x", "expert_rows", "counts", "local_rows", NULL},
                             *const outs[] = {"y", NULL}, *const dims[] = {"R", "Rr", "D", "E", NULL},
                             *const attrs[] = {"group", "P", "esize", NULL};
    /* forward: (group, dir, x, y, ...); backward: (group, 1 - dir, dy, dx, ...) */
    ir_ref t[2][PLAN_MAX_KERNEL_ARGS];
    int nt = 0;
    for (int b = 0; b < 2; b++) {
        ir_ref *r = t[b];
        int a = 0;
        r[a++] = (ir_ref){IR_REF_ATTR, 0, 0, 0};
        r[a++] = (ir_ref){IR_REF_INT, 0, b ? 1 - dir : dir, 0};
        r[a++] = b ? (ir_ref){IR_REF_DOUT, 0, 0, 0} : (ir_ref){IR_REF_IN, 0, 0, 0};
        r[a++] = b ? (ir_ref){IR_REF_DIN, 0, 0, 0} : (ir_ref){IR_REF_OUT, 0, 0, 0};
        for (int i = 1; i < 4; i++)
            r[a++] = (ir_ref){IR_REF_IN, i, 0, 0};
        for (int i = 0; i < 4; i++)
            r[a++] = (ir_ref){IR_REF_DIM, i, 0, 0};
        r[a++] = (ir_ref){IR_REF_ATTR, 1, 0, 0};
        r[a++] = (ir_ref){IR_REF_ATTR, 2, 0, 0};
        nt = a;
    }
    ir_opdef def;
    pu_comm_def_fill(&def, name, "moec_comm_ep_exchange", ins, outs, dims, attrs, t[0], nt);
    def.input_diff[0] = true;
    def.output_diff[0] = true;
    def.bwd_kind = IR_BWD_KERNEL;
    def.bwd_symbol = "moec_comm_ep_exchange";
    def.nbwd = nt;
    memcpy(def.bwd, t[1], sizeof t[1][0] * (size_t)nt);
    return ir_def_add(g, &def);
}

static ir_node blank_node(const ir_opdef *d, ir_srcloc loc, const char *what)
{
    ir_node n;
    memset(&n, 0, sizeof n);
    n.def = d;
    for (int i = 0; i < IR_MAX_PORTS; i++)
        n.inputs[i] = n.outputs[i] = n.grads_in[i] = n.grads_out[i] = -1;
    n.phase = PLAN_PHASE_FORWARD;
    n.grad_of = -1;
    n.loc = loc;
    n.what = what;
    return n;
}

/* Drops what autodiff added (its nodes are appended after the forward ones;
 * its first value is the loss seed), so the forward graph can be changed and
 * differentiated again. */
static int undo_autodiff(ir_graph *g, moec_error *err)
{
    int nv0 = -1, nf = g->nnodes;
    for (int v = 0; v < g->nvalues && nv0 < 0; v++)
        if (g->values[v].role == PLAN_ROLE_LOSS_SEED)
            nv0 = v;
    for (int i = 0; i < g->nnodes && nf == g->nnodes; i++)
        if (g->nodes[i].is_backward || g->nodes[i].phase == PLAN_PHASE_BACKWARD)
            nf = i;
    if (nv0 < 0)
        return eperr(err, g->train_loc, "report this bug", "expert parallelism runs after "
                     "autodiff but the graph has no loss seed");
    for (int i = nf; i < g->nnodes; i++)
        if (!g->nodes[i].is_backward && g->nodes[i].phase != PLAN_PHASE_BACKWARD)
            return eperr(err, g->nodes[i].loc, "report this bug", "expert parallelism: a "
                         "forward op follows the backward ops");
    for (int i = 0; i < nf; i++) {
        const ir_node *n = &g->nodes[i];
        for (int k = 0; k < IR_MAX_PORTS; k++)
            if ((k < n->def->ninputs && n->inputs[k] >= nv0) ||
                (k < n->def->noutputs && n->outputs[k] >= nv0))
                return eperr(err, n->loc, "report this bug", "expert parallelism: a forward op "
                             "uses a value made by autodiff");
    }
    g->nnodes = nf;
    g->nvalues = nv0;
    for (int p = 0; p < g->nparams; p++)
        g->params[p].grad = -1;
    return 0;
}

/* One dispatch: rewrite its expert region.  *order gets the new node order
 * later; here nodes are appended and their wanted places recorded. */
typedef struct ep_move { int node, before; } ep_move;   /* put node right before `before` */

static int rewrite_layer(ir_graph *g, int di, int64_t P, bool *region, ep_move *mv, int *nmv,
                         moec_error *err)
{
    const ir_node dn = g->nodes[di];
    int xs = dn.outputs[0], slot_row = dn.outputs[1], erows = dn.outputs[2];
    if (xs < 0 || slot_row < 0 || erows < 0)
        return 0;
    const ir_value xv = g->values[xs];
    int64_t E = g->values[erows].shape[0], R = xv.shape[0], D = xv.shape[1];
    /* only a dispatch whose expert_rows feeds expert-param matmuls is sharded
     * (a shared expert's one-expert gate dispatch stays local) */
    bool experts = false;
    for (int i = di + 1; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        if (sym_is(n, "moek_grouped_matmul_fwd") && n->inputs[2] == erows) {
            int w = n->inputs[1];
            int p = w >= 0 ? g->values[w].param : -1;
            if (p < 0 || g->params[p].expert_axis != 0)
                return eperr(err, n->loc, "declare the weight `expert` in its param line",
                             "expert parallelism: a grouped matmul's weight is not an expert "
                             "param, so it cannot be split over the expert-parallel ranks");
            experts = true;
        }
    }
    if (!experts)
        return 0;
    if (E % P)
        return eperr(err, dn.loc, "make parallel { expert } divide the experts",
                     "expert parallelism: the experts do not divide over the expert-parallel "
                     "ranks");
    int64_t El = E / P;
    /* capacity: the dispatch's last int attribute; R == E*C.  Dropless R = N*k. */
    int ci = -1;
    bool dropless;
    for (int a = 0; a < dn.def->nattrs; a++)
        if (dn.def->attr_names[a] && strcmp(dn.def->attr_names[a], "capacity") == 0)
            ci = a;
    dropless = ci < 0 || dn.attrs[ci].i == 0;
    int64_t Rr = dropless ? P * R : R;
    int64_t esize = (int64_t)plan_dtype_size(xv.dtype);

    /* the region: values computed from xs up to the combines */
    memset(region, 0, (size_t)(g->nvalues + 64) * sizeof *region);
    region[xs] = true;
    int ncomb = 0, nmm = 0;
    int nn = g->nnodes;
    for (int i = di + 1; i < nn; i++) {
        ir_node *n = &g->nodes[i];
        bool any = false, all = true;
        for (int k = 0; k < n->def->ninputs; k++) {
            int v = n->inputs[k];
            if (v < 0)
                continue;
            bool fl = g->values[v].dtype == PLAN_F32 || g->values[v].dtype == PLAN_BF16 ||
                      g->values[v].dtype == PLAN_F16;
            if (region[v])
                any = true;
            else if (fl && g->values[v].storage != PLAN_ST_PARAM)
                all = false;
        }
        if (!any)
            continue;
        if (sym_is(n, "moek_combine_fwd") && n->inputs[1] == slot_row && region[n->inputs[0]]) {
            ncomb++;
            continue;
        }
        bool mm = sym_is(n, "moek_grouped_matmul_fwd") && n->inputs[2] == erows &&
                  region[n->inputs[0]];
        if (!mm && (!all || n->is_backward || n->phase != PLAN_PHASE_FORWARD))
            return eperr(err, n->loc, "keep the expert computation between dispatch and "
                         "combine elementwise", ir_strfmt(g, "expert parallelism: op '%s' "
                         "mixes expert rows with other tensors, so it cannot run on the "
                         "rows of another rank", n->def->name));
        nmm += mm;
        for (int o = 0; o < n->def->noutputs; o++)
            if (n->outputs[o] >= 0)
                region[n->outputs[o]] = true;
    }
    if (!ncomb || !nmm)
        return eperr(err, dn.loc, "combine the expert outputs with combine(ys, slot_row, "
                     "gates)", "expert parallelism: the dispatch's expert rows never reach "
                     "a combine");

    /* new values and the count + token exchanges after the dispatch */
    int64_t cshape[1] = {2 * E}, lshape[2] = {El, 2}, xrshape[2] = {Rr, D};
    int counts = ir_value_add(g, ir_strfmt(g, "%s.ep_counts", xv.name), PLAN_I32, PLAN_ST_ACT, 1,
                              cshape);
    int lrows = ir_value_add(g, ir_strfmt(g, "%s.ep_rows", xv.name), PLAN_I32, PLAN_ST_ACT, 2,
                             lshape);
    int xr = ir_value_add(g, ir_strfmt(g, "%s.ep_recv", xv.name), xv.dtype, PLAN_ST_ACT, 2,
                          xrshape);
    ir_node c = blank_node(counts_def(g), dn.loc, "all-to-all of expert token counts (ep group)");
    c.inputs[0] = erows;
    c.outputs[0] = counts;
    c.outputs[1] = lrows;
    c.dims[0] = E;
    c.attrs[0].i = COMM_GROUP_EP;
    c.attrs[1].i = P;
    mv[(*nmv)++] = (ep_move){ir_node_add(g, &c), di + 1};
    ir_node s = blank_node(exchange_def(g, 0), dn.loc, "all-to-all of tokens to their experts "
                           "(ep group)");
    s.inputs[0] = xs;
    s.inputs[1] = erows;
    s.inputs[2] = counts;
    s.inputs[3] = lrows;
    s.outputs[0] = xr;
    s.dims[0] = R;
    s.dims[1] = Rr;
    s.dims[2] = D;
    s.dims[3] = E;
    s.attrs[0].i = COMM_GROUP_EP;
    s.attrs[1].i = P;
    s.attrs[2].i = esize;
    mv[(*nmv)++] = (ep_move){ir_node_add(g, &s), di + 1};

    /* the region reads the received rows; shapes follow Rr, matmuls El */
    for (int i = di + 1; i < nn; i++) {
        ir_node *n = &g->nodes[i];
        if (sym_is(n, "moek_combine_fwd") && n->inputs[1] == slot_row && region[n->inputs[0]]) {
            int ys = n->inputs[0];
            const ir_value yv = g->values[ys];
            int64_t yshape[2] = {R, yv.shape[1]};
            int yb = ir_value_add(g, ir_strfmt(g, "%s.ep_back", yv.name), yv.dtype, PLAN_ST_ACT,
                                  2, yshape);
            ir_node r = blank_node(exchange_def(g, 1), n->loc, "all-to-all of expert outputs "
                                   "back to their tokens (ep group)");
            r.inputs[0] = ys;
            r.inputs[1] = erows;
            r.inputs[2] = counts;
            r.inputs[3] = lrows;
            r.outputs[0] = yb;
            r.dims[0] = R;
            r.dims[1] = Rr;
            r.dims[2] = yv.shape[1];
            r.dims[3] = E;
            r.attrs[0].i = COMM_GROUP_EP;
            r.attrs[1].i = P;
            r.attrs[2].i = (int64_t)plan_dtype_size(yv.dtype);
            int ri = ir_node_add(g, &r);
            g->nodes[i].inputs[0] = yb;
            mv[(*nmv)++] = (ep_move){ri, i};
            continue;
        }
        bool mm = sym_is(n, "moek_grouped_matmul_fwd") && n->inputs[2] == erows;
        bool in_region = false;
        for (int k = 0; k < n->def->ninputs; k++)
            in_region |= n->inputs[k] >= 0 && region[n->inputs[k]];
        if (!in_region)
            continue;
        /* old sizes of the first region input, for the dims */
        int64_t old0 = 0, oldn = 0;
        for (int k = 0; k < n->def->ninputs && !old0; k++)
            if (n->inputs[k] >= 0 && region[n->inputs[k]]) {
                old0 = n->inputs[k] == xs ? R : g->values[n->inputs[k]].shape[0] / (dropless ? P : 1);
                oldn = ir_value_numel(&g->values[n->inputs[k]]) / (n->inputs[k] == xs ? 1 :
                                                                     (dropless ? P : 1));
            }
        for (int k = 0; k < n->def->ninputs; k++)
            if (n->inputs[k] == xs)
                n->inputs[k] = xr;
        if (mm) {
            int w = n->inputs[1];
            n->inputs[2] = lrows;
            int ri = dim_index(n->def, "R"), ei = dim_index(n->def, "E");
            if (ri < 0 || ei < 0)
                return eperr(err, n->loc, "report this bug", "expert parallelism: grouped_matmul "
                             "has no dims R and E");
            n->dims[ri] = Rr;
            n->dims[ei] = El;
            ir_value *wv = &g->values[w];
            if (wv->shape[0] == E)
                wv->shape[0] = El;   /* the local experts; once per param */
            else if (wv->shape[0] != El)
                return eperr(err, n->loc, "report this bug", "expert parallelism: an expert "
                             "weight's first dim is not the layer's expert count");
        } else if (dropless) {
            for (int k = 0; k < n->def->ndims; k++) {
                if (n->dims[k] == oldn)
                    n->dims[k] = oldn * P;
                else if (n->dims[k] == old0)
                    n->dims[k] = old0 * P;
            }
        }
        if (dropless)
            for (int o = 0; o < n->def->noutputs; o++)
                if (n->outputs[o] >= 0 && g->values[n->outputs[o]].shape[0] == old0)
                    g->values[n->outputs[o]].shape[0] = Rr;
    }
    return 0;
}

int parallel_ep_rewrite(ir_graph *g, moec_error *err)
{
    int64_t P = g->par_expert > 0 ? g->par_expert : 1;
    if (P == 1)
        return 0;
    if (undo_autodiff(g, err))
        return -1;
    /* every expert param must be split the same way (global ids in the names) */
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->expert_axis > 0)
            return eperr(err, pp->loc, "put the expert index first: [experts, ...]",
                         "expert parallelism splits expert params along their first dim");
    }
    int cap = 64, nmv = 0;
    ep_move *mv = malloc((size_t)cap * sizeof *mv);
    bool *region = NULL;
    int rc = 0, nforward = g->nnodes;
    for (int i = 0; i < nforward && rc == 0; i++) {
        if (!is_dispatch(&g->nodes[i]))
            continue;
        if (nmv + 16 > cap) {
            cap *= 2;
            ep_move *q = realloc(mv, (size_t)cap * sizeof *q);
            if (!q) {
                rc = eperr(err, g->train_loc, "", "out of memory");
                break;
            }
            mv = q;
        }
        bool *rg = realloc(region, (size_t)(g->nvalues + 64) * sizeof *rg);
        if (!rg || !mv) {
            free(rg ? rg : region);
            free(mv);
            return eperr(err, g->train_loc, "", "out of memory");
        }
        region = rg;
        rc = rewrite_layer(g, i, P, region, mv, &nmv, err);
    }
    free(region);
    /* an expert weight read by anything but an expert matmul would see only
     * this rank's experts */
    for (int i = 0; i < g->nnodes && rc == 0; i++) {
        const ir_node *n = &g->nodes[i];
        for (int k = 0; k < n->def->ninputs; k++) {
            int v = n->inputs[k], p = v >= 0 ? g->values[v].param : -1;
            if (p >= 0 && g->params[p].expert_axis == 0 &&
                !(sym_is(n, "moek_grouped_matmul_fwd") && k == 1 && n->def->ninputs == 3))
                rc = eperr(err, n->loc, "use expert weights only in grouped_matmul",
                           ir_strfmt(g, "expert parallelism: op '%s' reads the expert weight "
                                     "'%s', but each rank holds only its own experts",
                                     n->def->name, g->values[v].name));
        }
    }
    if (rc == 0) {
        /* the new nodes go where they belong: exchanges after their dispatch,
         * the reverse one right before its combine */
        int n = g->nnodes;
        int *order = malloc((size_t)n * sizeof *order);
        if (!order) {
            free(mv);
            return eperr(err, g->train_loc, "", "out of memory");
        }
        int k = 0;
        for (int i = 0; i < nforward; i++) {
            for (int m = 0; m < nmv; m++)
                if (mv[m].before == i)
                    order[k++] = mv[m].node;
            order[k++] = i;
        }
        for (int i = nforward; i < n; i++) {
            bool moved = false;
            for (int m = 0; m < nmv; m++)
                moved |= mv[m].node == i;
            if (!moved)
                order[k++] = i;
        }
        if (k != n)
            rc = eperr(err, g->train_loc, "report this bug", "expert parallelism lost an op "
                       "while placing the exchanges");
        else
            pu_reorder(g, order, n);
        free(order);
    }
    free(mv);
    if (rc)
        return -1;
    return pass_autodiff(g, err);
}

static const ir_opdef *norm_allreduce_def(ir_graph *g)
{
    static const char *const ins[] = {"x", NULL}, *const dims[] = {"n", NULL},
                             *const attrs[] = {"group", NULL};
    const ir_ref t[] = {{IR_REF_IN, 0, 0, 0}, {IR_REF_DIM, 0, 0, 0}, {IR_REF_ATTR, 0, 0, 0}};
    return pu_comm_def(g, "__ep_norm_allreduce", "moec_comm_allreduce_f32", ins, NULL, dims, attrs, t, 3);
}

int parallel_ep_norm(ir_graph *g, int norm, moec_error *err)
{
    (void)err;
    int64_t ranks = g->par_ranks > 0 ? g->par_ranks : 1, P = g->par_expert > 0 ? g->par_expert : 1;
    if (ranks == 1 || P == 1)
        return 0;
    /* ZeRO >= 2: every gradient is a disjoint slice, dense over the world and
     * expert over its expert-DP group, so one world all-reduce of the whole
     * norm (parallel_zero.c) already counts each expert element once */
    if (g->par_zero >= 2)
        return 0;
    const ir_opdef *sumsq = iop_def(g, IOP_SUMSQ_ACCUM);
    int64_t one = 1;
    int epn = ir_value_add(g, "grad_norm_sq.experts", PLAN_F32, PLAN_ST_ACT, 1, &one);
    int first = -1;
    for (int i = 0; i < g->nnodes; i++) {
        ir_node *n = &g->nodes[i];
        if (n->def != sumsq || n->inputs[1] != norm)
            continue;
        int gv = n->inputs[0];
        for (int p = 0; p < g->nparams; p++)
            if (g->params[p].grad == gv && g->params[p].expert_axis == 0) {
                n->inputs[1] = epn;
                if (first < 0)
                    first = i;
                break;
            }
    }
    if (first < 0)
        return 0;   /* no expert param trains */
    int nold = g->nnodes;
    int fill = iop_node(g, IOP_FILL, NULL, &epn, 1, 0.0, PLAN_PHASE_OPTIMIZER, g->train_loc,
                        "expert grad norm reset");
    ir_node a = blank_node(norm_allreduce_def(g), g->train_loc, "all-reduce expert grad norm "
                           "(ep group: each expert counted once)");
    a.inputs[0] = epn;
    a.dims[0] = 1;
    a.attrs[0].i = COMM_GROUP_EP;
    a.phase = PLAN_PHASE_OPTIMIZER;
    ir_node_add(g, &a);
    int ins[2] = {norm, epn};
    iop_node(g, IOP_ACCUMULATE, ins, NULL, 1, 0.0, PLAN_PHASE_OPTIMIZER, g->train_loc,
             "add expert grad norm");
    int n = g->nnodes, k = 0;
    int *order = malloc((size_t)n * sizeof *order);
    if (!order)
        return eperr(err, g->train_loc, "", "out of memory");
    for (int i = 0; i < nold; i++) {
        if (i == first)
            order[k++] = fill;
        order[k++] = i;
    }
    for (int i = nold; i < n; i++)
        if (i != fill)
            order[k++] = i;
    pu_reorder(g, order, n);
    free(order);
    return 0;
}
