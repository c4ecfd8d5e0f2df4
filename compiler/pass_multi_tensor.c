/* pass_multi_tensor.c - one optimizer launch for many params.
 *
 * The optimizer pass writes one AdamW/SGD update per param.  On a GPU each
 * is a kernel launch that moves a few KiB, so small models spend their
 * optimizer step launching.  Rather than pass a list of tensors to a
 * special kernel (an op has at most IR_MAX_PORTS inputs and a kernel
 * PLAN_MAX_KERNEL_ARGS arguments), this pass does what DeepSpeed, Megatron
 * and apex do: it lays the params of a group out back to back in one flat
 * buffer per operand (param, fp32 master, grad, m, v or momentum), makes
 * each param's tensors views into those buffers (ir_value.view_of), and
 * replaces the group's updates by ONE call of the same elementwise kernel
 * over the flat buffers.  The grad zeroing of the group becomes one fill
 * of the flat grad as well.
 *
 * A group: updates with the same kernel, the same attributes (the weight
 * decay, compared bit by bit) and the same hyper and norm inputs.  Members
 * sit at element offsets that are PLAN_ALIGN-aligned in every buffer (so
 * the same element index i names the same weight in p, g, m and v).
 *
 * The gaps between members hold zeros in every buffer: the runtime zeroes
 * pools when it allocates them (CPU and CUDA), no op but the group's own
 * update and fill writes them, and an update keeps a zero element with a
 * zero gradient at zero (AdamW: m = v = 0, p = 0 * decay - lr * 0 / (0 +
 * eps) = 0; SGD: buf = p = 0).  The kernels are elementwise, so even a
 * non-zero gap could not reach a member.
 *
 * Left per tensor: ZeRO plans (their updates act on slice temporaries),
 * frozen and tied params, params whose tensors already are views (or bases
 * of views), and any
 * update whose grad is not zeroed by exactly one whole-tensor fill.  Every
 * other reader of a member (gradient accumulation, all-reduce buckets, the
 * grad-norm sums, checkpoints) still names the member, now a view.
 */
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "pass_util.h"
#include "passes.h"

/* An optimizer update: inputs are per-param operands, then hyper and
 * norm_sq (internal_ops.c). */
static bool mt_is_update(const ir_node *n)
{
    switch (iop_kind_of(n->def)) {
    case IOP_ADAMW: case IOP_SGD: case IOP_ADAMW_BF16: case IOP_SGD_BF16:
    case IOP_ADAMW_F16: case IOP_SGD_F16:
        break;
    default:
        return false;
    }
    int k = n->def->ninputs;
    return !n->is_backward && n->phase == PLAN_PHASE_OPTIMIZER && k > 2 &&
           strcmp(n->def->input_names[k - 2], "hyper") == 0 &&
           strcmp(n->def->input_names[k - 1], "norm_sq") == 0;
}

/* The whole-tensor zero fill of grad value gv in the optimizer phase, if
 * there is exactly one; else -1. */
static int mt_fill_of(const ir_graph *g, int gv)
{
    int found = -1;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        if (iop_kind_of(n->def) != IOP_FILL_INPLACE || n->inputs[0] != gv)
            continue;
        if (found >= 0 || n->phase != PLAN_PHASE_OPTIMIZER || n->attrs[0].f != 0.0 ||
            n->dims[0] != ir_value_numel(&g->values[gv]))
            return -1;
        found = ni;
    }
    return found;
}

/* Update node ni may join a group: it updates one whole, trainable, untied
 * param whose operands are distinct plain values of the right storage. */
static bool mt_eligible(const ir_graph *g, int ni, const bool *taken)
{
    const ir_node *n = &g->nodes[ni];
    int p = n->inputs[0];
    if (p < 0 || p >= g->nvalues || g->values[p].param < 0)
        return false;
    const ir_param *pp = &g->params[g->values[p].param];
    int64_t numel = ir_value_numel(&g->values[p]);
    if (pp->value != p || pp->frozen || pp->tied_to >= 0 || pp->grad < 0 || n->dims[0] != numel ||
        g->values[p].storage != PLAN_ST_PARAM)
        return false;
    bool has_grad = false;
    for (int j = 0; j < n->def->ninputs - 2; j++) {
        int v = n->inputs[j];
        if (v < 0 || v >= g->nvalues || taken[v] || g->values[v].view_of >= 0 ||
            ir_value_numel(&g->values[v]) != numel || g->values[v].storage == PLAN_ST_ACT ||
            g->values[v].storage == PLAN_ST_INPUT)
            return false;
        for (int i = 0; i < j; i++)
            if (n->inputs[i] == v)
                return false;
        has_grad |= v == pp->grad;
    }
    return has_grad && mt_fill_of(g, pp->grad) >= 0;
}

static bool mt_same_group(const ir_node *a, const ir_node *b)
{
    int k = a->def->ninputs;
    return a->def == b->def && ir_scalar_same(a->attrs[0], b->attrs[0]) &&
           a->inputs[k - 2] == b->inputs[k - 2] && a->inputs[k - 1] == b->inputs[k - 1];
}

/* Makes the updates in members[0..nm) one update over flat buffers; marks
 * the nodes it replaces in drop[]. */
static void mt_flatten(ir_graph *g, const int *members, int nm, int gid, bool *drop)
{
    const ir_node *n0 = &g->nodes[members[0]];
    int nper = n0->def->ninputs - 2;
    /* one element offset per member, aligned in the buffer of the smallest
     * element (a bf16 param) and hence in every other */
    uint64_t min_esz = PLAN_ALIGN;
    for (int j = 0; j < nper; j++) {
        uint64_t esz = plan_dtype_size(g->values[n0->inputs[j]].dtype);
        if (esz && esz < min_esz)
            min_esz = esz;
    }
    int64_t step = (int64_t)(PLAN_ALIGN / min_esz), total = 0;
    int64_t *at = malloc(sizeof *at * (size_t)nm);
    if (!at)
        abort();
    for (int k = 0; k < nm; k++) {
        total = (total + step - 1) / step * step;
        at[k] = total;
        total += g->nodes[members[k]].dims[0];
    }
    int flat[IR_MAX_PORTS];
    for (int j = 0; j < nper; j++) {
        ir_value mv = g->values[n0->inputs[j]];   /* copy: ir_value_add may move values */
        flat[j] = ir_value_add(g, ir_strfmt(g, "__mt%d.%s", gid, n0->def->input_names[j]),
                               mv.dtype, mv.storage, 1, &total);
        for (int k = 0; k < nm; k++) {
            ir_value *v = &g->values[g->nodes[members[k]].inputs[j]];
            v->view_of = flat[j];
            v->view_offset = (uint64_t)at[k] * plan_dtype_size(v->dtype);
        }
    }
    /* the grad port: the one that holds the first member's param grad */
    int gport = -1;
    int grad0 = g->params[g->values[n0->inputs[0]].param].grad;
    for (int j = 0; j < nper; j++)
        if (n0->inputs[j] == grad0)
            gport = j;
    int fill0 = -1;
    for (int k = 0; k < nm; k++) {
        int f = mt_fill_of(g, g->nodes[members[k]].inputs[gport]);
        if (fill0 < 0 || f < fill0)
            fill0 = f;
        drop[f] = true;
        if (k > 0)
            drop[members[k]] = true;
    }
    drop[fill0] = false;
    ir_node *u = &g->nodes[members[0]];
    for (int j = 0; j < nper; j++)
        u->inputs[j] = flat[j];
    u->dims[0] = total;
    u->loc = g->train_loc;   /* the update of many params: the optimizer's line */
    u->what = ir_strfmt(g, "%s %d tensors (multi-tensor)", u->def->name + 2, nm);
    ir_node *f = &g->nodes[fill0];
    f->inputs[0] = flat[gport];
    f->dims[0] = total;
    f->loc = g->train_loc;
    f->what = ir_strfmt(g, "zero grad %d tensors (multi-tensor)", nm);
    free(at);
}

int pass_multi_tensor(ir_graph *g, moec_error *err)
{
    (void)err;
    if (g->par_zero > 0)
        return 0;   /* ZeRO: the updates run on slice temporaries (parallel_zero.c) */
    int nn = g->nnodes;
    bool *taken = calloc((size_t)g->nvalues + 1, sizeof *taken);
    int *group = malloc(sizeof(int) * ((size_t)nn + 1));   /* node -> its group's first node */
    int *members = malloc(sizeof(int) * ((size_t)nn + 1));
    bool *drop = calloc((size_t)nn + 1, sizeof *drop);
    if (!taken || !group || !members || !drop)
        abort();
    for (int v = 0; v < g->nvalues; v++)   /* a base of views cannot become a view */
        if (g->values[v].view_of >= 0 && g->values[v].view_of < g->nvalues)
            taken[g->values[v].view_of] = true;
    for (int ni = 0; ni < nn; ni++) {
        group[ni] = -1;
        if (!mt_is_update(&g->nodes[ni]) || !mt_eligible(g, ni, taken))
            continue;
        const ir_node *n = &g->nodes[ni];
        for (int j = 0; j < n->def->ninputs - 2; j++)
            taken[n->inputs[j]] = true;
        group[ni] = ni;
        for (int h = 0; h < ni; h++)
            if (group[h] == h && mt_same_group(&g->nodes[h], n)) {
                group[ni] = h;
                break;
            }
    }
    int gid = 0;
    for (int h = 0; h < nn; h++) {
        if (group[h] != h)
            continue;
        int nm = 0;
        for (int ni = h; ni < nn; ni++)
            if (group[ni] == h)
                members[nm++] = ni;
        if (nm >= 2)   /* a group of one gains nothing: the plan stays as it was */
            mt_flatten(g, members, nm, gid++, drop);
    }
    int nkeep = 0;
    for (int ni = 0; ni < nn; ni++)
        if (!drop[ni])
            members[nkeep++] = ni;
    if (nkeep < nn)
        pu_reorder(g, members, nkeep);
    free(taken), free(group), free(members), free(drop);
    return 0;
}
