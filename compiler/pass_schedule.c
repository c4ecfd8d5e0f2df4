/* pass_schedule.c - order ops to lower the peak of live activation bytes.
 *
 * Within each phase (forward, backward, optimizer: the runtime runs them as
 * blocks, forward + backward once per micro-step) the ops may run in any
 * order their data allows.  Dependencies come from the values two ops
 * touch: a reader after the writer before it, a writer after the readers
 * and the writer before it (pass_util.h says which arguments a kernel
 * writes).  Two reads of one value do not order anything.
 *
 * The list scheduler keeps the current order except where an op that is
 * ready frees more activation bytes than it allocates: such an op runs at
 * once (the one freeing most first); a second candidate always runs the
 * ready op with the best balance of freed minus allocated bytes.  The main catch is autodiff's layout,
 * which adds every weight gradient into its GRAD tensor at the very end of
 * the backward pass: each d.<weight> would stay live through the whole
 * backward pass; scheduled, each is accumulated and freed as soon as it is
 * complete.  Recompute copies allocate, so they stay right before their
 * first reader.  Each candidate order gets a trial memory plan; the one
 * with the smallest act pool and peak of live bytes is kept, and the
 * original order unless a candidate is better in one and no worse in the
 * other; nothing any kernel computes changes, so loss and gradients are
 * bit for bit those of the unscheduled plan
 * (tests/unit/test_compiler_pass_schedule.c).
 *
 * ZeRO-3 gathers are pinned one layer ahead: every gather of prefetch
 * group k+1 is ordered before every reader of group k's copies (the rule
 * parallel_zero.c placed them by), then sunk to just before the first op
 * that needs it, so its copy lives no longer than that rule asks.
 *
 * Then, on a multi-rank plan, the in-place collectives of forward and
 * backward (gradient buckets, ZeRO reduce-scatters) are issued as early as
 * their data allows, with the ops they wait for pulled up before them, so a
 * communication stream can overlap the rest of backward - if that costs no
 * memory (docs/parallel.md, "Overlap"; tests/unit/test_schedule_overlap.c).
 *
 * Runs at -O2 after recompute and before in-place and memplan.
 */
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "memplan.h"
#include "parallel_zero.h"
#include "pass_util.h"
#include "passes.h"
#include "../runtime/comm.h"

typedef struct sc_state {
    ir_graph *g;
    int *left;        /* per value: nodes not yet scheduled that touch it */
    bool *touched;    /* per value: a scheduled node touched it */
    int *indeg;       /* per node: unscheduled predecessors */
    int *succ, *sbeg; /* per node: successors succ[sbeg[n] .. sbeg[n+1]) */
    const int *zgrp;  /* per value: its ZeRO-3 prefetch group, or -1 (zero3_prefetch_groups) */
} sc_state;

/* Distinct values node ni touches, into vs (IR_MAX tensor args at most). */
static int sc_values(const ir_graph *g, int ni, int *vs)
{
    int count, n = 0;
    const ir_ref *t = iop_template(&g->nodes[ni], &count);
    for (int a = 0; a < count; a++) {
        int v = iop_ref_value(&g->nodes[ni], &t[a]);
        if (v < 0 || v >= g->nvalues)
            continue;
        bool dup = false;
        for (int k = 0; k < n; k++)
            dup |= vs[k] == v;
        if (!dup)
            vs[n++] = v;
    }
    return n;
}

/* Bytes node ni frees (values it touches last) minus bytes it allocates
 * (values it touches first), over plain activations. */
static int64_t sc_net(const sc_state *s, int ni)
{
    int vs[PLAN_MAX_KERNEL_ARGS];
    int n = sc_values(s->g, ni, vs);
    int64_t net = 0;
    for (int k = 0; k < n; k++) {
        if (!pu_plain_act(s->g, vs[k]))
            continue;
        int64_t sz = (int64_t)memplan_size(&s->g->values[vs[k]]);
        if (!s->touched[vs[k]])
            net -= sz;
        if (s->left[vs[k]] == 1)
            net += sz;
    }
    return net;
}

/* Edges between nodes [lo, hi) from the values they touch. */
static void sc_edges(sc_state *s, int lo, int hi)
{
    ir_graph *g = s->g;
    int *lastw = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    int *rbeg = calloc((size_t)g->nvalues + 1, sizeof(int));   /* readers since the last write */
    int cap = 64, nedge = 0;
    int *ea = malloc(sizeof(int) * (size_t)cap), *eb = malloc(sizeof(int) * (size_t)cap);
    int **readers = calloc((size_t)g->nvalues + 1, sizeof(int *));
    if (!lastw || !rbeg || !ea || !eb || !readers)
        abort();   /* out of memory, as ir_alloc */
    for (int v = 0; v < g->nvalues; v++)
        lastw[v] = -1;
#define SC_EDGE(a, b)                                                                  \
    do {                                                                               \
        if (nedge == cap) {                                                            \
            cap *= 2;                                                                  \
            ea = realloc(ea, sizeof(int) * (size_t)cap);                               \
            eb = realloc(eb, sizeof(int) * (size_t)cap);                               \
            if (!ea || !eb)                                                            \
                abort();                                                               \
        }                                                                              \
        ea[nedge] = (a), eb[nedge] = (b), nedge++;                                     \
    } while (0)
    for (int ni = lo; ni < hi; ni++) {
        const ir_node *n = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(n, &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= g->nvalues)
                continue;
            if (pu_reads(n, &t[a]) && lastw[v] >= 0 && lastw[v] != ni)
                SC_EDGE(lastw[v], ni);
            if (pu_writes(n, &t[a])) {
                if (lastw[v] >= 0 && lastw[v] != ni)
                    SC_EDGE(lastw[v], ni);
                for (int k = 0; k < rbeg[v]; k++)
                    if (readers[v][k] != ni)
                        SC_EDGE(readers[v][k], ni);
            }
        }
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= g->nvalues)
                continue;
            if (pu_writes(n, &t[a])) {
                lastw[v] = ni;
                rbeg[v] = 0;
            } else if (pu_reads(n, &t[a])) {
                readers[v] = realloc(readers[v], sizeof(int) * ((size_t)rbeg[v] + 1));
                if (!readers[v])
                    abort();
                readers[v][rbeg[v]++] = ni;
            }
        }
    }
    /* ZeRO-3 pins: every gather of prefetch group k + 1 before every reader
     * of group k, so no order undoes "one layer ahead" (a gather reads only
     * a param slice, so it has no predecessor here and no cycle can form) */
    for (int ni = lo; s->zgrp && ni < hi; ni++) {
        if (!zero3_is_gather(g, ni) || g->nodes[ni].outputs[0] < 0)
            continue;
        int k = s->zgrp[g->nodes[ni].outputs[0]];
        for (int nj = lo; k > 0 && nj < hi; nj++) {
            if (zero3_is_gather(g, nj))
                continue;
            int vs[PLAN_MAX_KERNEL_ARGS], nv = sc_values(g, nj, vs);
            bool reads = false;
            for (int a = 0; a < nv; a++)
                reads |= s->zgrp[vs[a]] == k - 1;
            if (reads)
                SC_EDGE(ni, nj);
        }
    }
#undef SC_EDGE
    for (int k = 0; k < nedge; k++) {
        s->sbeg[ea[k] + 1]++;
        s->indeg[eb[k]]++;
    }
    for (int ni = lo; ni < hi; ni++)
        s->sbeg[ni + 1] += s->sbeg[ni];
    int *pos = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    s->succ = malloc(sizeof(int) * ((size_t)nedge + 1));
    if (!pos || !s->succ)
        abort();
    memcpy(pos, s->sbeg, sizeof(int) * ((size_t)g->nnodes + 1));
    for (int k = 0; k < nedge; k++)
        s->succ[pos[ea[k]]++] = eb[k];
    free(pos);
    for (int v = 0; v < g->nvalues; v++)
        free(readers[v]);
    free(readers), free(lastw), free(rbeg), free(ea), free(eb);
}

/* A collective that updates its tensors in place (no outputs: a gradient
 * all-reduce bucket, a ZeRO reduce-scatter or gather) inside forward or
 * backward.  Issued early, it runs on a communication stream while the
 * compute after it goes on; EP exchanges have outputs that the next op
 * reads at once, so they stay where they are. */
static bool sc_early_comm(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    return n->phase != PLAN_PHASE_OPTIMIZER && !n->is_backward && n->def->lib &&
           strcmp(n->def->lib, COMM_LIB) == 0 && n->def->noutputs == 0;
}

/* Marks in anc[] (indexed from lo) every unscheduled node the collective c
 * waits for, directly or not, c included. */
static void sc_ancestors(const int *pbeg, const int *pred, const bool *done, int lo, int c,
                         bool *anc, int *stack)
{
    int top = 0;
    anc[c - lo] = true;
    stack[top++] = c;
    while (top) {
        int x = stack[--top];
        for (int k = pbeg[x - lo]; k < pbeg[x - lo + 1]; k++) {
            int p = pred[k];
            if (!done[p - lo] && !anc[p - lo]) {
                anc[p - lo] = true;
                stack[top++] = p;
            }
        }
    }
}

/* Schedules the nodes [lo, hi) of one phase into order (appended at *n).
 * greedy 0: keep the order, but run at once any ready op that frees more
 * than it allocates; greedy 1: always the ready op with the best balance;
 * SC_COMM: keep the order, but run first what the next collective waits
 * for (the weight-gradient ops and accumulates of its bucket), then the
 * collective, so it is issued as early as its data allows. */
#define SC_COMM 2
static void sc_phase(sc_state *s, int lo, int hi, int *order, int *n, int greedy)
{
    memset(s->sbeg, 0, sizeof(int) * ((size_t)s->g->nnodes + 1));
    sc_edges(s, lo, hi);
    size_t len = (size_t)(hi - lo) + 1;
    bool *done = calloc(len, sizeof *done), *anc = calloc(len, sizeof *anc);
    int *pbeg = calloc(len + 1, sizeof *pbeg), *stack = malloc(sizeof(int) * len);
    int *pred = malloc(sizeof(int) * ((size_t)s->sbeg[hi] + 1));
    if (!done || !anc || !pbeg || !stack || !pred)
        abort();
    if (greedy == SC_COMM) {   /* predecessors: the successor lists inverted */
        for (int ni = lo; ni < hi; ni++)
            for (int k = s->sbeg[ni]; k < s->sbeg[ni + 1]; k++)
                pbeg[s->succ[k] - lo + 1]++;
        for (size_t i = 0; i + 1 < len + 1; i++)
            pbeg[i + 1] += pbeg[i];
        int *pos = malloc(sizeof(int) * len);
        if (!pos)
            abort();
        memcpy(pos, pbeg, sizeof(int) * len);
        for (int ni = lo; ni < hi; ni++)
            for (int k = s->sbeg[ni]; k < s->sbeg[ni + 1]; k++)
                pred[pos[s->succ[k] - lo]++] = ni;
        free(pos);
    }
    int target = -1;
    for (int step = lo; step < hi; step++) {
        int pick = -1, first_ready = -1;
        int64_t best = 0;
        if (greedy == SC_COMM && (target < 0 || done[target - lo])) {
            target = -1;
            for (int ni = lo; ni < hi && target < 0; ni++)
                if (!done[ni - lo] && sc_early_comm(s->g, ni))
                    target = ni;
            memset(anc, 0, len * sizeof *anc);
            if (target >= 0)
                sc_ancestors(pbeg, pred, done, lo, target, anc, stack);
        }
        for (int ni = lo; ni < hi; ni++) {
            if (done[ni - lo] || s->indeg[ni] > 0)
                continue;
            if (first_ready < 0)
                first_ready = ni;
            if (greedy == SC_COMM) {
                if (target >= 0 && anc[ni - lo]) {
                    pick = ni;
                    break;
                }
                continue;
            }
            int64_t net = sc_net(s, ni);
            if (net > best || (greedy && pick < 0)) {
                best = net;
                pick = ni;
            }
        }
        if (pick < 0)
            pick = first_ready;
        done[pick - lo] = true;
        order[(*n)++] = pick;
        for (int k = s->sbeg[pick]; k < s->sbeg[pick + 1]; k++)
            s->indeg[s->succ[k]]--;
        int vs[PLAN_MAX_KERNEL_ARGS];
        int nv = sc_values(s->g, pick, vs);
        for (int k = 0; k < nv; k++) {
            s->left[vs[k]]--;
            s->touched[vs[k]] = true;
        }
    }
    free(done), free(anc), free(pbeg), free(stack), free(pred);
    free(s->succ);
    s->succ = NULL;
}

/* Moves every ZeRO-3 gather of order[] down to just before the first op
 * that needs it: a reader of its copy, or (the pin) a reader of the group
 * before its own; the end of its phase at the latest.  The list schedules
 * may run a gather early (it is always ready); as late as the pins allow,
 * the gathered copies live no longer than "one layer ahead" asks.  Gathers
 * that land before the same op keep their order. */
static void sc_sink_gathers(const ir_graph *g, int *order, int n, const int *zgrp)
{
    int *out = malloc(sizeof(int) * ((size_t)n + 1)), *pend = malloc(sizeof(int) * ((size_t)n + 1));
    int no = 0, np = 0;
    if (!out || !pend)
        abort();   /* out of memory, as ir_alloc */
    for (int i = 0; i < n; i++) {
        int ni = order[i];
        if (zero3_is_gather(g, ni) && g->nodes[ni].outputs[0] >= 0) {
            pend[np++] = ni;
            continue;
        }
        int vs[PLAN_MAX_KERNEL_ARGS], nv = sc_values(g, ni, vs), keep = 0;
        for (int k = 0; k < np; k++) {
            int gi = pend[k], v = g->nodes[gi].outputs[0], grp = zgrp[v];
            bool need = g->nodes[gi].phase != g->nodes[ni].phase;
            for (int a = 0; a < nv && !need; a++)
                need = vs[a] == v || (grp > 0 && zgrp[vs[a]] == grp - 1);
            if (need)
                out[no++] = gi;
            else
                pend[keep++] = gi;
        }
        np = keep;
        out[no++] = ni;
    }
    for (int k = 0; k < np; k++)
        out[no++] = pend[k];
    memcpy(order, out, sizeof(int) * (size_t)n);
    free(out), free(pend);
}

/* One candidate order of all nodes, by the greedy rule. */
static void sc_order(ir_graph *g, int greedy, int *order, const int *zgrp)
{
    sc_state s;
    memset(&s, 0, sizeof s);
    s.g = g;
    s.zgrp = zgrp;
    s.left = calloc((size_t)g->nvalues + 1, sizeof *s.left);
    s.touched = calloc((size_t)g->nvalues + 1, sizeof *s.touched);
    s.indeg = calloc((size_t)g->nnodes + 1, sizeof *s.indeg);
    s.sbeg = calloc((size_t)g->nnodes + 2, sizeof *s.sbeg);
    if (!s.left || !s.touched || !s.indeg || !s.sbeg)
        abort();   /* out of memory, as ir_alloc */
    for (int ni = 0; ni < g->nnodes; ni++) {
        int vs[PLAN_MAX_KERNEL_ARGS];
        int nv = sc_values(g, ni, vs);
        for (int k = 0; k < nv; k++)
            s.left[vs[k]]++;
    }
    int n = 0;
    for (int lo = 0; lo < g->nnodes;) {
        int hi = lo;
        while (hi < g->nnodes && g->nodes[hi].phase == g->nodes[lo].phase)
            hi++;
        sc_phase(&s, lo, hi, order, &n, greedy);
        lo = hi;
    }
    if (zgrp)
        sc_sink_gathers(g, order, n, zgrp);
    free(s.left), free(s.touched), free(s.indeg), free(s.sbeg);
}

/* What an order costs: the act pool a trial memory plan needs, then the
 * peak of live bytes (the pool adds fragmentation to it). */
typedef struct sc_cost {
    int64_t pool;
    uint64_t peak;
} sc_cost;

static sc_cost sc_measure(ir_graph *g)
{
    moec_error e;
    sc_cost c = {INT64_MAX, pu_peak_bytes(g)};
    if (pass_memplan(g, &e) == 0)
        c.pool = g->pool_bytes[PLAN_ST_ACT];
    return c;
}

static bool sc_better(sc_cost a, sc_cost b)
{
    return a.pool <= b.pool && a.peak <= b.peak && (a.pool < b.pool || a.peak < b.peak);
}

/* Moves every such collective up to just after the last op before it that
 * touches one of its tensors (any touch orders it: it writes them all), but
 * never before the collective issued before it: the collectives keep their
 * order (one plan for every rank, so every rank issues them alike).
 * Returns how many moved. */
static int sc_hoist_comm(ir_graph *g)
{
    int nnodes = g->nnodes, no = 0, moved = 0, lastc = -1;
    int *order = malloc(sizeof(int) * ((size_t)nnodes + 1));
    if (!order)
        abort();   /* out of memory, as ir_alloc */
    for (int ni = 0; ni < nnodes; ni++) {
        if (ni > 0 && g->nodes[ni].phase != g->nodes[ni - 1].phase)
            lastc = no - 1;   /* never across a phase boundary */
        if (!sc_early_comm(g, ni)) {
            order[no++] = ni;
            continue;
        }
        int vs[PLAN_MAX_KERNEL_ARGS], nv = sc_values(g, ni, vs), at = lastc;
        for (int k = no - 1; k > lastc && at == lastc; k--) {
            int ws[PLAN_MAX_KERNEL_ARGS], nw = sc_values(g, order[k], ws);
            for (int a = 0; a < nv && at == lastc; a++)
                for (int b = 0; b < nw; b++)
                    if (vs[a] == ws[b]) {
                        at = k;
                        break;
                    }
        }
        moved += at + 1 != no;
        memmove(&order[at + 2], &order[at + 1], sizeof(int) * (size_t)(no - at - 1));
        order[at + 1] = ni;
        no++;
        lastc = at + 1;
    }
    if (moved)
        pu_reorder(g, order, no);
    free(order);
    return moved;
}

/* The memory-minded order: the best of the original order and the two list
 * schedules (sc_better).  Leaves it in g; returns its cost. */
static sc_cost sc_by_memory_pinned(ir_graph *g, const int *zgrp)
{
    int nnodes = g->nnodes;
    int *order = malloc(sizeof(int) * ((size_t)nnodes + 1));
    ir_node *orig = malloc(sizeof *orig * ((size_t)nnodes + 1));
    ir_node *best = malloc(sizeof *best * ((size_t)nnodes + 1));
    if (!order || !orig || !best)
        abort();   /* out of memory, as ir_alloc */
    memcpy(orig, g->nodes, sizeof *orig * (size_t)nnodes);
    memcpy(best, orig, sizeof *orig * (size_t)nnodes);
    sc_cost best_cost = sc_measure(g);
    for (int greedy = 0; greedy <= 1; greedy++) {
        memcpy(g->nodes, orig, sizeof *orig * (size_t)nnodes);
        g->nnodes = nnodes;
        sc_order(g, greedy, order, zgrp);
        pu_reorder(g, order, nnodes);
        sc_cost c = sc_measure(g);
        if (sc_better(c, best_cost)) {
            best_cost = c;
            memcpy(best, g->nodes, sizeof *best * (size_t)nnodes);
        }
    }
    memcpy(g->nodes, best, sizeof *best * (size_t)nnodes);
    for (int k = 0; k < nnodes; k++)
        order[k] = k;
    pu_reorder(g, order, nnodes);
    free(order), free(orig), free(best);
    return best_cost;
}

/* The ZeRO-3 pins of g's current order (zero3_prefetch_groups) into zgrp;
 * false when there is nothing to pin (fewer than two groups). */
static bool sc_pins(const ir_graph *g, int *zgrp)
{
    return zero3_prefetch_groups(g, zgrp) > 1;
}

/* sc_by_memory_pinned with the pins of the order g has now. */
static sc_cost sc_by_memory(ir_graph *g)
{
    int *zgrp = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    if (!zgrp)
        abort();   /* out of memory, as ir_alloc */
    sc_cost c = sc_by_memory_pinned(g, sc_pins(g, zgrp) ? zgrp : NULL);
    free(zgrp);
    return c;
}

/* Then the collectives as early as their data allows: first with what they
 * wait for pulled up too (SC_COMM), else the collectives alone; either only
 * if it costs no memory over `base`.  Without a collective in forward or
 * backward (every one-rank plan) nothing changes. */
static void sc_comm_early(ir_graph *g, sc_cost base, const int *zgrp)
{
    int nnodes = g->nnodes;
    bool comm = false;
    for (int ni = 0; ni < nnodes && !comm; ni++)
        comm = sc_early_comm(g, ni);
    if (!comm)
        return;
    int *order = malloc(sizeof(int) * ((size_t)nnodes + 1));
    ir_node *keep = malloc(sizeof *keep * ((size_t)nnodes + 1));
    if (!order || !keep)
        abort();
    memcpy(keep, g->nodes, sizeof *keep * (size_t)nnodes);
    for (int pull = 1; pull >= 0; pull--) {
        if (pull) {
            sc_order(g, SC_COMM, order, zgrp);
            pu_reorder(g, order, nnodes);
        }
        sc_hoist_comm(g);
        sc_cost c = sc_measure(g);
        if (c.pool <= base.pool && c.peak <= base.peak)
            break;
        memcpy(g->nodes, keep, sizeof *keep * (size_t)nnodes);
        for (int k = 0; k < nnodes; k++)
            order[k] = k;
        pu_reorder(g, order, nnodes);
    }
    free(order), free(keep);
}

int pass_schedule(ir_graph *g, moec_error *err)
{
    (void)err;
    /* the memory order needs the phases as blocks in order; otherwise (an
     * optimizer-phase op inside forward: the router bias update) only the
     * collectives move, each inside its run of one phase, which keeps every
     * op's order against the ops of other runs */
    bool blocks = true;
    for (int ni = 1; ni < g->nnodes; ni++)
        blocks &= g->nodes[ni].phase >= g->nodes[ni - 1].phase;
    /* ZeRO-3 gathers stay one layer ahead: their groups are taken from the
     * order parallel_zero.c made, before anything here moves them */
    int *zgrp = malloc(sizeof(int) * ((size_t)g->nvalues + 1));
    if (!zgrp)
        abort();   /* out of memory, as ir_alloc */
    bool pins = sc_pins(g, zgrp);
    sc_comm_early(g, blocks ? sc_by_memory(g) : sc_measure(g), pins ? zgrp : NULL);
    free(zgrp);
    /* the trial plans are dropped: memplan runs again at the end of the pipeline */
    for (int v = 0; v < g->nvalues; v++) {
        g->values[v].pool = -1;
        g->values[v].offset = 0;
    }
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        g->pool_bytes[s] = 0;
    return 0;
}
