/* autodiff.c - reverse-mode differentiation of the forward graph.
 *
 * Walks the forward nodes backwards.  Because every consumer of a value comes
 * after its producer, by the time a node is visited the gradients of its
 * outputs are complete; contributions to one value (fan-out, tied weights)
 * are summed as they arrive with one add node each.  A node gets backward
 * work only if some output carries a gradient and some differentiable input
 * leads back to a trainable parameter, so token ids, frozen weights and the
 * paths between them cost nothing.  Each trainable parameter ends with a
 * pinned GRAD tensor that its summed gradient is accumulated into, because
 * gradients add up over grad_accum micro-steps.
 *
 * precision = bf16 (fp16 alike): a value's gradient has the value's dtype (backward
 * kernels write bf16 gradients of bf16 activations and weights; sums use
 * the bf16 add), but every GRAD tensor is fp32 and the bf16 gradient is
 * widened into it (moek_accumulate_bf16), so micro-steps accumulate in fp32.
 */
#include <stdlib.h>
#include <string.h>

#include "internal_ops.h"
#include "passes.h"

typedef struct ad_state {
    ir_graph *g;
    int *grad;        /* per value: value holding d(loss)/d(value) so far, or -1 */
    bool *dep;        /* per value: depends on a trainable param through a differentiable path */
    int nforward;     /* forward nodes (the graph grows while we walk) */
} ad_state;

static void ad_fail(moec_error *err, ir_srcloc loc, const char *hint, const char *msg)
{
    memset(err, 0, sizeof *err);
    err->loc = loc;
    snprintf(err->msg, sizeof err->msg, "%s", msg);
    snprintf(err->hint, sizeof err->hint, "%s", hint ? hint : "");
}

static bool ad_is_float(int dtype)
{
    return dtype == PLAN_F32 || dtype == PLAN_BF16 || dtype == PLAN_F16;
}

/* The param a param value's gradient belongs to: a tied param's goes to the
 * param it shares storage with.  -1 if not a param. */
static int ad_root_param(const ir_graph *g, int value)
{
    int p = g->values[value].param;
    for (int hops = 0; p >= 0 && g->params[p].tied_to >= 0 && hops < g->nparams; hops++)
        p = g->params[p].tied_to;
    return p;
}

static bool ad_trainable(const ir_graph *g, int value)
{
    const ir_value *v = &g->values[value];
    if (v->storage != PLAN_ST_PARAM || !ad_is_float(v->dtype))
        return false;
    int p = ad_root_param(g, value);
    return p >= 0 && !g->params[p].frozen && !g->params[v->param].frozen;
}

/* True if def is moek_add_fwd(IN0, IN1, OUT0, DIM0) over one dim, so a
 * gradient sum can use it with dims[0] = element count. */
static bool ad_plain_add(const ir_opdef *d)
{
    return d && d->ninputs == 2 && d->noutputs == 1 && d->ndims == 1 && d->nattrs == 0 &&
           d->fwd_symbol && strcmp(d->fwd_symbol, "moek_add_fwd") == 0 && d->nfwd == 4 &&
           d->fwd[0].kind == IR_REF_IN && d->fwd[0].index == 0 &&
           d->fwd[1].kind == IR_REF_IN && d->fwd[1].index == 1 &&
           d->fwd[2].kind == IR_REF_OUT && d->fwd[2].index == 0 &&
           d->fwd[3].kind == IR_REF_DIM && d->fwd[3].index == 0;
}

/* Adds contribution c to the gradient of value v (summing if one exists). */
static void ad_contribute(ad_state *s, int v, int c, ir_srcloc loc)
{
    ir_graph *g = s->g;
    int key = v;
    int p = ad_root_param(g, v);
    if (p >= 0)
        key = g->params[p].value;   /* tied weights share one gradient */
    if (s->grad[key] < 0) {
        s->grad[key] = c;
        return;
    }
    const ir_value cv = g->values[c];   /* a copy: ir_value_add may move the array */
    int sum = ir_value_add(g, ir_strfmt(g, "d.%s.sum", g->values[key].name), cv.dtype,
                           PLAN_ST_ACT, cv.ndim, cv.shape);
    int64_t n = ir_value_numel(&cv);
    int ins[2] = {s->grad[key], c};
    /* prefer the stdlib's add when its template is the plain elementwise one */
    const ir_opdef *add = ir_def_find(g, "add");
    if (iop_half_suffix(cv.dtype)) {
        iop_node(g, iop_for_dtype(IOP_ADD, cv.dtype), ins, &sum, n, 0, PLAN_PHASE_BACKWARD, loc,
                 "gradient sum");
    } else if (ad_plain_add(add)) {
        ir_node node;
        memset(&node, 0, sizeof node);
        node.def = add;
        for (int i = 0; i < IR_MAX_PORTS; i++)
            node.inputs[i] = node.outputs[i] = node.grads_in[i] = node.grads_out[i] = -1;
        node.inputs[0] = ins[0];
        node.inputs[1] = ins[1];
        node.outputs[0] = sum;
        node.dims[0] = n;
        node.phase = PLAN_PHASE_BACKWARD;
        node.grad_of = -1;
        node.loc = loc;
        node.what = "gradient sum";
        ir_node_add(g, &node);
    } else {
        iop_node(g, IOP_ADD, ins, &sum, n, 0, PLAN_PHASE_BACKWARD, loc, "gradient sum");
    }
    s->grad[key] = sum;
}

/* Grows the per-value arrays after new values were added. */
static void ad_grow(ad_state *s, int *cap)
{
    if (s->g->nvalues + 16 <= *cap)
        return;
    int ncap = (s->g->nvalues + 16) * 2;
    int *grad = realloc(s->grad, (size_t)ncap * sizeof *grad);
    bool *dep = realloc(s->dep, (size_t)ncap * sizeof *dep);
    if (!grad || !dep)
        abort();  /* out of memory: as ir_alloc does */
    for (int i = *cap; i < ncap; i++) {
        grad[i] = -1;
        dep[i] = false;
    }
    s->grad = grad;
    s->dep = dep;
    *cap = ncap;
}

static bool ad_template_uses(const ir_opdef *d, ir_ref_kind kind, int index)
{
    for (int i = 0; i < d->nbwd; i++)
        if (d->bwd[i].kind == kind && d->bwd[i].index == index)
            return true;
    return false;
}

/* d(output o) of fwd for a backward { } step: the arriving gradient, or
 * zeros when none arrives (cached in *z). */
static int ad_expr_dout(ad_state *s, const ir_node *fwd, int o, int *z, int *cap)
{
    ir_graph *g = s->g;
    int v = fwd->outputs[o];
    if (fwd->def->output_diff[o] && s->grad[v] >= 0)
        return s->grad[v];
    if (*z < 0) {
        const ir_value ov = g->values[v];   /* a copy: ir_value_add may move the array */
        *z = ir_value_add(g, ir_strfmt(g, "d.%s.zero", ov.name), ov.dtype, PLAN_ST_ACT, ov.ndim,
                          ov.shape);
        iop_node(g, iop_for_dtype(IOP_FILL, ov.dtype), NULL, z, ir_value_numel(&ov), 0.0,
                 PLAN_PHASE_BACKWARD, fwd->loc, "zero gradient");
        ad_grow(s, cap);
    }
    return *z;
}

/* IR_BWD_EXPR: adds the steps of fwd's backward { } instance (ir.h) that the
 * wanted gradients need, as plain backward-phase nodes of the step ops. */
static int ad_expr(ad_state *s, int ni, const ir_node *fwd, const bool *need, moec_error *err,
                   int *cap)
{
    ir_graph *g = s->g;
    const ir_opdef *d = fwd->def;
    const ir_bwd_inst *in = NULL;
    for (const ir_bwd_inst *p = d->bwd_expr ? d->bwd_expr->first : NULL; p && !in; p = p->next)
        if (p->key == fwd->outputs[0])
            in = p;
    if (!in) {
        char msg[512];
        snprintf(msg, sizeof msg, "internal error: op %d ('%s') has a backward { } block but no "
                 "instance of it (was it created by a pass after elaboration?)", ni, d->name);
        ad_fail(err, fwd->loc, NULL, msg);
        return -1;
    }
    bool *live = calloc((size_t)in->nsteps + 1, sizeof *live);
    int *val = malloc(sizeof *val * ((size_t)in->nsteps * IR_MAX_PORTS + 1));
    if (!live || !val)
        abort();
    for (int i = 0; i < d->ninputs; i++)
        if (need[i] && in->has_grad[i] && in->grad[i].src == IR_BWD_SRC_STEP)
            live[in->grad[i].index] = true;
    for (int k = in->nsteps - 1; k >= 0; k--)
        for (int i = 0; live[k] && i < in->steps[k].def->ninputs; i++)
            if (in->steps[k].in[i].src == IR_BWD_SRC_STEP)
                live[in->steps[k].in[i].index] = true;
    int zero[IR_MAX_PORTS];
    for (int o = 0; o < IR_MAX_PORTS; o++)
        zero[o] = -1;
    const char *base = fwd->what ? fwd->what : d->name;
    for (int k = 0; k < in->nsteps; k++) {
        if (!live[k])
            continue;
        const ir_bwd_step *st = &in->steps[k];
        ir_node n;
        memset(&n, 0, sizeof n);
        n.def = st->def;
        for (int i = 0; i < IR_MAX_PORTS; i++)
            n.inputs[i] = n.outputs[i] = n.grads_in[i] = n.grads_out[i] = -1;
        for (int i = 0; i < st->def->ninputs; i++) {
            const ir_bwd_ref *r = &st->in[i];
            n.inputs[i] = r->src == IR_BWD_SRC_IN ? fwd->inputs[r->index]
                        : r->src == IR_BWD_SRC_OUT ? fwd->outputs[r->index]
                        : r->src == IR_BWD_SRC_DOUT ? ad_expr_dout(s, fwd, r->index, &zero[r->index], cap)
                        : val[r->index * IR_MAX_PORTS + r->port];
        }
        for (int o = 0; o < st->def->noutputs; o++) {
            val[k * IR_MAX_PORTS + o] = n.outputs[o] =
                ir_value_add(g, ir_strfmt(g, "d.%s.%d.%s", base, k, st->def->output_names[o]),
                             st->out_dtype[o], PLAN_ST_ACT, st->out_ndim[o], st->out_shape[o]);
            ad_grow(s, cap);
        }
        memcpy(n.dims, st->dims, sizeof n.dims);
        memcpy(n.attrs, st->attrs, sizeof n.attrs);
        n.phase = PLAN_PHASE_BACKWARD;
        n.grad_of = -1;
        n.loc = fwd->loc;
        n.what = ir_strfmt(g, "%s (backward: %s)", base, st->def->name);
        ir_node_add(g, &n);
    }
    for (int i = 0; i < d->ninputs; i++) {
        if (!need[i] || !in->has_grad[i])
            continue;
        const ir_bwd_ref *r = &in->grad[i];
        int v = r->src == IR_BWD_SRC_DOUT ? ad_expr_dout(s, fwd, r->index, &zero[r->index], cap)
                                          : val[r->index * IR_MAX_PORTS + r->port];
        ad_contribute(s, fwd->inputs[i], v, fwd->loc);
        ad_grow(s, cap);
    }
    free(live);
    free(val);
    return 0;
}

/* Emits the backward work of forward node ni.  Returns 0 or -1 with err. */
static int ad_node(ad_state *s, int ni, moec_error *err, int *cap)
{
    ir_graph *g = s->g;
    const ir_node fwd = g->nodes[ni];  /* copy: adding nodes may move the array */
    const ir_opdef *d = fwd.def;
    if (d->bwd_kind == IR_BWD_NONE)
        return 0;
    bool any_out = false, any_in = false;
    for (int o = 0; o < d->noutputs; o++)
        any_out |= d->output_diff[o] && fwd.outputs[o] >= 0 && s->grad[fwd.outputs[o]] >= 0;
    bool need[IR_MAX_PORTS] = {false};
    for (int i = 0; i < d->ninputs; i++) {
        int v = fwd.inputs[i];
        need[i] = d->input_diff[i] && v >= 0 && s->dep[v] && ad_is_float(g->values[v].dtype);
        any_in |= need[i];
    }
    if (!any_out || !any_in)
        return 0;
    if (d->bwd_kind == IR_BWD_EXPR)
        return ad_expr(s, ni, &fwd, need, err, cap);

    if (d->bwd_kind == IR_BWD_PASSTHROUGH) {
        int dy = s->grad[fwd.outputs[0]];
        if (dy < 0)
            return 0;
        for (int i = 0; i < d->ninputs; i++) {
            if (!need[i])
                continue;
            if (ir_value_numel(&g->values[fwd.inputs[i]]) != ir_value_numel(&g->values[dy])) {
                char msg[512];
                snprintf(msg, sizeof msg,
                         "op '%s' passes its output gradient through to input '%s', but their "
                         "sizes differ (%lld vs %lld elements)", d->name,
                         d->input_names[i] ? d->input_names[i] : "?",
                         (long long)ir_value_numel(&g->values[fwd.inputs[i]]),
                         (long long)ir_value_numel(&g->values[dy]));
                ad_fail(err, fwd.loc, "a pass-through gradient needs same-shaped inputs; "
                        "declare a backward kernel for a broadcasting op", msg);
                return -1;
            }
            ad_contribute(s, fwd.inputs[i], dy, fwd.loc);
            ad_grow(s, cap);
        }
        return 0;
    }

    if (!d->bwd_symbol || !d->bwd_symbol[0]) {
        char msg[512];
        snprintf(msg, sizeof msg, "op '%s' is differentiable but declares no backward kernel",
                 d->name);
        ad_fail(err, d->loc, "add `backward = <kernel>(...)` to its extern op declaration", msg);
        return -1;
    }
    ir_node b;
    memset(&b, 0, sizeof b);
    b.def = d;
    memcpy(b.inputs, fwd.inputs, sizeof b.inputs);
    memcpy(b.outputs, fwd.outputs, sizeof b.outputs);
    memcpy(b.dims, fwd.dims, sizeof b.dims);
    memcpy(b.attrs, fwd.attrs, sizeof b.attrs);
    b.phase = PLAN_PHASE_BACKWARD;
    b.is_backward = true;
    b.grad_of = ni;
    b.loc = fwd.loc;
    b.what = ir_strfmt(g, "%s (backward)", fwd.what ? fwd.what : d->name);
    for (int i = 0; i < IR_MAX_PORTS; i++)
        b.grads_in[i] = b.grads_out[i] = -1;
    for (int o = 0; o < d->noutputs; o++) {
        int v = fwd.outputs[o];
        if (v < 0)
            continue;
        if (d->output_diff[o] && s->grad[v] >= 0) {
            b.grads_in[o] = s->grad[v];
        } else if (ad_template_uses(d, IR_REF_DOUT, o)) {
            /* the kernel reads d(output) though nothing downstream produced one */
            const ir_value *ov = &g->values[v];
            int z = ir_value_add(g, ir_strfmt(g, "d.%s.zero", ov->name), ov->dtype, PLAN_ST_ACT,
                                 ov->ndim, ov->shape);
            /* g->values[z], not ov: adding z may have moved the values */
            iop_node(g, iop_for_dtype(IOP_FILL, g->values[z].dtype), NULL, &z,
                     ir_value_numel(&g->values[z]), 0.0,
                     PLAN_PHASE_BACKWARD, fwd.loc,
                     "zero gradient");
            b.grads_in[o] = z;
            ad_grow(s, cap);
        }
    }
    for (int i = 0; i < d->ninputs; i++) {
        int v = fwd.inputs[i];
        if (v < 0 || !ad_template_uses(d, IR_REF_DIN, i))
            continue;
        const ir_value *iv = &g->values[v];
        if (!ad_is_float(iv->dtype)) {
            char msg[512];
            snprintf(msg, sizeof msg, "the backward kernel of op '%s' writes a gradient for "
                     "input '%s', which has integer type %s", d->name,
                     d->input_names[i] ? d->input_names[i] : "?", ir_dtype_name(iv->dtype));
            ad_fail(err, d->loc, "integer inputs (indices) have no gradient: drop that DIN "
                    "argument or mark the input nograd", msg);
            return -1;
        }
        /* the kernel writes every DIN it names, wanted or not: give unwanted
         * ones a scratch tensor that dies right after the kernel */
        b.grads_out[i] = ir_value_add(g, ir_strfmt(g, need[i] ? "d.%s" : "d.%s.unused", iv->name),
                                      iv->dtype, PLAN_ST_ACT, iv->ndim, iv->shape);
        ad_grow(s, cap);
    }
    for (int o = 0; o < d->noutputs; o++) {
        if (ad_template_uses(d, IR_REF_DOUT, o) && b.grads_in[o] < 0) {
            char msg[512];
            snprintf(msg, sizeof msg, "the backward kernel of op '%s' reads the gradient of "
                     "output %d, which this use of the op does not produce", d->name, o);
            ad_fail(err, fwd.loc, NULL, msg);
            return -1;
        }
    }
    ir_node_add(g, &b);
    for (int i = 0; i < d->ninputs; i++) {
        if (need[i] && b.grads_out[i] >= 0) {
            ad_contribute(s, fwd.inputs[i], b.grads_out[i], fwd.loc);
            ad_grow(s, cap);
        }
    }
    return 0;
}

int pass_autodiff(ir_graph *g, moec_error *err)
{
    if (g->loss < 0 || g->loss >= g->nvalues) {
        ad_fail(err, g->train_loc, "end the model with `return <loss>`",
                "the model returns no loss, so there is nothing to differentiate");
        return -1;
    }
    const ir_value *lv = &g->values[g->loss];
    if (lv->dtype != PLAN_F32 || ir_value_numel(lv) != 1) {
        char msg[512];
        snprintf(msg, sizeof msg, "the model's loss must be one f32 number, but '%s' is %s with "
                 "%lld elements", lv->name, ir_dtype_name(lv->dtype),
                 (long long)ir_value_numel(lv));
        ad_fail(err, lv->producer >= 0 ? g->nodes[lv->producer].loc : g->train_loc,
                "reduce it to a scalar, e.g. with cross_entropy (a mean)", msg);
        return -1;
    }
    ad_state s = {g, NULL, NULL, g->nnodes};
    int cap = 0;
    ad_grow(&s, &cap);

    /* forward: which values lead back to a trainable param */
    for (int v = 0; v < g->nvalues; v++)
        s.dep[v] = ad_trainable(g, v);
    for (int ni = 0; ni < s.nforward; ni++) {
        const ir_node *n = &g->nodes[ni];
        if (n->is_backward || n->def->bwd_kind == IR_BWD_NONE)
            continue;
        bool dep = false;
        for (int i = 0; i < n->def->ninputs; i++)
            dep |= n->def->input_diff[i] && n->inputs[i] >= 0 && s.dep[n->inputs[i]];
        for (int o = 0; o < n->def->noutputs; o++)
            if (n->outputs[o] >= 0)
                s.dep[n->outputs[o]] = dep && n->def->output_diff[o] &&
                                       ad_is_float(g->values[n->outputs[o]].dtype);
    }

    int64_t one = 1;
    int seed = ir_value_add(g, "loss_seed", PLAN_F32, PLAN_ST_INPUT, 1, &one);
    g->values[seed].role = PLAN_ROLE_LOSS_SEED;
    ad_grow(&s, &cap);
    s.grad[g->loss] = seed;

    for (int ni = s.nforward - 1; ni >= 0; ni--) {
        if (g->nodes[ni].is_backward || g->nodes[ni].phase != PLAN_PHASE_FORWARD)
            continue;
        if (ad_node(&s, ni, err, &cap) < 0) {
            free(s.grad);
            free(s.dep);
            return -1;
        }
    }

    /* pinned GRAD tensors, accumulated over micro-steps */
    for (int p = 0; p < g->nparams; p++) {
        ir_param *pp = &g->params[p];
        pp->grad = -1;
        if (pp->tied_to >= 0 || !ad_trainable(g, pp->value))
            continue;
        const ir_value *pv = &g->values[pp->value];
        /* fp32 whatever the param's dtype: accumulated over micro-steps */
        int gv = ir_value_add(g, ir_strfmt(g, "%s.grad", pv->name), PLAN_F32, PLAN_ST_GRAD,
                              pv->ndim, pv->shape);
        ad_grow(&s, &cap);
        pp = &g->params[p];
        pp->grad = gv;
        int src = s.grad[pp->value];
        if (src >= 0) {
            int ins[2] = {gv, src};
            iop_node(g, iop_for_dtype(IOP_ACCUMULATE, g->values[src].dtype), ins, NULL,
                     ir_value_numel(&g->values[gv]), 0,
                     PLAN_PHASE_BACKWARD, pp->loc, ir_strfmt(g, "accumulate %s.grad",
                                                           g->values[pp->value].name));
        }
    }
    /* tied params share the gradient of the param they are tied to */
    for (int p = 0; p < g->nparams; p++) {
        int r = ad_root_param(g, g->params[p].value);
        if (r != p && r >= 0)
            g->params[p].grad = g->params[r].grad;
    }
    free(s.grad);
    free(s.dep);
    return 0;
}
