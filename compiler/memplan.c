/* memplan.c - fixed pool offsets for every tensor of the step.
 *
 * One pool per storage class; pool index == enum plan_storage.  Params,
 * grads, optimizer state, inputs and buffers live for the whole run and are
 * laid out one after another.  Activations share one pool: the step's node
 * order (forward, backward, optimizer) is fixed, so each activation is live
 * from the first node that touches it to the last, and a best-fit free list
 * (neighbours merged on free, the top of the pool extended only when no hole
 * fits) hands out offsets; the pool's size is the highest point reached.
 * Activations with a role (loss, logits, metrics, grad norm) are read by the
 * runtime between nodes, so they are never shared.
 */
#include "memplan.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "passes.h"

static uint64_t mp_align(uint64_t n)
{
    return (n + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN;
}

uint64_t memplan_size(const ir_value *v)
{
    return mp_align(ir_value_bytes(v));
}

void memplan_liveness(const ir_graph *g, int *first, int *last)
{
    for (int v = 0; v < g->nvalues; v++)
        first[v] = last[v] = -1;
    for (int ni = 0; ni < g->nnodes; ni++) {
        int count;
        const ir_ref *t = iop_template(&g->nodes[ni], &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(&g->nodes[ni], &t[a]);
            if (v < 0 || v >= g->nvalues)
                continue;
            if (first[v] < 0)
                first[v] = ni;
            last[v] = ni;
        }
    }
}

int memplan_pinned(const ir_graph *g, int v)
{
    return g->values[v].role != PLAN_ROLE_NONE || v == g->loss || v == g->logits;
}

/* ---- best-fit allocator over one pool ---------------------------------- */
typedef struct mp_block {
    uint64_t off, size;
} mp_block;

typedef struct mp_alloc {
    mp_block *free;   /* holes, sorted by offset, never adjacent */
    int nfree, cap;
    uint64_t end;     /* top of the pool so far */
} mp_alloc;

static uint64_t mp_take(mp_alloc *a, uint64_t size)
{
    int best = -1;
    for (int i = 0; i < a->nfree; i++)
        if (a->free[i].size >= size && (best < 0 || a->free[i].size < a->free[best].size))
            best = i;
    if (best < 0 && a->nfree > 0 && a->free[a->nfree - 1].off + a->free[a->nfree - 1].size == a->end)
        best = a->nfree - 1;   /* grow the top hole rather than leave it */
    if (best < 0) {
        uint64_t off = a->end;
        a->end += size;
        return off;
    }
    mp_block *b = &a->free[best];
    uint64_t off = b->off;
    if (b->size < size) {      /* the top hole, extended */
        a->end = off + size;
        b->size = size;
    }
    b->off += size;
    b->size -= size;
    if (b->size == 0) {
        memmove(b, b + 1, (size_t)(a->nfree - best - 1) * sizeof *b);
        a->nfree--;
    }
    return off;
}

static void mp_give(mp_alloc *a, uint64_t off, uint64_t size)
{
    int i = 0;
    while (i < a->nfree && a->free[i].off < off)
        i++;
    bool prev = i > 0 && a->free[i - 1].off + a->free[i - 1].size == off;
    bool next = i < a->nfree && off + size == a->free[i].off;
    if (prev && next) {
        a->free[i - 1].size += size + a->free[i].size;
        memmove(&a->free[i], &a->free[i + 1], (size_t)(a->nfree - i - 1) * sizeof *a->free);
        a->nfree--;
    } else if (prev) {
        a->free[i - 1].size += size;
    } else if (next) {
        a->free[i].off = off;
        a->free[i].size += size;
    } else {
        if (a->nfree == a->cap) {
            a->cap = a->cap ? a->cap * 2 : 32;
            a->free = realloc(a->free, (size_t)a->cap * sizeof *a->free);
            if (!a->free)
                abort();  /* out of memory, as ir_alloc */
        }
        memmove(&a->free[i + 1], &a->free[i], (size_t)(a->nfree - i) * sizeof *a->free);
        a->free[i].off = off;
        a->free[i].size = size;
        a->nfree++;
    }
}

/* The param value a tied param value shares storage with, or -1. */
static int mp_tied_root(const ir_graph *g, int v)
{
    int p = g->values[v].param;
    if (p < 0 || g->params[p].tied_to < 0)
        return -1;
    for (int hops = 0; g->params[p].tied_to >= 0 && hops < g->nparams; hops++)
        p = g->params[p].tied_to;
    return g->params[p].value != v ? g->params[p].value : -1;
}

/* Puts view v inside its base, which must be placed, hold no view itself,
 * have v's storage class (a pinned one) and contain v's bytes at an
 * aligned offset: the multi-tensor pass guarantees this, so a failure is a
 * compiler bug, reported rather than planned into overlapping memory. */
static int mp_view_place(ir_graph *g, int v, moec_error *err)
{
    ir_value *val = &g->values[v];
    int b = val->view_of;
    const ir_value *base = b < g->nvalues ? &g->values[b] : NULL;
    const char *why = !base ? "its base is not a value"
                      : base->view_of >= 0 ? "its base is a view itself"
                      : base->storage != val->storage ? "its base has another storage class"
                      : val->storage == PLAN_ST_ACT ? "activations cannot be views"
                      : base->pool < 0 ? "its base has no place in the plan"
                      : val->view_offset % PLAN_ALIGN ? "the offset is not aligned"
                      : val->view_offset > ir_value_bytes(base) ||
                                ir_value_bytes(val) > ir_value_bytes(base) - val->view_offset
                            ? "it does not fit inside its base"
                            : NULL;
    if (why) {
        memset(err, 0, sizeof *err);
        snprintf(err->msg, sizeof err->msg, "internal error: view '%s' at byte %" PRIu64
                 " of value %d: %s", val->name, val->view_offset, b, why);
        snprintf(err->hint, sizeof err->hint, "this is a compiler bug; please report it");
        return -1;
    }
    val->pool = base->pool;
    val->offset = base->offset + val->view_offset;
    return 0;
}

/* Values grouped by key[v] (a node index, -1 = none) into out; returns the
 * run bounds: node i's values are out[beg[i] .. beg[i+1]), in value order. */
static int *mp_bucket(const ir_graph *g, const int *key, int *out)
{
    int *beg = calloc((size_t)g->nnodes + 2, sizeof(int));
    int *pos = malloc(sizeof(int) * ((size_t)g->nnodes + 1));
    if (!beg || !pos)
        abort();
    for (int v = 0; v < g->nvalues; v++)
        if (key[v] >= 0)
            beg[key[v] + 1]++;
    for (int i = 0; i < g->nnodes; i++)
        beg[i + 1] += beg[i];
    memcpy(pos, beg, sizeof(int) * ((size_t)g->nnodes + 1));
    for (int v = 0; v < g->nvalues; v++)
        if (key[v] >= 0)
            out[pos[key[v]]++] = v;
    free(pos);
    return beg;
}

/* ---- second opinions: offline placement in several orders -----------------
 * Online best-fit (above) places values in the order they are born and can
 * leave holes no later value fits.  Knowing every lifetime in advance, the
 * values can be placed in any order, each at the lowest offset (or into the
 * tightest gap) where it overlaps no placed value that is live at the same
 * time: largest first (the classic "greedy by size" planner), longest-lived
 * first, bytes x lifetime first, or the values live at the peak first.  No
 * order wins always (docs/memory.md), so the pass tries each and keeps the
 * smallest pool.  Two values conflict when their node intervals [first,
 * last] intersect: a value dying at node i must not share bytes with one
 * born at node i (the node reads one while writing the other). */
typedef struct mp_item {
    int v, first, last;
    uint64_t off, size;
    int outside;   /* 0: live at the node where the most bytes are live */
} mp_item;

static int mp_by_size(const void *pa, const void *pb)
{
    const mp_item *a = pa, *b = pb;
    if (a->size != b->size)
        return a->size > b->size ? -1 : 1;
    if (a->first != b->first)
        return a->first < b->first ? -1 : 1;
    return a->v < b->v ? -1 : a->v > b->v;
}

/* Other orders for the same offline placement: the longest-lived first,
 * then the largest (long-lived values pinned low leave the top to short
 * ones); and by bytes x lifetime, the value that blocks the most first. */
static int mp_by_life(const void *pa, const void *pb)
{
    const mp_item *a = pa, *b = pb;
    int la = a->last - a->first, lb = b->last - b->first;
    if (la != lb)
        return la > lb ? -1 : 1;
    return mp_by_size(pa, pb);
}

static int mp_by_area(const void *pa, const void *pb)
{
    const mp_item *a = pa, *b = pb;
    double xa = (double)a->size * (a->last - a->first + 1), xb = (double)b->size * (b->last - b->first + 1);
    if (xa != xb)
        return xa > xb ? -1 : 1;
    return mp_by_size(pa, pb);
}

/* The values live at the peak must all fit at once: stacked first from the
 * bottom they take exactly the peak there, and the rest fill around them. */
static int mp_by_peak(const void *pa, const void *pb)
{
    const mp_item *a = pa, *b = pb;
    if (a->outside != b->outside)
        return a->outside < b->outside ? -1 : 1;
    return mp_by_size(pa, pb);
}

static int mp_by_peak_life(const void *pa, const void *pb)
{
    const mp_item *a = pa, *b = pb;
    if (a->outside != b->outside)
        return a->outside < b->outside ? -1 : 1;
    return mp_by_life(pa, pb);
}

static int mp_by_off(const void *pa, const void *pb)
{
    const mp_item *a = *(const mp_item *const *)pa, *b = *(const mp_item *const *)pb;
    return a->off < b->off ? -1 : a->off > b->off;
}

/* Marks the items live at the first node where the most bytes are. */
static void mp_mark_peak(mp_item *items, int n, int nnodes)
{
    int64_t *delta = calloc((size_t)nnodes + 2, sizeof *delta);
    if (!delta)
        abort();
    for (int i = 0; i < n; i++) {
        delta[items[i].first] += (int64_t)items[i].size;
        delta[items[i].last + 1] -= (int64_t)items[i].size;
    }
    int64_t cur = 0, most = -1;
    int at = 0;
    for (int k = 0; k < nnodes; k++) {
        cur += delta[k];
        if (cur > most) {
            most = cur;
            at = k;
        }
    }
    for (int i = 0; i < n; i++)
        items[i].outside = !(items[i].first <= at && at <= items[i].last);
    free(delta);
}

/* Plans the unpinned activations above `base`; returns the pool end and
 * leaves each item's offset in items[]. */
static uint64_t mp_greedy(mp_item *items, int n, uint64_t base, int (*cmp)(const void *, const void *),
                          bool best_gap)
{
    qsort(items, (size_t)n, sizeof *items, cmp);
    mp_item **conf = malloc(sizeof *conf * ((size_t)n + 1));
    if (!conf)
        abort();
    uint64_t end = base;
    for (int i = 0; i < n; i++) {
        int nc = 0;
        for (int j = 0; j < i; j++)
            if (items[j].first <= items[i].last && items[i].first <= items[j].last)
                conf[nc++] = &items[j];
        qsort(conf, (size_t)nc, sizeof *conf, mp_by_off);
        /* walk the gaps between the placed values it overlaps in time: the
         * lowest that fits, or (best_gap) the tightest, else above them all */
        uint64_t cand = base, pick = UINT64_MAX, pick_gap = UINT64_MAX;
        for (int c = 0; c <= nc; c++) {
            uint64_t lim = c < nc ? conf[c]->off : UINT64_MAX;
            if (lim > cand && lim - cand >= items[i].size) {
                uint64_t gap = lim - cand;
                if (pick == UINT64_MAX || (best_gap && gap < pick_gap)) {
                    pick = cand;
                    pick_gap = gap;
                }
                if (!best_gap)
                    break;
            }
            if (c < nc && conf[c]->off + conf[c]->size > cand)
                cand = conf[c]->off + conf[c]->size;
        }
        items[i].off = pick;
        if (pick + items[i].size > end)
            end = pick + items[i].size;
    }
    free(conf);
    return end;
}

int pass_memplan(ir_graph *g, moec_error *err)
{
    int *first = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    int *last = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    int *order = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    if (!first || !last || !order)
        abort();
    memplan_liveness(g, first, last);
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        g->pool_bytes[s] = 0;

    /* pinned pools, in value order; tied params after their roots */
    for (int v = 0; v < g->nvalues; v++) {
        ir_value *val = &g->values[v];
        val->pool = -1;
        val->offset = 0;
        if (val->storage >= PLAN_ST_COUNT) {
            memset(err, 0, sizeof *err);
            snprintf(err->msg, sizeof err->msg, "internal error: value '%s' has storage class %u",
                     val->name, val->storage);
            free(first), free(last), free(order);
            return -1;
        }
        if (val->storage == PLAN_ST_ACT || mp_tied_root(g, v) >= 0 || val->view_of >= 0)
            continue;
        bool keep = val->storage != PLAN_ST_INPUT || first[v] >= 0 || val->role != PLAN_ROLE_NONE;
        if (!keep)
            continue;
        val->pool = val->storage;
        val->offset = (uint64_t)g->pool_bytes[val->storage];
        g->pool_bytes[val->storage] += (int64_t)memplan_size(val);
    }
    /* views inside their (now placed) bases, then tied params, whose root
     * may be a view */
    for (int v = 0; v < g->nvalues; v++) {
        if (g->values[v].view_of < 0)
            continue;
        if (mp_view_place(g, v, err) < 0) {
            free(first), free(last), free(order);
            return -1;
        }
    }
    for (int v = 0; v < g->nvalues; v++) {
        int r = mp_tied_root(g, v);
        if (r >= 0) {
            g->values[v].pool = g->values[r].pool;
            g->values[v].offset = g->values[r].offset;
        }
    }

    /* activations: pinned ones first (whole step), then by first use */
    mp_alloc a = {NULL, 0, 0, 0};
    for (int v = 0; v < g->nvalues; v++) {
        ir_value *val = &g->values[v];
        if (val->storage != PLAN_ST_ACT || !memplan_pinned(g, v))
            continue;
        val->pool = PLAN_ST_ACT;
        val->offset = mp_take(&a, memplan_size(val));
    }
    uint64_t pinned_end = a.end;
    /* values by first and by last use: counting sorts over the node order */
    int *sbeg = mp_bucket(g, first, order);
    int *elist = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    if (!elist)
        abort();
    int *ebeg = mp_bucket(g, last, elist);
    for (int ni = 0; ni < g->nnodes; ni++) {
        for (int k = sbeg[ni]; k < sbeg[ni + 1]; k++) {
            ir_value *val = &g->values[order[k]];
            if (val->storage != PLAN_ST_ACT || memplan_pinned(g, order[k]))
                continue;
            val->pool = PLAN_ST_ACT;
            uint64_t sz = memplan_size(val);
            val->offset = sz ? mp_take(&a, sz) : 0;
        }
        /* after the node's new values are placed, so none overlaps its inputs */
        for (int k = ebeg[ni]; k < ebeg[ni + 1]; k++) {
            ir_value *val = &g->values[elist[k]];
            if (val->storage != PLAN_ST_ACT || memplan_pinned(g, elist[k]))
                continue;
            uint64_t sz = memplan_size(val);
            if (sz)
                mp_give(&a, val->offset, sz);
        }
    }
    free(sbeg), free(ebeg), free(elist);
    g->pool_bytes[PLAN_ST_ACT] = (int64_t)a.end;

    mp_item *items = malloc(sizeof *items * ((size_t)g->nvalues + 1));
    if (!items)
        abort();
    int nitems = 0;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *val = &g->values[v];
        if (val->pool != PLAN_ST_ACT || memplan_pinned(g, v) || memplan_size(val) == 0)
            continue;
        items[nitems++] = (mp_item){v, first[v], last[v], 0, memplan_size(val), 1};
    }
    mp_mark_peak(items, nitems, g->nnodes);
    /* each offline order in turn; the smallest pool wins, ties to the earlier */
    static int (*const orders[])(const void *, const void *) = {mp_by_size, mp_by_life, mp_by_area,
                                                                mp_by_peak, mp_by_peak_life};
    for (size_t o = 0; o < 2 * sizeof orders / sizeof *orders; o++) {
        uint64_t end = mp_greedy(items, nitems, pinned_end, orders[o / 2], o % 2);
        if (end < (uint64_t)g->pool_bytes[PLAN_ST_ACT]) {
            for (int i = 0; i < nitems; i++)
                g->values[items[i].v].offset = items[i].off;
            g->pool_bytes[PLAN_ST_ACT] = (int64_t)end;
        }
    }
    free(items);
    free(a.free);
    free(first), free(last), free(order);
    return 0;
}

uint64_t memplan_peak_live(const ir_graph *g)
{
    int *first = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    int *last = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    int64_t *delta = calloc((size_t)g->nnodes + 2, sizeof *delta);
    if (!first || !last || !delta)
        abort();
    memplan_liveness(g, first, last);
    int64_t pinned = 0;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *val = &g->values[v];
        if (val->storage != PLAN_ST_ACT || val->pool < 0)
            continue;
        int64_t sz = (int64_t)memplan_size(val);
        if (memplan_pinned(g, v) || first[v] < 0) {
            pinned += sz;
        } else {
            delta[first[v]] += sz;
            delta[last[v] + 1] -= sz;
        }
    }
    int64_t cur = 0, peak = 0;
    for (int i = 0; i < g->nnodes; i++) {
        cur += delta[i];
        if (cur > peak)
            peak = cur;
    }
    free(first), free(last), free(delta);
    return (uint64_t)(peak + pinned);
}

int memplan_verify(const ir_graph *g, char *why, size_t whylen)
{
    int *first = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    int *last = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    if (!first || !last)
        abort();
    memplan_liveness(g, first, last);
    int rc = 0;
    for (int v = 0; v < g->nvalues && rc == 0; v++) {
        const ir_value *a = &g->values[v];
        if (a->pool < 0)
            continue;
        if (a->pool != a->storage || a->offset % PLAN_ALIGN != 0 ||
            a->offset + ir_value_bytes(a) > (uint64_t)g->pool_bytes[a->pool]) {
            snprintf(why, whylen, "value %d '%s': pool %d offset %" PRIu64 " size %" PRIu64
                     " outside its pool of %" PRId64 " bytes or misaligned", v, a->name, a->pool,
                     a->offset, ir_value_bytes(a), g->pool_bytes[a->pool]);
            rc = -1;
            break;
        }
        int ta = mp_tied_root(g, v) >= 0 ? mp_tied_root(g, v) : v;
        bool apin = a->storage != PLAN_ST_ACT || memplan_pinned(g, v);
        for (int w = v + 1; w < g->nvalues; w++) {
            const ir_value *b = &g->values[w];
            if (b->pool != a->pool || ir_value_bytes(a) == 0 || ir_value_bytes(b) == 0)
                continue;
            if (a->offset + ir_value_bytes(a) <= b->offset ||
                b->offset + ir_value_bytes(b) <= a->offset)
                continue;
            int tb = mp_tied_root(g, w) >= 0 ? mp_tied_root(g, w) : w;
            if (ta == tb)
                continue;   /* tied params share storage by design */
            if (g->values[ta].view_of == tb || g->values[tb].view_of == ta)
                continue;   /* a view lies inside its base by design */
            bool bpin = b->storage != PLAN_ST_ACT || memplan_pinned(g, w);
            bool disjoint = !apin && !bpin && (last[v] < first[w] || last[w] < first[v]);
            if (!disjoint) {
                snprintf(why, whylen, "values '%s' (nodes %d..%d) and '%s' (nodes %d..%d) "
                         "overlap in pool %s while both live", a->name, first[v], last[v],
                         b->name, first[w], last[w], ir_storage_name(a->pool));
                rc = -1;
                break;
            }
        }
    }
    free(first), free(last);
    return rc;
}
