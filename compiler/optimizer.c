/* optimizer.c - the optimizer step as ops of the plan's last phase.
 *
 * The runtime writes the per-step numbers (lr from the schedule and the step
 * number, bias corrections, clip threshold) into the `hyper` input, so the
 * ops themselves never change between steps.  Order: global grad norm
 * squared (one sum over every gradient), one AdamW/SGD update per trainable
 * param (each clips by that norm), then the gradients are zeroed for the
 * next step's accumulation.
 *
 * A half param (precision = bf16 or fp16) gets an fp32 master copy, an OPTSTATE
 * value "<param>.master": the update runs on the master and rounds it into
 * the half working copy (moek_adamw_bf16 / moek_sgd_bf16, or _f16).  Its gradient is
 * already fp32 (autodiff), so the norm and the zeroing are unchanged.
 */
#include <string.h>

#include "internal_ops.h"
#include "parallel_zero.h"
#include "parallel_ep.h"
#include "passes.h"
#include "../kernels/moek.h"

int pass_optimizer(ir_graph *g, moec_error *err)
{
    if (g->train.optimizer != PLAN_OPT_ADAMW && g->train.optimizer != PLAN_OPT_SGD) {
        memset(err, 0, sizeof *err);
        err->loc = g->train_loc;
        snprintf(err->msg, sizeof err->msg, "unknown optimizer (code %u)", g->train.optimizer);
        snprintf(err->hint, sizeof err->hint, "use adamw(...) or sgd(...) in train { }");
        return -1;
    }
    bool sgd = g->train.optimizer == PLAN_OPT_SGD;
    int64_t nh = MOEK_HYPER_COUNT, one = 1;
    int hyper = -1;   /* the model may already read it (hyper() in the language: router jitter) */
    for (int v = 0; v < g->nvalues && hyper < 0; v++)
        if (g->values[v].role == PLAN_ROLE_HYPER)
            hyper = v;
    if (hyper < 0)
        hyper = ir_value_add(g, "hyper", PLAN_F32, PLAN_ST_INPUT, 1, &nh);
    g->values[hyper].role = PLAN_ROLE_HYPER;
    int norm = ir_value_add(g, "grad_norm_sq", PLAN_F32, PLAN_ST_ACT, 1, &one);
    g->values[norm].role = PLAN_ROLE_NORM_SQ;
    ir_srcloc loc = g->train_loc;
    for (int p = 0; p < g->nparams; p++)
        g->params[p].state0 = g->params[p].state1 = g->params[p].master = -1;

    iop_node(g, IOP_FILL, NULL, &norm, 1, 0.0, PLAN_PHASE_OPTIMIZER, loc, "grad norm reset");
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->grad < 0 || pp->tied_to >= 0)
            continue;
        int ins[2] = {pp->grad, norm};
        iop_node(g, IOP_SUMSQ_ACCUM, ins, NULL, ir_value_numel(&g->values[pp->grad]), 0,
                 PLAN_PHASE_OPTIMIZER, pp->loc, "grad norm");
    }
    if (parallel_ep_norm(g, norm, err))   /* expert shards: each expert counted once */
        return -1;
    for (int p = 0; p < g->nparams; p++) {
        if (g->params[p].grad < 0 || g->params[p].tied_to >= 0)
            continue;
        ir_value pv = g->values[g->params[p].value];  /* copy: values may move */
        double wd = g->params[p].decay ? g->train.weight_decay : 0.0;
        int64_t n = ir_value_numel(&pv);
        int s0 = ir_value_add(g, ir_strfmt(g, sgd ? "%s.momentum" : "%s.adam_m", pv.name),
                              PLAN_F32, PLAN_ST_OPTSTATE, pv.ndim, pv.shape);
        int s1 = -1;
        if (!sgd)
            s1 = ir_value_add(g, ir_strfmt(g, "%s.adam_v", pv.name), PLAN_F32, PLAN_ST_OPTSTATE,
                              pv.ndim, pv.shape);
        int master = -1;
        if (iop_half_suffix(pv.dtype))
            master = ir_value_add(g, ir_strfmt(g, "%s.master", pv.name), PLAN_F32, PLAN_ST_OPTSTATE,
                                  pv.ndim, pv.shape);
        ir_param *pp = &g->params[p];
        pp->state0 = s0;
        pp->state1 = s1;
        pp->master = master;
        if (master >= 0 && sgd) {
            int ins[6] = {pp->value, master, pp->grad, s0, hyper, norm};
            iop_node(g, iop_for_dtype(IOP_SGD, pv.dtype), ins, NULL, n, wd, PLAN_PHASE_OPTIMIZER, pp->loc,
                     ir_strfmt(g, "sgd %s", pv.name));
        } else if (master >= 0) {
            int ins[7] = {pp->value, master, pp->grad, s0, s1, hyper, norm};
            iop_node(g, iop_for_dtype(IOP_ADAMW, pv.dtype), ins, NULL, n, wd, PLAN_PHASE_OPTIMIZER, pp->loc,
                     ir_strfmt(g, "adamw %s", pv.name));
        } else if (sgd) {
            int ins[5] = {pp->value, pp->grad, s0, hyper, norm};
            iop_node(g, IOP_SGD, ins, NULL, n, wd, PLAN_PHASE_OPTIMIZER, pp->loc,
                     ir_strfmt(g, "sgd %s", pv.name));
        } else {
            int ins[6] = {pp->value, pp->grad, s0, s1, hyper, norm};
            iop_node(g, IOP_ADAMW, ins, NULL, n, wd, PLAN_PHASE_OPTIMIZER, pp->loc,
                     ir_strfmt(g, "adamw %s", pv.name));
        }
    }
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->grad < 0 || pp->tied_to >= 0)
            continue;
        int in = pp->grad;
        iop_node(g, IOP_FILL_INPLACE, &in, NULL, ir_value_numel(&g->values[in]), 0.0,
                 PLAN_PHASE_OPTIMIZER, pp->loc, "zero grad");
    }
    /* tied params share the other param's optimizer state */
    for (int p = 0; p < g->nparams; p++) {
        int r = g->params[p].tied_to;
        for (int hops = 0; r >= 0 && g->params[r].tied_to >= 0 && hops < g->nparams; hops++)
            r = g->params[r].tied_to;
        if (r >= 0) {
            g->params[p].state0 = g->params[r].state0;
            g->params[p].state1 = g->params[r].state1;
            g->params[p].master = g->params[r].master;
        }
    }
    return pass_zero(g, err);   /* ZeRO shards what was just built (parallel_zero.c) */
}
