/* parallel.c - the collectives of a multi-rank plan (docs/parallel.md).
 *
 * Runs after autodiff and before the optimizer pass, so its ops run before
 * the gradient norm and the updates: with grad_accum 1 inside the backward
 * phase, each bucket right after its gradients are final (so the rest of
 * backward can overlap it, docs/parallel.md "Overlap"); with grad_accum > 1
 * at the start of the optimizer phase, after the last micro-step.  Data
 * parallelism: every rank computes gradients on its own share of the global
 * batch (the runtime seeds the loss with 1 / (grad_accum x ranks)); the
 * gradients are then summed over the data-parallel group - the dense params'
 * group, or for expert params the group that holds the same expert shard -
 * in buckets: up to COMM_MULTI_MAX tensors and PARALLEL_BUCKET_BYTES per
 * all-reduce op.  The norm that follows is then computed from identical
 * summed gradients on every rank, so each parameter counts exactly once and
 * every rank takes the same clipping and the same finite-or-not decision.
 *
 * The collective ops come from the plan library "@comm" (runtime/comm.h), so
 * every rank runs the same collectives in the same order, fixed here: no
 * rank can skip one because of its data (a rank whose experts got no token
 * still reduces their zero gradients).  A one-rank plan gets no op at all.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "pass_util.h"
#include "parallel_zero.h"
#include "parallel_ep.h"
#include "passes.h"
#include "../runtime/comm.h"

#define PARALLEL_BUCKET_BYTES (25ull << 20)

static int perr(moec_error *err, ir_srcloc loc, const char *hint, const char *msg)
{
    memset(err, 0, sizeof *err);
    err->loc = loc;
    snprintf(err->msg, sizeof err->msg, "%s", msg);
    snprintf(err->hint, sizeof err->hint, "%s", hint);
    return -1;
}

/* "__comm_allreduce_<k>": k fp32 tensors, one dim each; attrs group, bucket.
 * moec_comm_allreduce_f32_multi(group, bucket, k, t0, n0, ..., t7, n7) with
 * unused slots bound to t0 and n = 0. */
static const ir_opdef *allreduce_def(ir_graph *g, int k)
{
    const char *ins[COMM_MULTI_MAX + 1] = {NULL}, *dims[COMM_MULTI_MAX + 1] = {NULL};
    static const char *const attrs[] = {"group", "bucket", NULL};
    for (int i = 0; i < k; i++) {
        ins[i] = ir_strfmt(g, "g%d", i);
        dims[i] = ir_strfmt(g, "n%d", i);
    }
    ir_ref t[3 + 2 * COMM_MULTI_MAX];
    int a = 0;
    t[a++] = (ir_ref){IR_REF_ATTR, 0, 0, 0};
    t[a++] = (ir_ref){IR_REF_ATTR, 1, 0, 0};
    t[a++] = (ir_ref){IR_REF_INT, 0, k, 0};
    for (int i = 0; i < COMM_MULTI_MAX; i++) {
        t[a++] = (ir_ref){IR_REF_IN, i < k ? i : 0, 0, 0};
        t[a++] = i < k ? (ir_ref){IR_REF_DIM, i, 0, 0} : (ir_ref){IR_REF_INT, 0, 0, 0};
    }
    return pu_comm_def(g, ir_strfmt(g, "__comm_allreduce_%d", k), "moec_comm_allreduce_f32_multi", ins,
                       NULL, dims, attrs, t, a);
}

static void emit_bucket(ir_graph *g, const int *vals, int k, int group, int bucket, int phase)
{
    ir_node n;
    memset(&n, 0, sizeof n);
    n.def = allreduce_def(g, k);
    for (int i = 0; i < IR_MAX_PORTS; i++) {
        n.inputs[i] = i < k ? vals[i] : -1;
        n.outputs[i] = -1;
        n.grads_in[i] = n.grads_out[i] = -1;
    }
    for (int i = 0; i < k; i++)
        n.dims[i] = ir_value_numel(&g->values[vals[i]]);
    n.attrs[0].i = group;
    n.attrs[1].i = bucket;
    n.phase = (uint8_t)phase;
    n.grad_of = -1;
    n.loc = g->train_loc;
    n.what = ir_strfmt(g, "all-reduce gradients, bucket %d (%s group, %d tensors)", bucket,
                       comm_group_name(group), k);
    ir_node_add(g, &n);
}

/* Aux-loss-free balancing moves the router bias (a buffer, not a param)
 * inside forward from this micro-batch's expert load.  Each rank sees only
 * its own rows, so the load is summed over the data-parallel group first
 * (into a copy: the metrics keep reading this rank's load, which run sums
 * on the host); every rank then takes the same step, the bias stays
 * replicated, and N ranks move it as one rank with batch N x B does
 * (counts in fp32 are exact integers, so the sum is exact). */
static int bias_loads(ir_graph *g)
{
    int nold = g->nnodes, nb = 0;
    for (int i = 0; i < nold; i++)
        nb += g->nodes[i].def->fwd_symbol &&
              strcmp(g->nodes[i].def->fwd_symbol, "moek_router_bias_update") == 0;
    if (!nb)
        return 0;
    int *order = malloc(sizeof(int) * ((size_t)nold + 2 * (size_t)nb));
    if (!order)
        return -1;
    int no = 0;
    for (int i = 0; i < nold; i++) {
        const ir_node *n = &g->nodes[i];
        if (!n->def->fwd_symbol || strcmp(n->def->fwd_symbol, "moek_router_bias_update") != 0 ||
            n->inputs[1] < 0) {
            order[no++] = i;
            continue;
        }
        int load = n->inputs[1], phase = n->phase;
        ir_srcloc loc = n->loc;
        int64_t numel = ir_value_numel(&g->values[load]);
        int sum = ir_value_add(g, ir_strfmt(g, "%s.dp_sum", g->values[load].name), PLAN_F32,
                               PLAN_ST_ACT, 1, &numel);
        order[no++] = iop_node(g, IOP_COPY, &load, &sum, numel, 0.0, phase, loc,
                               "copy of the expert load for the data-parallel sum");
        ir_node a;
        memset(&a, 0, sizeof a);
        a.def = allreduce_def(g, 1);
        for (int k = 0; k < IR_MAX_PORTS; k++)
            a.inputs[k] = a.outputs[k] = a.grads_in[k] = a.grads_out[k] = -1;
        a.inputs[0] = sum;
        a.dims[0] = numel;
        a.attrs[0].i = COMM_GROUP_DP;
        a.attrs[1].i = -1;
        a.phase = (uint8_t)phase;
        a.grad_of = -1;
        a.loc = loc;
        a.what = "all-reduce the expert load before the router bias update (dp group)";
        order[no++] = ir_node_add(g, &a);
        g->nodes[i].inputs[1] = sum;
        order[no++] = i;
    }
    pu_reorder(g, order, no);
    free(order);
    return 0;
}

/* One gradient bucket while buckets are formed: its tensors, its group, and
 * the backward node after which it may run (-1: the optimizer phase). */
typedef struct par_bucket {
    int vals[COMM_MULTI_MAX], k, group, after;
} par_bucket;

typedef struct par_grad {
    int param, ready, last;   /* ready: the node that completes its d.param; last: its last write */
} par_grad;

static int par_by_ready(const void *pa, const void *pb)
{
    const par_grad *a = pa, *b = pb;
    if (a->ready != b->ready)
        return a->ready < b->ready ? -1 : 1;
    if (a->last != b->last)
        return a->last < b->last ? -1 : 1;
    return a->param < b->param ? -1 : a->param > b->param;
}

/* For each backward node that writes a GRAD value: ready[grad] = the latest
 * earlier node that wrote anything else the writer touches (the op that
 * completed d.param), last[grad] = the writer itself.  -1 when no backward
 * node writes it. */
static void par_grad_times(const ir_graph *g, int *ready, int *last)
{
    int *lastw = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    if (!lastw)
        abort();   /* out of memory, as ir_alloc */
    for (int v = 0; v < g->nvalues; v++)
        ready[v] = last[v] = lastw[v] = -1;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(n, &count);
        int dep = -1;
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0 && v < g->nvalues && g->values[v].storage != PLAN_ST_GRAD && lastw[v] > dep)
                dep = lastw[v];
        }
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= g->nvalues || !pu_writes(n, &t[a]))
                continue;
            lastw[v] = ni;
            if (n->phase == PLAN_PHASE_BACKWARD && g->values[v].storage == PLAN_ST_GRAD) {
                ready[v] = dep > ready[v] ? dep : ready[v];
                last[v] = ni;
            }
        }
    }
    free(lastw);
}

int pass_parallel(ir_graph *g, moec_error *err)
{
    int64_t ranks = g->par_ranks > 0 ? g->par_ranks : 1;
    int64_t ep = g->par_expert > 0 ? g->par_expert : 1;
    if (ranks == 1)
        return 0;
    if (ranks % ep)   /* elaboration reports this with the source; never reached */
        return perr(err, g->train_loc, "make expert divide ranks",
                    "impossible layout: expert-parallel size does not divide the ranks");
    if (g->par_zero != 0 && zero_check(g, err))   /* before any rewrite */
        return -1;
    if (ep > 1 && parallel_ep_rewrite(g, err))   /* compiler/parallel_ep.c */
        return -1;
    if (bias_loads(g))   /* after the rewrite, which re-runs autodiff */
        return perr(err, g->train_loc, "", "out of memory");
    if (g->par_zero >= 2)
        return 0;   /* gradients are reduce-scattered instead (parallel_zero.c) */
    /* Buckets in the order the gradients become final in backward (the last
     * layer first), so each can start while backward goes on.  With one
     * micro-step per step each all-reduce goes into the backward phase right
     * after the last write of its gradients; with grad_accum > 1 the sum
     * over micro-steps must be complete first, so they stay at the start of
     * the optimizer phase.  One open bucket per group, so a bucket never
     * mixes groups; the order is fixed here, so every rank's order is. */
    bool early = g->train.grad_accum <= 1;
    int *ready = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int *last = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    par_grad *gr = malloc(sizeof *gr * ((size_t)g->nparams + 1));
    par_bucket *bk = malloc(sizeof *bk * ((size_t)g->nparams + 1));
    if (!ready || !last || !gr || !bk)
        abort();   /* out of memory, as ir_alloc */
    par_grad_times(g, ready, last);
    int ng = 0, rc = 0;
    for (int p = 0; p < g->nparams && !rc; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->grad < 0 || pp->tied_to >= 0)
            continue;
        if (g->values[pp->grad].dtype != PLAN_F32)
            rc = perr(err, pp->loc, "report this bug", "a gradient is not fp32; the "
                      "data-parallel all-reduce sums fp32 gradients");
        gr[ng++] = (par_grad){p, ready[pp->grad], last[pp->grad]};
    }
    qsort(gr, (size_t)ng, sizeof *gr, par_by_ready);
    /* a bucket is issued when it closes, so the issue order is the order
     * buckets fill up */
    int nb = 0;
    bool open[2] = {false, false};
    uint64_t bytes[2] = {0, 0};
    par_bucket tmp[2];
    for (int i = 0; i < ng; i++) {
        const ir_param *pp = &g->params[gr[i].param];
        int v = pp->grad, s = pp->expert_axis >= 0 && ep > 1 ? 1 : 0;
        uint64_t b = ir_value_bytes(&g->values[v]);
        if (open[s] && (tmp[s].k == COMM_MULTI_MAX || bytes[s] + b > PARALLEL_BUCKET_BYTES)) {
            bk[nb++] = tmp[s];
            open[s] = false;
        }
        if (!open[s]) {
            open[s] = true;
            tmp[s].k = 0;
            tmp[s].group = s ? COMM_GROUP_EXPERT_DP : COMM_GROUP_DP;
            tmp[s].after = -1;
            bytes[s] = 0;
        }
        tmp[s].vals[tmp[s].k++] = v;
        bytes[s] += b;
        /* a gradient no backward op writes keeps its bucket in the optimizer phase */
        if (last[v] < 0 || tmp[s].after == INT32_MAX)
            tmp[s].after = INT32_MAX;
        else if (last[v] > tmp[s].after)
            tmp[s].after = last[v];
    }
    /* the two last buckets: the one complete first goes first */
    int first = open[0] && open[1] && tmp[1].after < tmp[0].after ? 1 : 0;
    for (int q = 0; q < 2; q++)
        if (open[(first + q) % 2])
            bk[nb++] = tmp[(first + q) % 2];
    /* in the backward phase each bucket goes after its own gradients and
     * after the bucket before it, so the issue order stays as formed; the
     * schedule pass (-O2) then moves each up as its gradients allow */
    for (int b = 0; b < nb; b++) {
        if (b > 0 && bk[b - 1].after > bk[b].after)
            bk[b].after = bk[b - 1].after;
        if (!early || bk[b].after == INT32_MAX)
            bk[b].after = INT32_MAX;
    }
    for (int b = 0; b < nb; b++)
        if (bk[b].after == INT32_MAX)
            bk[b].after = -1;
    int nold = g->nnodes, no = 0;
    int *order = malloc(sizeof(int) * ((size_t)nold + (size_t)nb + 1));
    if (!order)
        abort();
    for (int b = 0; b < nb && !rc; b++)
        emit_bucket(g, bk[b].vals, bk[b].k, bk[b].group, b,
                    bk[b].after >= 0 ? PLAN_PHASE_BACKWARD : PLAN_PHASE_OPTIMIZER);
    for (int i = 0, b = 0; i < nold && !rc; i++) {
        order[no++] = i;
        for (; b < nb && bk[b].after == i; b++)
            order[no++] = nold + b;
        if (i == nold - 1)
            for (; b < nb; b++)   /* the optimizer phase: at its start, after backward */
                order[no++] = nold + b;
    }
    if (!rc && no == nold + nb)
        pu_reorder(g, order, no);
    free(order), free(ready), free(last), free(gr), free(bk);
    return rc;
}

void parallel_explain(const ir_graph *g, FILE *out)
{
    int64_t ranks = g->par_ranks > 0 ? g->par_ranks : 1;
    int64_t ep = g->par_expert > 0 ? g->par_expert : 1;
    int nb = 0, nz = 0;
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].def->lib && strcmp(g->nodes[i].def->lib, COMM_LIB) == 0) {
            if (strncmp(g->nodes[i].def->name, "__zero_", 7) == 0)
                nz++;   /* ZeRO slices, gathers, reduce-scatters (parallel_zero.c) */
            else
                nb++;
        }
    fprintf(out, "process groups (%" PRId64 " ranks, expert %" PRId64 "):\n", ranks, ep);
    comm_print_layout(ranks, ep, out);
    fprintf(out, "  collectives per step: %d gradient all-reduce op%s\n", nb, nb == 1 ? "" : "s");
    if (nz)
        fprintf(out, "  ZeRO stage %" PRId64 " ops per step: %d (slices, parameter all-gathers, "
                "gradient reduce-scatters, the norm's all-reduce)\n", g->par_zero, nz);
}
