/* parallel_zero.c - ZeRO stages 1, 2 and 3 over the data-parallel ranks
 * (docs/parallel.md "ZeRO", docs/memory.md).
 *
 * Partitioning: every trainable tensor of n elements is cut into N equal
 * slices of S = plan_zero_shard_numel(n, N) elements (runtime/plan.h; the
 * tail of the last slice is zero padding) and rank i of the data-parallel
 * group owns slice i of every tensor.  Per tensor rather than one flat
 * buffer because the plan is one op list for every rank: each rank then
 * runs the same ops with the same sizes (S), only the collectives know
 * which slice is "mine", and each update keeps its own weight decay.  The
 * optimizer state a rank holds is still one contiguous run of its pool.
 *
 * Runs at the end of the optimizer pass, rewriting what it built:
 *   stage 1  m, v (and the fp32 master of a bf16 param) become [S] slices.
 *            The gradients are all-reduced whole as in plain data
 *            parallelism (pass_parallel), so the norm is unchanged; then per
 *            param: slice(grad) and slice(param) into [S] temporaries,
 *            the update on the slices, all-gather the param.
 *   stage 2  the gradient itself is an [S] slice: autodiff's "grad +=
 *            d.param" at the end of each micro-step becomes a reduce-scatter
 *            that adds this rank's slice of the group's sum; the norm sums
 *            the slices' squares and all-reduces that one number (each
 *            element counted once: slices are disjoint, padding is zero).
 *            A bf16/fp16 d.param is reduce-scattered as such and widened to
 *            fp32 by the dispatcher: the accumulators are fp32 at every
 *            precision, so the slice holds what one rank's would.
 *   stage 3  the param too is an [S] slice: zero3_gathers gives forward and
 *            backward each a gathered whole copy (an activation) one layer
 *            ahead of its readers; the update runs on the slice in place.
 * With expert parallelism an expert param (already this rank's experts) is
 * sliced over its expert-DP group (COMM_GROUP_EXPERT_DP, N/P ranks), every
 * other param over the whole data-parallel group; the stage-2 norm is still
 * one world all-reduce (every element of every slice is held once).
 * Every op is a "@comm" op without outputs, so the passes after this one
 * keep them and order them like any in-place update.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "pass_util.h"
#include "parallel_zero.h"
#include "../runtime/comm.h"

static int zerr(moec_error *err, ir_srcloc loc, const char *hint, const char *msg)
{
    memset(err, 0, sizeof *err);
    err->loc = loc;
    snprintf(err->msg, sizeof err->msg, "%s", msg);
    snprintf(err->hint, sizeof err->hint, "%s", hint);
    return -1;
}

int zero_check(const ir_graph *g, moec_error *err)
{
    if (g->par_zero < 0 || g->par_zero > 3)   /* elaboration rejects these */
        return zerr(err, g->train_loc, "use zero = 0, 1, 2 or 3", "unknown ZeRO stage");
    return 0;
}

/* The group a param's slices are cut over: an expert shard is replicated
 * only over its expert-DP group (the ranks holding the same experts), every
 * other param over the whole data-parallel group. */
static int zero_group(const ir_graph *g, const ir_param *pp, int64_t *size)
{
    int64_t nr = g->par_ranks > 0 ? g->par_ranks : 1, ep = g->par_expert > 0 ? g->par_expert : 1;
    if (pp->expert_axis == 0 && ep > 1) {
        *size = nr / ep;
        return COMM_GROUP_EXPERT_DP;
    }
    *size = nr;
    return COMM_GROUP_DP;
}

#define RIN(i) ((ir_ref){IR_REF_IN, (i), 0, 0})
#define RDIM(i) ((ir_ref){IR_REF_DIM, (i), 0, 0})
#define RATTR(i) ((ir_ref){IR_REF_ATTR, (i), 0, 0})

/* The "@comm" ops of ZeRO; all but the stage-3 gather have no outputs and
 * update their tensors in place. */
static const char *const z_full_slice[] = {"full", "slice", NULL}, *const z_slice_full[] = {"slice", "full", NULL},
                         *const z_n_s[] = {"n", "s", NULL}, *const z_s_n[] = {"s", "n", NULL};

/* moec_comm_zero_slice(group, full, n, slice, s, esize) */
static const ir_opdef *slice_def(ir_graph *g)
{
    static const char *const attrs[] = {"group", "esize", NULL};
    const ir_ref t[] = {RATTR(0), RIN(0), RDIM(0), RIN(1), RDIM(1), RATTR(1)};
    return pu_comm_def(g, "__zero_slice", "moec_comm_zero_slice", z_full_slice, NULL, z_n_s, attrs, t, 6);
}

/* moec_comm_zero_allgather(group, slice, s, full, n, esize) */
static const ir_opdef *allgather_def(ir_graph *g)
{
    static const char *const attrs[] = {"group", "esize", NULL};
    const ir_ref t[] = {RATTR(0), RIN(0), RDIM(0), RIN(1), RDIM(1), RATTR(1)};
    return pu_comm_def(g, "__zero_allgather", "moec_comm_zero_allgather", z_slice_full, NULL, z_s_n, attrs,
                       t, 6);
}

/* moec_comm_zero_reduce_scatter(group, full, n, slice, s, accumulate) */
static const ir_opdef *reduce_scatter_def(ir_graph *g)
{
    static const char *const attrs[] = {"group", "accumulate", NULL};
    const ir_ref t[] = {RATTR(0), RIN(0), RDIM(0), RIN(1), RDIM(1), RATTR(1)};
    return pu_comm_def(g, "__zero_reduce_scatter", "moec_comm_zero_reduce_scatter", z_full_slice, NULL,
                       z_n_s, attrs, t, 6);
}

/* moec_comm_zero_reduce_scatter_half(group, full, n, slice, s, accumulate,
 * dtype): full holds bf16/fp16 gradients (precision = bf16/fp16), summed in
 * fp32 into the fp32 gradient slice (docs/parallel.md "ZeRO with bf16") */
static const ir_opdef *reduce_scatter_half_def(ir_graph *g)
{
    static const char *const attrs[] = {"group", "accumulate", "dtype", NULL};
    const ir_ref t[] = {RATTR(0), RIN(0), RDIM(0), RIN(1), RDIM(1), RATTR(1), RATTR(2)};
    return pu_comm_def(g, "__zero_reduce_scatter_half", "moec_comm_zero_reduce_scatter_half", z_full_slice,
                       NULL, z_n_s, attrs, t, 7);
}

/* moec_comm_allreduce_f32(buf, n, group): the norm's sum of slice squares */
static const ir_opdef *norm_def(ir_graph *g)
{
    static const char *const ins[] = {"x", NULL}, *const dims[] = {"n", NULL},
                             *const attrs[] = {"group", NULL};
    const ir_ref t[] = {RIN(0), RDIM(0), RATTR(0)};
    return pu_comm_def(g, "__zero_norm_allreduce", "moec_comm_allreduce_f32", ins, NULL, dims, attrs, t, 3);
}

/* ZeRO-3: moec_comm_zero_allgather(group, slice, s, full, n, esize) with
 * full as an output, so the memory planner gives it activation space from
 * the gather to its last reader and then reuses it. */
static const ir_opdef *gather3_def(ir_graph *g)
{
    static const char *const ins[] = {"slice", NULL}, *const outs[] = {"full", NULL},
                             *const attrs[] = {"group", "esize", NULL};
    const ir_ref t[] = {RATTR(0), RIN(0), RDIM(0), (ir_ref){IR_REF_OUT, 0, 0, 0}, RDIM(1), RATTR(1)};
    return pu_comm_def(g, "__zero3_gather", "moec_comm_zero_allgather", ins, outs, z_s_n, attrs, t, 6);
}

static void node_init(ir_node *n, const ir_opdef *def, int phase, ir_srcloc loc, const char *what)
{
    memset(n, 0, sizeof *n);
    n->def = def;
    for (int i = 0; i < IR_MAX_PORTS; i++)
        n->inputs[i] = n->outputs[i] = n->grads_in[i] = n->grads_out[i] = -1;
    n->phase = (uint8_t)phase;
    n->grad_of = -1;
    n->loc = loc;
    n->what = what;
}

/* Appends a two-tensor ZeRO op; returns its index. */
static int add2(ir_graph *g, const ir_opdef *def, int a, int b, int64_t d0, int64_t d1,
                int64_t at0, int64_t at1, int phase, ir_srcloc loc, const char *what)
{
    ir_node n;
    node_init(&n, def, phase, loc, what);
    n.inputs[0] = a;
    n.inputs[1] = b;
    n.dims[0] = d0;
    n.dims[1] = d1;
    n.attrs[0].i = at0;
    n.attrs[1].i = at1;
    return ir_node_add(g, &n);
}

static void reshape_slice(ir_graph *g, int v, int64_t s)
{
    if (v < 0)
        return;
    g->values[v].ndim = 1;
    memset(g->values[v].shape, 0, sizeof g->values[v].shape);
    g->values[v].shape[0] = s;
}

static int name_is(const ir_node *n, const char *prefix)
{
    return n->def->name && strncmp(n->def->name, prefix, strlen(prefix)) == 0;
}

/* The prefetch group of a param: its layer ("layers.<l>") or, outside the
 * layers, the param itself.  Gathers are issued one group ahead. */
static size_t layer_key(const char *name)
{
    if (strncmp(name, "layers.", 7) != 0)
        return strlen(name);
    const char *dot = strchr(name + 7, '.');
    return dot ? (size_t)(dot - name) : strlen(name);
}

static bool same_key(const char *a, const char *b)
{
    size_t ka = layer_key(a);
    return ka == layer_key(b) && strncmp(a, b, ka) == 0;
}

/* ZeRO-3, for one phase (forward or backward): every reader of a sliced
 * param reads a full copy gathered in this phase instead, and the gather of
 * a param is issued before the first reader of the group (layer) before
 * its own: layer l+1's gathers run while layer l computes.  at[i] collects
 * the gathers to emit before node i. */
static int zero3_phase(ir_graph *g, int phase, const int *pv, int nold, int *at_cnt,
                       int **at_list, moec_error *err)
{
    int np = g->nparams;
    int *first = malloc(sizeof(int) * ((size_t)np + 1)), *full = malloc(sizeof(int) * ((size_t)np + 1));
    if (!first || !full)
        abort();
    for (int p = 0; p < np; p++)
        first[p] = full[p] = -1;
    for (int i = 0; i < nold; i++) {
        ir_node *n = &g->nodes[i];
        if (n->phase != phase)
            continue;
        for (int k = 0; k < IR_MAX_PORTS; k++) {
            int v = n->inputs[k];
            if (v < 0 || pv[v] < 0)
                continue;
            int p = pv[v];
            if (full[p] < 0) {
                const ir_value *pvl = &g->values[v];
                ir_value copy = *pvl;
                full[p] = ir_value_add(g, ir_strfmt(g, "%s.%s", copy.name, phase ==
                                                    PLAN_PHASE_FORWARD ? "gathered" : "gathered_bwd"),
                                       copy.dtype, PLAN_ST_ACT, copy.ndim, copy.shape);
                first[p] = i;
            }
            g->nodes[i].inputs[k] = full[p];
        }
    }
    /* anchors: the first reader of the previous group in reader order */
    int prev_anchor = -1, cur_anchor = -1;
    const char *cur = NULL;
    for (int i = 0; i < nold; i++) {
        for (int p = 0; p < np; p++) {
            if (first[p] != i)
                continue;
            const char *name = g->values[g->params[p].value].name;
            if (!cur || !same_key(cur, name)) {
                prev_anchor = cur_anchor < 0 ? i : cur_anchor;
                cur_anchor = i;
                cur = name;
            }
            int64_t gsize, n = ir_value_numel(&g->values[full[p]]);
            int group = zero_group(g, &g->params[p], &gsize);
            ir_node gn;
            node_init(&gn, gather3_def(g), phase, g->params[p].loc,
                      ir_strfmt(g, "ZeRO-3 all-gather %s (%s, %s group)", name,
                                phase == PLAN_PHASE_FORWARD ? "forward" : "backward",
                                comm_group_name(group)));
            gn.inputs[0] = g->params[p].value;
            gn.outputs[0] = full[p];
            gn.dims[0] = plan_zero_shard_numel(n, gsize);
            gn.dims[1] = n;
            gn.attrs[0].i = group;
            gn.attrs[1].i = (int64_t)plan_dtype_size(g->values[full[p]].dtype);
            int a = prev_anchor;
            at_list[a] = realloc(at_list[a], sizeof(int) * ((size_t)at_cnt[a] + 1));
            if (!at_list[a])
                abort();
            at_list[a][at_cnt[a]++] = ir_node_add(g, &gn);
        }
    }
    (void)err;
    free(first);
    free(full);
    return 0;
}

/* ZeRO-3: params become [S] slices; forward and backward read gathered
 * copies (zero3_phase).  The optimizer then updates the slices in place. */
static int zero3_gathers(ir_graph *g, moec_error *err)
{
    int nv = g->nvalues, nold = g->nnodes;
    int *pv = malloc(sizeof(int) * ((size_t)nv + 1));
    int *at_cnt = calloc((size_t)nold + 1, sizeof(int));
    int **at_list = calloc((size_t)nold + 1, sizeof(int *));
    if (!pv || !at_cnt || !at_list)
        abort();
    for (int v = 0; v < nv; v++)
        pv[v] = -1;
    int rc = 0;
    /* a tied weight (tie = "embed.weight") is one param read twice: both
     * readers get the gathered copy */
    for (int p = 0; p < g->nparams; p++)
        if (g->params[p].grad >= 0 && g->params[p].tied_to < 0)
            pv[g->params[p].value] = p;
    if (!rc)
        rc = zero3_phase(g, PLAN_PHASE_FORWARD, pv, nold, at_cnt, at_list, err) ||
             zero3_phase(g, PLAN_PHASE_BACKWARD, pv, nold, at_cnt, at_list, err);
    if (!rc) {
        int *order = malloc(sizeof(int) * ((size_t)g->nnodes + 1)), no = 0;
        if (!order)
            abort();
        for (int i = 0; i < nold; i++) {
            for (int k = 0; k < at_cnt[i]; k++)
                order[no++] = at_list[i][k];
            order[no++] = i;
        }
        pu_reorder(g, order, no);
        free(order);
    }
    for (int i = 0; i < nold; i++)
        free(at_list[i]);
    free(at_list);
    free(at_cnt);
    free(pv);
    return rc ? -1 : 0;
}

int pass_zero(ir_graph *g, moec_error *err)
{
    int64_t nr = g->par_ranks > 0 ? g->par_ranks : 1;
    int stage = (int)g->par_zero;
    if (nr == 1 || stage == 0)
        return 0;
    if (zero_check(g, err))
        return -1;
    if (stage == 3 && zero3_gathers(g, err))
        return -1;
    /* per value: the param whose value (pv) or gradient (gv) it is */
    int nv = g->nvalues, nold = g->nnodes, norm = -1;
    int *pv = malloc(sizeof(int) * ((size_t)nv + 1)), *gv = malloc(sizeof(int) * ((size_t)nv + 1));
    int *order = malloc(sizeof(int) * ((size_t)nold * 4 + 8));
    int64_t *pn = malloc(sizeof(int64_t) * ((size_t)g->nparams + 1));   /* whole numel */
    if (!pv || !gv || !order || !pn)
        abort();   /* out of memory, as ir_alloc */
    for (int p = 0; p < g->nparams; p++)
        pn[p] = ir_value_numel(&g->values[g->params[p].value]);
    for (int v = 0; v < nv; v++) {
        pv[v] = gv[v] = -1;
        if (g->values[v].role == PLAN_ROLE_NORM_SQ)
            norm = v;
    }
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->grad < 0 || pp->tied_to >= 0)
            continue;
        pv[pp->value] = p;
        gv[pp->grad] = p;
    }
    int last_sumsq = -1;
    for (int i = 0; i < nold; i++) {
        const ir_node *n = &g->nodes[i];
        if (n->phase == PLAN_PHASE_OPTIMIZER && name_is(n, "__sumsq_accum"))
            last_sumsq = i;
    }
    int no = 0;
    for (int i = 0; i < nold; i++) {
        ir_node *n = &g->nodes[i];
        int in0 = n->inputs[0];
        int p = -1;
        bool grad_op = (n->phase == PLAN_PHASE_BACKWARD && name_is(n, "__accumulate")) ||
                       (n->phase == PLAN_PHASE_OPTIMIZER &&
                        (name_is(n, "__sumsq_accum") || name_is(n, "__fill_inplace")));
        if (grad_op && in0 >= 0)
            p = gv[in0];
        else if (n->phase == PLAN_PHASE_OPTIMIZER && in0 >= 0 &&
                 (name_is(n, "__adamw") || name_is(n, "__sgd")))
            p = pv[in0];
        if (p < 0) {
            order[no++] = i;
            continue;
        }
        ir_param pp = g->params[p];   /* copy: nodes and values may move */
        int64_t numel = pn[p], gsize;
        int group = zero_group(g, &pp, &gsize);
        int64_t s = plan_zero_shard_numel(numel, gsize);
        const char *pname = g->values[pp.value].name;
        if (n->phase == PLAN_PHASE_BACKWARD) {
            /* stage 2: grad += d.param  ->  grad += my slice of the group's sum */
            if (stage >= 2) {
                int src = n->inputs[1];
                uint32_t sdt = g->values[src].dtype;
                /* the accumulator is fp32 at every precision (autodiff); a
                 * bf16/fp16 d.param is widened and summed in fp32, so the
                 * slice holds what a one-rank accumulator would */
                node_init(n, sdt == PLAN_F32 ? reduce_scatter_def(g) : reduce_scatter_half_def(g),
                          PLAN_PHASE_BACKWARD, n->loc,
                          ir_strfmt(g, "reduce-scatter %s.grad (ZeRO-2, %s group%s)", pname,
                                    comm_group_name(group), sdt == PLAN_BF16 ? ", bf16 in"
                                    : sdt == PLAN_F16 ? ", fp16 in" : ""));
                n->inputs[0] = src;
                n->inputs[1] = pp.grad;
                n->dims[0] = numel;
                n->dims[1] = s;
                n->attrs[0].i = group;
                n->attrs[1].i = 1;
                n->attrs[2].i = (int64_t)sdt;
            }
            order[no++] = i;
            continue;
        }
        if (!name_is(n, "__adamw") && !name_is(n, "__sgd")) {
            /* the norm term and the zeroing: slices from stage 2 on */
            if (stage >= 2)
                n->dims[0] = s;
            order[no++] = i;
            if (i == last_sumsq && stage >= 2 && norm >= 0) {
                ir_node r;
                node_init(&r, norm_def(g), PLAN_PHASE_OPTIMIZER, g->train_loc,
                          "all-reduce the gradient norm's slice sums (ZeRO)");
                r.inputs[0] = norm;
                r.dims[0] = 1;
                r.attrs[0].i = COMM_GROUP_WORLD;
                order[no++] = ir_node_add(g, &r);
            }
            continue;
        }
        /* the update: on this rank's slice of everything, then gather the param */
        int dt = g->values[pp.value].dtype;
        int64_t es = (int64_t)plan_dtype_size((uint32_t)dt);
        int gs = pp.grad;
        ir_srcloc loc = g->nodes[i].loc;
        reshape_slice(g, pp.state0, s);
        reshape_slice(g, pp.state1, s);
        reshape_slice(g, pp.master, s);
        if (stage == 3) {
            /* the param is the slice: update it in place, gather nothing */
            reshape_slice(g, pp.value, s);
            g->nodes[i].dims[0] = s;
            order[no++] = i;
            continue;
        }
        int ps = ir_value_add(g, ir_strfmt(g, "%s.zero_slice", pname), dt, PLAN_ST_ACT, 1, &s);
        order[no++] = add2(g, slice_def(g), pp.value, ps, numel, s, group, es,
                           PLAN_PHASE_OPTIMIZER, loc, ir_strfmt(g, "ZeRO slice of %s", pname));
        if (stage == 1) {
            gs = ir_value_add(g, ir_strfmt(g, "%s.grad.zero_slice", pname), PLAN_F32,
                              PLAN_ST_ACT, 1, &s);
            order[no++] = add2(g, slice_def(g), pp.grad, gs, numel, s, group, 4,
                               PLAN_PHASE_OPTIMIZER, loc,
                               ir_strfmt(g, "ZeRO slice of %s.grad", pname));
        }
        n = &g->nodes[i];
        for (int k = 0; k < n->def->ninputs; k++) {
            if (n->inputs[k] == pp.value)
                n->inputs[k] = ps;
            else if (n->inputs[k] == pp.grad)
                n->inputs[k] = gs;
        }
        n->dims[0] = s;
        order[no++] = i;
        order[no++] = add2(g, allgather_def(g), ps, pp.value, s, numel, group, es,
                           PLAN_PHASE_OPTIMIZER, loc,
                           ir_strfmt(g, "all-gather %s (ZeRO, %s group)", pname,
                                     comm_group_name(group)));
    }
    /* stage 2: the gradients themselves are slices (their only readers, the
     * reduce-scatter, the norm, the update and the zeroing, use S) */
    if (stage >= 2)
        for (int p = 0; p < g->nparams; p++)
            if (g->params[p].grad >= 0 && g->params[p].tied_to < 0) {
                int64_t gsize;
                zero_group(g, &g->params[p], &gsize);
                reshape_slice(g, g->params[p].grad, plan_zero_shard_numel(pn[p], gsize));
            }
    pu_reorder(g, order, no);
    free(pv);
    free(gv);
    free(order);
    free(pn);
    return 0;
}

int64_t zero_param_numel(const ir_graph *g, int p)
{
    const ir_param *pp = &g->params[p];
    int64_t n = ir_value_numel(&g->values[pp->value]);
    if (g->par_ranks > 1 && g->par_zero >= 3)
        for (int i = 0; i < g->nnodes; i++)
            if (g->nodes[i].def->name && strcmp(g->nodes[i].def->name, "__zero3_gather") == 0 &&
                g->nodes[i].inputs[0] == pp->value) {
                n = g->nodes[i].dims[1];   /* the gathered whole */
                break;
            }
    if (g->par_ranks > 1 && g->par_expert > 1 && pp->expert_axis == 0)
        for (int i = 0; i < g->nnodes; i++)
            if (g->nodes[i].def->name && strcmp(g->nodes[i].def->name, "__ep_counts") == 0) {
                n *= g->par_expert;   /* parallel_ep.c ran: it kept this rank's experts */
                break;
            }
    return n;
}

bool zero3_is_gather(const ir_graph *g, int ni)
{
    const char *name = g->nodes[ni].def->name;
    return name && strcmp(name, "__zero3_gather") == 0;
}

bool zero3_is_gathered(const ir_graph *g, int v)
{
    if (v < 0 || g->values[v].storage != PLAN_ST_ACT || g->par_zero < 3)
        return false;
    for (int ni = 0; ni < g->nnodes; ni++)
        if (g->nodes[ni].outputs[0] == v)
            return zero3_is_gather(g, ni);
    return false;
}

int zero3_prefetch_groups(const ir_graph *g, int *grp)
{
    int ngrp = 0, *rep = malloc(sizeof(int) * ((size_t)g->nnodes + 1));   /* a gather per group */
    if (!rep)
        abort();   /* out of memory, as ir_alloc */
    for (int v = 0; v < g->nvalues; v++)
        grp[v] = -1;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        if (!zero3_is_gather(g, ni) || n->inputs[0] < 0 || n->outputs[0] < 0)
            continue;
        const char *name = g->values[n->inputs[0]].name;
        int k = 0;
        while (k < ngrp && !(g->nodes[rep[k]].phase == n->phase &&
                             same_key(g->values[g->nodes[rep[k]].inputs[0]].name, name)))
            k++;
        if (k == ngrp)
            rep[ngrp++] = ni;
        grp[n->outputs[0]] = k;
    }
    free(rep);
    return ngrp;
}
