/* explain.c - `moec --explain`: what the model costs, before anything runs.
 *
 * Parameter counts, training FLOPs per token (6N + 6LCT, Kaplan et al.; N =
 * parameters a token touches), the bytes of every pool of this plan, and the
 * per-rank model-state bytes of the parallel layout under each ZeRO stage
 * (docs/memory.md has the formulas).
 */
#include "explain.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diag.h"
#include "internal_ops.h"
#include "memplan.h"
#include "parallel_zero.h"
#include "pass_util.h"
#include "passes.h"
#include "../kernels/moek.h"
#include "../runtime/comm.h"

static double ex_comm_buffer_bytes(const ir_graph *g);

/* A forward attention node: its kernel is moek_attention_fwd or a twin. */
bool explain_is_attention(const ir_node *n)
{
    return !n->is_backward && n->def->fwd_symbol && strstr(n->def->fwd_symbol, "attention");
}

/* Integer value of argument a of n's forward template (a dim, an int
 * attribute or a literal), 0 if it is a tensor. */
static int64_t ex_arg(const ir_node *n, int a)
{
    const ir_ref *r = &n->def->fwd[a];
    bool in = r->index >= 0 && r->index < IR_MAX_SYMS;
    switch (r->kind) {
    case IR_REF_DIM: return in ? n->dims[r->index] : 0;
    case IR_REF_ATTR:
        if (!in)
            return 0;
        return n->def->attr_kinds[r->index] == PLAN_ARG_I64 ? n->attrs[r->index].i
                                                             : (int64_t)n->attrs[r->index].f;
    case IR_REF_INT: return r->i;
    default: return 0;
    }
}

/* C*T of one attention node.  For the ABI's moek_attention_fwd(q, k, v, o,
 * lse, B, T, H, Dh) read the sizes by position, whatever the declaration
 * calls them; for another attention kernel, C is q's last dim and T the dim
 * named T (else q's second-to-last dim). */
static uint64_t ex_attn_ct(const ir_graph *g, const ir_node *n)
{
    const ir_opdef *d = n->def;
    if ((strcmp(d->fwd_symbol, "moek_attention_fwd") == 0 ||
         strcmp(d->fwd_symbol, "moek_attention_fwd_bf16") == 0) && d->nfwd >= 9)
        return (uint64_t)(ex_arg(n, 6) * ex_arg(n, 7) * ex_arg(n, 8));
    if (n->inputs[0] < 0)
        return 0;
    const ir_value *q = &g->values[n->inputs[0]];
    int64_t c = q->ndim >= 1 ? q->shape[q->ndim - 1] : 0;
    int64_t t = q->ndim >= 3 ? q->shape[q->ndim - 2] : 0;
    for (int i = 0; i < d->ndims; i++)
        if (d->dim_names[i] && strcmp(d->dim_names[i], "T") == 0)
            t = n->dims[i];
    return (uint64_t)(c * t);
}

void explain_count(const ir_graph *g, explain_counts *c)
{
    memset(c, 0, sizeof *c);
    double active = 0;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        const ir_value *v = &g->values[pp->value];
        if (pp->tied_to >= 0 || v->storage != PLAN_ST_PARAM)
            continue;
        uint64_t n = (uint64_t)zero_param_numel(g, p);   /* whole model, any layout */
        c->params += n;
        if (pp->expert_axis >= 0)
            c->expert_params += n;
        /* 0 means the elaborator left it unset: a dense weight */
        double f = pp->active_fraction > 0 ? pp->active_fraction : 1.0;
        active += (double)n * f;
    }
    c->active_params = (uint64_t)(active + 0.5);
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        if (!explain_is_attention(n) || n->phase != PLAN_PHASE_FORWARD)
            continue;
        c->attn_layers++;
        c->attn_ct += ex_attn_ct(g, n);
    }
    c->flops_per_token = 6 * c->active_params + 6 * c->attn_ct;
}

/* a weight of a fused op: a parameter matrix, or its ZeRO-3 gathered copy */
static bool ex_is_weight(const ir_graph *g, int v)
{
    return v >= 0 && (g->values[v].storage == PLAN_ST_PARAM || zero3_is_gathered(g, v)) &&
           g->values[v].ndim >= 2;
}

uint64_t explain_workspace_bytes(const ir_graph *g)
{
    int64_t most = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(n, &count);
        int64_t elems = 0;
        /* a fused op over weight matrices needs scratch in fp32 too
         * (swiglu_proj's backward: dgate, dup, one projection's dx), never
         * more than its arguments; the other fused ops need none */
        bool fused = false;
        for (int i = 0; n->def && n->def->fuse && i < n->def->ninputs; i++)
            fused |= ex_is_weight(g, n->inputs[i]);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0 && v < g->nvalues && (g->values[v].dtype == PLAN_BF16 || g->values[v].dtype == PLAN_F16 ||
                                             (fused && g->values[v].dtype == PLAN_F32)))
                elems += ir_value_numel(&g->values[v]);
        }
        if (elems > 0 && MOEK_BF16_WORKSPACE_BYTES(elems) > most)
            most = MOEK_BF16_WORKSPACE_BYTES(elems);
    }
    return (uint64_t)most;
}

/* Attention's backward on the GPU keeps D_i = dO_i . O_i there, one float
 * per (batch, head, position): lse's size (moek.h, moek_attention_bwd). */
static int64_t ex_attention_bwd_scratch(const ir_graph *g, const ir_node *n)
{
    const char *sym = iop_symbol(n);   /* the node's kernel, its precision's variant */
    if (!n->is_backward || !sym || strncmp(sym, "moek_attention_bwd", 18) != 0)
        return 0;
    int count;
    const ir_ref *t = iop_template(n, &count);
    for (int a = 0; a < count; a++)
        if (t[a].kind == IR_REF_OUT && t[a].index == 1) {   /* (o, lse) */
            int v = iop_ref_value(n, &t[a]);
            return v >= 0 && v < g->nvalues ? ir_value_numel(&g->values[v]) * (int64_t)sizeof(float) + 256 : 0;
        }
    return 0;
}

uint64_t explain_gpu_workspace_bytes(const ir_graph *g)
{
    int64_t most = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        int64_t att = ex_attention_bwd_scratch(g, n);
        if (att > most)
            most = att;
        if (!n->def || !n->def->fuse || !n->is_backward)   /* forward ones keep no scratch */
            continue;
        int count;
        const ir_ref *t = iop_template(n, &count);
        int64_t bytes = (int64_t)3 * 256;   /* each scratch piece starts 256-aligned */
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0 && v < g->nvalues && !ex_is_weight(g, v))
                bytes += ir_value_numel(&g->values[v]) * (int64_t)plan_dtype_size(g->values[v].dtype);
        }
        if (bytes > most)
            most = bytes;
    }
    return (uint64_t)most;
}

/* Tokens of one micro-step: the size of the token-id input. */
static uint64_t ex_tokens(const ir_graph *g)
{
    for (int v = 0; v < g->nvalues; v++)
        if (g->values[v].role == PLAN_ROLE_TOKENS)
            return (uint64_t)ir_value_numel(&g->values[v]);
    int64_t t = g->train.batch * g->train.seq;
    return t > 0 ? (uint64_t)t : 1;
}

static bool ex_is_recompute(const ir_node *n)
{
    static const char tag[] = " (recompute)";
    size_t len = n->what ? strlen(n->what) : 0;
    return n->phase == PLAN_PHASE_BACKWARD && !n->is_backward && len >= sizeof tag - 1 &&
           strcmp(n->what + len - (sizeof tag - 1), tag) == 0;
}

/* Forward FLOPs per token of re-run ops.  Attention and ops with a weight
 * matrix count as in the forward third of 6N + 6LCT (2CT; 2 x weight size x
 * its active share); any other op one FLOP per output element. */
void explain_recompute_cost(const ir_graph *g, explain_recompute *r)
{
    memset(r, 0, sizeof *r);
    uint64_t tokens = ex_tokens(g);
    double dense = 0, elem = 0;
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        if (!ex_is_recompute(n))
            continue;
        r->ops++;
        if (explain_is_attention(n)) {
            dense += 2.0 * (double)ex_attn_ct(g, n);
            continue;
        }
        double w = 0;
        for (int k = 0; k < n->def->ninputs; k++) {
            int v = n->inputs[k];
            if (v < 0 || g->values[v].storage != PLAN_ST_PARAM || g->values[v].ndim < 2)
                continue;
            const ir_value *wv = &g->values[v];
            int p = wv->param;
            double f = p >= 0 && g->params[p].active_fraction > 0 ? g->params[p].active_fraction : 1.0;
            w += 2.0 * (double)ir_value_numel(wv) * f;
        }
        if (w > 0) {
            dense += w;
            continue;
        }
        for (int o = 0; o < n->def->noutputs; o++)
            if (n->outputs[o] >= 0)
                elem += (double)ir_value_numel(&g->values[n->outputs[o]]) / (double)tokens;
    }
    r->flops_dense = (uint64_t)(dense + 0.5);
    r->flops_elementwise = (uint64_t)(elem + 0.5);
}

static double ex_mib(double bytes)
{
    return bytes / (1024.0 * 1024.0);
}

void explain_print(const ir_graph *g, FILE *out)
{
    explain_print_layout(g, NULL, out);
}

void explain_print_layout(const ir_graph *g, const explain_layout *lay, FILE *out)
{
    explain_counts c;
    explain_count(g, &c);
    /* bf16 and fp16 alike: 2-byte storage, fp32 grads, masters and state */
    bool bf16 = g->train.precision == PLAN_BF16 || g->train.precision == PLAN_F16;
    const char *half = g->train.precision == PLAN_F16 ? "fp16" : "bf16";
    fprintf(out, "model %s\n\n", g->model_name);
    if (bf16)
        fprintf(out, "precision %s: params, activations and their gradients stored as %s "
                "(2 bytes);\n  fp32 accumulated grads, fp32 master weights and optimizer "
                "state\n\n", half, half);
    fprintf(out, "parameters\n");
    fprintf(out, "  total                %12" PRIu64 "\n", c.params);
    fprintf(out, "  of which experts     %12" PRIu64 "\n", c.expert_params);
    fprintf(out, "  active per token     %12" PRIu64 "  (each weight x the share of tokens "
            "that use it)\n\n", c.active_params);

    fprintf(out, "FLOPs per token, training (6N + 6LCT)\n");
    fprintf(out, "  6 x active params    %12" PRIu64 "\n", 6 * c.active_params);
    fprintf(out, "  attention 6 x sum(C*T) over %d layers %" PRIu64 "\n", c.attn_layers,
            6 * c.attn_ct);
    fprintf(out, "  total                %12" PRIu64 "  (forward %" PRIu64 ", backward %"
            PRIu64 ")\n\n", c.flops_per_token, c.flops_per_token / 3,
            c.flops_per_token - c.flops_per_token / 3);

    bool planned = false;
    int64_t total = 0;
    for (int s = 0; s < PLAN_ST_COUNT; s++) {
        planned |= g->pool_bytes[s] != 0;
        total += g->pool_bytes[s];
    }
    fprintf(out, "memory of this plan, one rank (bytes)\n");
    if (!planned) {
        fprintf(out, "  (not planned yet)\n\n");
    } else {
        for (int s = 0; s < PLAN_ST_COUNT; s++)
            fprintf(out, "  %-9s %14" PRId64 "  %10.2f MiB\n", ir_storage_name(s),
                    g->pool_bytes[s], ex_mib((double)g->pool_bytes[s]));
        fprintf(out, "  %-9s %14" PRId64 "  %10.2f MiB\n", "total", total, ex_mib((double)total));
        uint64_t ws = explain_workspace_bytes(g), gws = explain_gpu_workspace_bytes(g);
        if (ws > 0)
            fprintf(out, "  workspace %14" PRIu64 "  %10.2f MiB  on cpu (%s%sfused ops' scratch; not "
                    "in the total)\n", ws, ex_mib((double)ws), bf16 ? half : "",
                    bf16 ? " kernels widen into it, and " : "");
        if (gws > 0)
            fprintf(out, "  workspace %14" PRIu64 "  %10.2f MiB  on cuda (fused ops' and attention's scratch; "
                    "not in the total)\n", gws, ex_mib((double)gws));
        if (g->par_ranks > 1) {
            double cb = ex_comm_buffer_bytes(g);
            fprintf(out, "  comm      %14.0f  %10.2f MiB  (host buffers of the collectives: staging and "
                    "MPI's temporary; not in the total)\n", cb, ex_mib(cb));
        }
        uint64_t live = memplan_peak_live(g);
        fprintf(out, "  peak live activations %" PRIu64 " bytes (%.2f MiB); the act pool adds "
                "%" PRId64 " bytes of fragmentation\n\n", live, ex_mib((double)live),
                g->pool_bytes[PLAN_ST_ACT] - (int64_t)live);
        explain_recompute rc;
        explain_recompute_cost(g, &rc);
        fprintf(out, "activation recompute (train { recompute })\n");
        fprintf(out, "  policy               %12s\n", memplan_recompute_name(g->recompute));
        fprintf(out, "  peak activations     %12" PRIu64 "  bytes live at once (act pool %" PRId64
                ")\n", live, g->pool_bytes[PLAN_ST_ACT]);
        fprintf(out, "  re-run forward ops   %12d\n", rc.ops);
        fprintf(out, "  extra FLOPs/token    %12" PRIu64 "  matmul + attention (+%.1f%% of training"
                " FLOPs; not in the total above)\n", rc.flops_dense,
                c.flops_per_token ? 100.0 * (double)rc.flops_dense / (double)c.flops_per_token : 0.0);
        fprintf(out, "                       %12" PRIu64 "  elementwise and norms (1 per output "
                "element)\n\n", rc.flops_elementwise);
    }

    /* --layout replaces parallel { } here only: the plan keeps its own */
    int64_t ranks = lay ? lay->ranks : g->par_ranks > 0 ? g->par_ranks : 1;
    int64_t ep = lay ? lay->expert : g->par_expert > 0 ? g->par_expert : 1;
    int64_t zero = lay ? lay->zero : g->par_zero;
    const char *from = lay ? "--layout" : "parallel { }";
    if (ranks % ep)
        ep = 1;
    int64_t nd = ranks, ne = ranks / ep;
    bool sgd = g->train.optimizer == PLAN_OPT_SGD;
    double st = sgd ? 4.0 : 8.0;
    double dense = (double)(c.params - c.expert_params);
    double expert = (double)c.expert_params / (double)ep;
    fprintf(out, "parallel layout (%s): ranks=%" PRId64 " expert=%" PRId64 " zero=%" PRId64 "\n",
            from, ranks, ep, zero);
    fprintf(out, "  data-parallel size: dense params %" PRId64 ", expert params %" PRId64
            " (experts split %" PRId64 " ways first)\n", nd, ne, ep);
    /* bf16: a 2-byte working copy; the fp32 master is optimizer state (sharded
     * with it); grads stay fp32 (accumulated over micro-steps, as Megatron does),
     * so 4 bytes, not the 2 of the ZeRO paper's mixed-precision formula */
    double pbytes = bf16 ? 2.0 : 4.0;
    if (bf16) {
        st += 4.0;
        fprintf(out, "model-state bytes per rank, %s %s: 2 param + 4 grad (fp32) + 4 master + "
                "%d %s = %d bytes/param\n", half, sgd ? "SGD" : "AdamW", (int)st - 4,
                sgd ? "momentum" : "m,v", 6 + (int)st);
    } else {
        fprintf(out, "model-state bytes per rank, fp32 %s: 4 param + 4 grad + %d %s = %d bytes/param\n",
                sgd ? "SGD" : "AdamW", (int)st, sgd ? "momentum" : "m,v", 8 + (int)st);
    }
    fprintf(out, "  stage        params         grads      optstate         total\n");
    for (int s = 0; s <= 3; s++) {
        /* stage >= 1 shards optimizer state, >= 2 also grads, 3 also params */
        double dp = s >= 3 ? (double)nd : 1, dpe = s >= 3 ? (double)ne : 1;
        double dg = s >= 2 ? (double)nd : 1, dge = s >= 2 ? (double)ne : 1;
        double dsn = s >= 1 ? (double)nd : 1, dse = s >= 1 ? (double)ne : 1;
        double pb = pbytes * (dense / dp + expert / dpe);
        double gb = 4 * (dense / dg + expert / dge);
        double sb = st * (dense / dsn + expert / dse);
        fprintf(out, "  %d%s %14.0f %13.0f %13.0f %13.0f%s%s\n", s, s == zero ? " *" : "  ",
                pb, gb, sb, pb + gb + sb, s == zero ? "  <- zero in " : "", s == zero ? from : "");
    }
    if (g->par_ranks > 1) {
        parallel_explain(g, out);   /* process groups and the collectives the plan runs */
        fputc('\n', out);
        explain_overlap_print(g, out);
    }
}

/* ---- the per-pass table ------------------------------------------------ */

/* Elements the template writes (outputs, or gradients for a backward op). */
static double ex_written(const ir_graph *g, const ir_node *n)
{
    int count;
    const ir_ref *t = iop_template(n, &count);
    double e = 0;
    for (int a = 0; a < count; a++) {
        int v = iop_ref_value(n, &t[a]);
        if (v >= 0 && v < g->nvalues && pu_writes(n, &t[a]))
            e += (double)ir_value_numel(&g->values[v]);
    }
    return e;
}

double explain_node_flops(const ir_graph *g, const ir_node *n)
{
    const ir_opdef *d = n->def;
    double mul = n->is_backward ? 2.0 : 1.0;
    if (d->fwd_symbol && strstr(d->fwd_symbol, "attention") && n->inputs[0] >= 0) {
        /* 2 matmuls of B x T x T x C each way (QK^T, PV), 2 FLOPs per MAC */
        const ir_value *q = &g->values[n->inputs[0]];
        double ct = (double)ex_attn_ct(g, n);
        double tokens = q->ndim >= 1 && q->shape[q->ndim - 1] > 0
                            ? (double)ir_value_numel(q) / (double)q->shape[q->ndim - 1] : 0;
        return mul * 4.0 * ct * tokens;
    }
    int weight = 0;   /* weight matrices: a fused op (swiglu_proj) has one matmul per weight */
    for (int i = 0; i < d->ninputs; i++) {
        int v = n->inputs[i];
        weight += v >= 0 && (g->values[v].storage == PLAN_ST_PARAM || g->values[v].storage == PLAN_ST_BUFFER) &&
                  g->values[v].ndim >= 2 && g->values[v].dtype != PLAN_I32;
    }
    int x = d->ninputs > 0 ? n->inputs[0] : -1;
    int y = d->noutputs > 0 ? n->outputs[0] : -1;
    if (weight && x >= 0 && y >= 0 && g->values[x].dtype != PLAN_I32 && g->values[x].ndim >= 1 &&
        g->values[x].storage == PLAN_ST_ACT) {
        const ir_value *xv = &g->values[x];
        return mul * 2.0 * weight * (double)ir_value_numel(&g->values[y]) * (double)xv->shape[xv->ndim - 1];
    }
    return ex_written(g, n);
}

void explain_pass_fill(const ir_graph *g, const char *pass, explain_pass_row *r)
{
    memset(r, 0, sizeof *r);
    r->pass = pass;
    r->ops = g->nnodes;
    uint64_t accum = g->train.grad_accum > 0 ? (uint64_t)g->train.grad_accum : 1;
    for (int i = 0; i < g->nnodes; i++) {
        const ir_node *n = &g->nodes[i];
        uint64_t times = n->phase == PLAN_PHASE_OPTIMIZER ? 1 : accum;
        r->launches += times;
        r->flops += (double)times * explain_node_flops(g, n);
    }
    r->peak_act = pu_peak_bytes(g);
    bool planned = false;
    for (int s = 0; s < PLAN_ST_COUNT; s++)
        planned |= g->pool_bytes[s] != 0;
    r->act_pool = planned ? g->pool_bytes[PLAN_ST_ACT] : -1;
}

void explain_pass_table(const explain_pass_row *rows, int n, FILE *out)
{
    if (!rows || n <= 0)
        return;
    fprintf(out, "\npasses (in order; peak live = activation bytes live at once, act pool after memplan)\n");
    fprintf(out, "  %-12s %6s %10s %14s %14s %12s\n", "pass", "ops", "launches", "peak live",
            "act pool", "MFLOP/step");
    for (int i = 0; i < n; i++) {
        const explain_pass_row *r = &rows[i];
        char pool[32];
        if (r->act_pool < 0)
            snprintf(pool, sizeof pool, "-");
        else
            snprintf(pool, sizeof pool, "%" PRId64, r->act_pool);
        fprintf(out, "  %-12s %6d %10" PRIu64 " %14" PRIu64 " %14s %12.1f\n", r->pass, r->ops,
                r->launches, r->peak_act, pool, r->flops / 1e6);
    }
}

/* ---- --layout: explain another parallel layout ---------------------------- */

int explain_layout_parse(const char *spec, explain_layout *lay, char *err, size_t errlen)
{
    static const char *const keys[] = {"ranks", "expert", "zero"};
    lay->ranks = lay->expert = lay->zero = -1;
    const char *p = spec;
    if (!*p) {
        snprintf(err, errlen, "--layout needs ranks=R,expert=E,zero=Z (any of the three)");
        return -1;
    }
    while (*p) {
        const char *eq = strchr(p, '='), *end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        size_t klen = eq && eq < end ? (size_t)(eq - p) : (size_t)(end - p);
        int k = -1;
        for (int i = 0; i < 3; i++)
            if (strlen(keys[i]) == klen && strncmp(p, keys[i], klen) == 0)
                k = i;
        if (k < 0) {
            char key[64];
            snprintf(key, sizeof key, "%.*s", (int)(klen < 60 ? klen : 60), p);
            const char *near = diag_closest(key, keys, 3);
            snprintf(err, errlen, "--layout: unknown field `%s`%s%s%s; the fields are ranks, expert, zero",
                     key, near ? " (did you mean `" : "", near ? near : "", near ? "`?)" : "");
            return -1;
        }
        char *stop = NULL;
        long long v = eq && eq < end ? strtoll(eq + 1, &stop, 10) : 0;
        if (!eq || eq > end || stop == eq + 1 || stop != end || v < 0 || v > (1 << 20)) {
            snprintf(err, errlen, "--layout: `%s` needs a whole number, got `%.*s`", keys[k],
                     (int)(end - p), p);
            return -1;
        }
        if (k == 2 && v > 3) {
            snprintf(err, errlen, "--layout: `zero` must be a ZeRO stage 0-3, got %lld", v);
            return -1;
        }
        if (k < 2 && v < 1) {
            snprintf(err, errlen, "--layout: `%s` must be at least 1, got %lld", keys[k], v);
            return -1;
        }
        int64_t *slot = k == 0 ? &lay->ranks : k == 1 ? &lay->expert : &lay->zero;
        *slot = (int64_t)v;
        p = *end ? end + 1 : end;
    }
    return 0;
}

int explain_layout_resolve(const ir_graph *g, explain_layout *lay, char *err, size_t errlen)
{
    if (lay->ranks < 0)
        lay->ranks = g->par_ranks > 0 ? g->par_ranks : 1;
    if (lay->expert < 0)
        lay->expert = g->par_expert > 0 ? g->par_expert : 1;
    if (lay->zero < 0)
        lay->zero = g->par_zero;
    if (lay->ranks % lay->expert != 0) {
        snprintf(err, errlen, "--layout: impossible layout: `ranks` = %" PRId64 " is not divisible by "
                 "`expert` = %" PRId64 " (the expert-parallel size must divide the ranks)",
                 lay->ranks, lay->expert);
        return -1;
    }
    for (int i = 0; i < g->nparams; i++) {
        const ir_param *p = &g->params[i];
        const ir_value *v = &g->values[p->value];
        if (p->expert_axis >= 0 && p->expert_axis < v->ndim && v->shape[p->expert_axis] % lay->expert != 0) {
            snprintf(err, errlen, "--layout: impossible layout: %" PRId64 " experts of `%s` are not "
                     "divisible by `expert` = %" PRId64, v->shape[p->expert_axis], v->name, lay->expert);
            return -1;
        }
    }
    return 0;
}

/* ---- communication overlap (explain.h) ------------------------------------ */

static const char *const ex_ov_names[EXPLAIN_OV_KINDS] = {
    "gradient all-reduce", "reduce-scatter", "all-gather", "EP exchange", "other all-reduce"};

int explain_ov_kind_of(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    const char *s = n->is_backward ? n->def->bwd_symbol : n->def->fwd_symbol;
    if (!n->def->lib || strcmp(n->def->lib, COMM_LIB) != 0 || !s)
        return -1;   /* (an exchange's backward is the opposite exchange) */
    if (strcmp(s, "moec_comm_zero_slice") == 0)
        return -1;   /* a local copy of this rank's slice */
    if (strcmp(s, "moec_comm_allreduce_f32_multi") == 0)
        return n->def->nattrs > 1 && n->attrs[1].i >= 0 ? EXPLAIN_OV_GRAD_ALLREDUCE : EXPLAIN_OV_OTHER;
    if (strncmp(s, "moec_comm_zero_reduce_scatter", 29) == 0)   /* also _half */
        return EXPLAIN_OV_REDUCE_SCATTER;
    if (strcmp(s, "moec_comm_zero_allgather") == 0)
        return EXPLAIN_OV_ALLGATHER;
    if (strncmp(s, "moec_comm_ep_", 13) == 0)
        return EXPLAIN_OV_EP_EXCHANGE;
    return EXPLAIN_OV_OTHER;
}

/* Distinct tensors node ni touches. */
static int ex_values(const ir_graph *g, int ni, int *vs)
{
    int count, n = 0;
    const ir_ref *t = iop_template(&g->nodes[ni], &count);
    for (int a = 0; a < count; a++) {
        int v = iop_ref_value(&g->nodes[ni], &t[a]);
        bool dup = v < 0 || v >= g->nvalues;
        for (int k = 0; k < n && !dup; k++)
            dup = vs[k] == v;
        if (!dup)
            vs[n++] = v;
    }
    return n;
}

/* Tensor bytes a collective carries: the sum of a bucket's tensors, else its
 * largest tensor (the whole gradient a reduce-scatter reads, the whole
 * parameter a gather writes, an exchange's receive buffer, an upper bound). */
static double ex_ov_bytes(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    double b = 0;
    if (!n->is_backward && strcmp(n->def->fwd_symbol, "moec_comm_allreduce_f32_multi") == 0) {
        for (int i = 0; i < n->def->ninputs; i++)
            b += 4.0 * (double)n->dims[i];
        return b;
    }
    int vs[PLAN_MAX_KERNEL_ARGS], nv = ex_values(g, ni, vs);
    for (int k = 0; k < nv; k++)
        if ((double)ir_value_bytes(&g->values[vs[k]]) > b)
            b = (double)ir_value_bytes(&g->values[vs[k]]);
    return b;
}

/* Ranks in the group a collective runs over. */
static double ex_group_size(const ir_graph *g, int ni)
{
    const ir_node *n = &g->nodes[ni];
    int64_t ranks = g->par_ranks > 0 ? g->par_ranks : 1, ep = g->par_expert > 0 ? g->par_expert : 1;
    int group = COMM_GROUP_WORLD;
    for (int a = 0; a < n->def->nattrs; a++)
        if (n->def->attr_names[a] && strcmp(n->def->attr_names[a], "group") == 0)
            group = (int)n->attrs[a].i;
    comm_group grp;
    return comm_group_of(0, ranks, ep, group, &grp) == 0 ? (double)grp.size : (double)ranks;
}

/* The host memory a rank holds for collectives beyond the plan's pools
 * (CPU ranks, MPI backend), each buffer at its largest op:
 *   - comm.c's ZeRO staging, kept: a gather's N x S elements, a
 *     reduce-scatter's padded fp32 vector plus two slices;
 *   - the backend's reduce-scatter receive buffer, kept: N x S floats (it
 *     is an all-to-all and a local sum, so MPI itself adds nothing);
 *   - Open MPI's temporary inside a non-blocking all-reduce: one message
 *     (gradient runs are reduced in place, so at most a bucket);
 *   - comm.c's expert-parallel send and receive staging, kept. */
static double ex_comm_buffer_bytes(const ir_graph *g)
{
    double zstage = 0, rsrecv = 0, allreduce = 0, ep = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        int k = explain_ov_kind_of(g, ni);
        if (k < 0)
            continue;
        double b = ex_ov_bytes(g, ni), p = ex_group_size(g, ni);
        double z = 0, r = 0, a = 0, e = 0;
        if (k == EXPLAIN_OV_REDUCE_SCATTER) {
            double f32 = b * (g->values[g->nodes[ni].inputs[0]].dtype == PLAN_F32 ? 1 : 2);
            z = f32 + 2 * f32 / p;
            r = f32;
        } else if (k == EXPLAIN_OV_ALLGATHER) {
            z = b;
        } else if (k == EXPLAIN_OV_EP_EXCHANGE) {
            e = 2 * b;
        } else {
            a = b;
        }
        zstage = z > zstage ? z : zstage;
        rsrecv = r > rsrecv ? r : rsrecv;
        allreduce = a > allreduce ? a : allreduce;
        ep = e > ep ? e : ep;
    }
    return zstage + rsrecv + allreduce + ep;
}

/* Bytes each rank sends for it: ring all-reduce 2(p-1)/p of the tensor,
 * reduce-scatter, all-gather and exchange (p-1)/p, p its group's size. */
static double ex_ov_wire(const ir_graph *g, int ni, int kind)
{
    double p = ex_group_size(g, ni);
    double f = p > 1 ? (p - 1) / p : 0;
    return ex_ov_bytes(g, ni) * f * (kind == EXPLAIN_OV_GRAD_ALLREDUCE || kind == EXPLAIN_OV_OTHER ? 2 : 1);
}

typedef struct ex_ov_pend {
    int kind, nv;
    int vs[PLAN_MAX_KERNEL_ARGS];
    double start, end, comm, exposed;
    double scale;              /* per-step weight when counted, 0 when not */
    bool open;
} ex_ov_pend;

/* Compute waits from t to e: the collectives on the link meanwhile are
 * exposed for the part of their link time inside [t, e]. */
static void ex_ov_wait(ex_ov_pend *pend, int np, double t, double e)
{
    for (int q = 0; q < np; q++) {
        double lo = pend[q].start > t ? pend[q].start : t, hi = pend[q].end < e ? pend[q].end : e;
        if (hi > lo)
            pend[q].exposed += hi - lo;
    }
}

void explain_overlap(const ir_graph *g, explain_ov_row *rows)
{
    memset(rows, 0, sizeof *rows * EXPLAIN_OV_KINDS);
    int64_t accum = g->train.grad_accum > 0 ? g->train.grad_accum : 1;
    int sim = accum < 4 ? (int)accum : 4, ncomm = 0;
    for (int ni = 0; ni < g->nnodes; ni++) {
        int k = explain_ov_kind_of(g, ni);
        if (k < 0)
            continue;
        ncomm++;
        bool opt = g->nodes[ni].phase == PLAN_PHASE_OPTIMIZER;
        rows[k].count += opt ? 1 : (int)accum;
        rows[k].bytes += (opt ? 1.0 : (double)accum) * ex_ov_bytes(g, ni);
    }
    if (!ncomm)
        return;
    ex_ov_pend *pend = calloc((size_t)ncomm * (size_t)(3 * sim + 3), sizeof *pend);
    if (!pend)
        abort();   /* out of memory, as ir_alloc */
    int np = 0;
    double t = 0, link = 0;
    /* three steps; each: the forward and backward ops per micro-step, then the optimizer's */
    for (int copy = 0; copy < 3; copy++)
        for (int m = 0; m <= sim; m++)
            for (int ni = 0; ni < g->nnodes; ni++) {
                const ir_node *n = &g->nodes[ni];
                if ((m < sim) == (n->phase == PLAN_PHASE_OPTIMIZER))
                    continue;
                double scale = copy != 1 ? 0 : m < sim ? (double)accum / sim : 1.0;
                int vs[PLAN_MAX_KERNEL_ARGS], nv = ex_values(g, ni, vs), kind = explain_ov_kind_of(g, ni);
                /* the first op to touch a pending collective's tensors waits for it
                 * (a collective behind it on the link needs no wait: the link orders them) */
                for (;;) {
                    int first = -1;
                    for (int q = 0; q < np; q++) {
                        bool hit = false;
                        for (int a = 0; a < pend[q].nv && !hit && pend[q].open; a++)
                            for (int b = 0; b < nv && !hit; b++)
                                hit = pend[q].vs[a] == vs[b];
                        if (hit && (first < 0 || pend[q].end < pend[first].end))
                            first = q;
                    }
                    if (first < 0)
                        break;
                    ex_ov_pend *p = &pend[first];
                    if (kind < 0 && p->end > t) {
                        ex_ov_wait(pend, np, t, p->end);
                        t = p->end;
                    }
                    p->open = false;
                }
                if (kind < 0) {
                    double f = explain_node_flops(g, n);
                    for (int q = 0; q < np; q++)
                        if (pend[q].open)
                            rows[pend[q].kind].window_flops += pend[q].scale * f;
                    t += f / EXPLAIN_OV_FLOPS;
                    continue;
                }
                ex_ov_pend *p = &pend[np++];
                p->kind = kind;
                p->nv = nv;
                memcpy(p->vs, vs, sizeof(int) * (size_t)nv);
                p->comm = ex_ov_wire(g, ni, kind) / EXPLAIN_OV_LINK;
                p->start = t > link ? t : link;
                p->end = p->start + p->comm;
                p->scale = scale;
                p->open = true;
                link = p->end;
                rows[kind].comm_s += scale * p->comm;
            }
    if (link > t)   /* the last collectives: the step ends when they do */
        ex_ov_wait(pend, np, t, link);
    for (int q = 0; q < np; q++)   /* exposed can pass comm by rounding only */
        if (pend[q].comm > pend[q].exposed)
            rows[pend[q].kind].hidden_s += pend[q].scale * (pend[q].comm - pend[q].exposed);
    free(pend);
}

void explain_overlap_print(const ir_graph *g, FILE *out)
{
    explain_ov_row rows[EXPLAIN_OV_KINDS], tot;
    explain_overlap(g, rows);
    memset(&tot, 0, sizeof tot);
    for (int k = 0; k < EXPLAIN_OV_KINDS; k++) {
        tot.count += rows[k].count;
        tot.bytes += rows[k].bytes;
        tot.window_flops += rows[k].window_flops;
        tot.comm_s += rows[k].comm_s;
        tot.hidden_s += rows[k].hidden_s;
    }
    if (!tot.count)
        return;
    fprintf(out, "communication overlap, predicted at the final schedule (per step, one rank)\n");
    fprintf(out, "  assumes compute at %.0f TFLOP/s (the MFLOP estimate below, op after op) and "
            "collectives on their own stream at %.0f GB/s,\n  ring bytes: all-reduce 2(p-1)/p of the "
            "tensors, reduce-scatter, all-gather and EP exchange (p-1)/p;\n  an op waits for a "
            "collective only when it touches its tensors\n", EXPLAIN_OV_FLOPS / 1e12,
            EXPLAIN_OV_LINK / 1e9);
    fprintf(out, "  %-20s %5s %12s %13s %10s %10s %7s\n", "kind", "ops", "bytes", "window MFLOP",
            "comm us", "hidden us", "hidden");
    for (int k = 0; k <= EXPLAIN_OV_KINDS; k++) {
        const explain_ov_row *r = k < EXPLAIN_OV_KINDS ? &rows[k] : &tot;
        if (!r->count)
            continue;
        fprintf(out, "  %-20s %5d %12.0f %13.2f %10.2f %10.2f %6.1f%%\n",
                k < EXPLAIN_OV_KINDS ? ex_ov_names[k] : "total", r->count, r->bytes,
                r->window_flops / 1e6, r->comm_s * 1e6, r->hidden_s * 1e6,
                r->comm_s > 0 ? 100.0 * r->hidden_s / r->comm_s : 0.0);
    }
    if (rows[EXPLAIN_OV_GRAD_ALLREDUCE].count) {
        bool bwd = false;
        for (int ni = 0; ni < g->nnodes && !bwd; ni++)
            bwd = explain_ov_kind_of(g, ni) == EXPLAIN_OV_GRAD_ALLREDUCE &&
                  g->nodes[ni].phase == PLAN_PHASE_BACKWARD;
        if (bwd)
            fprintf(out, "  gradient all-reduces run in backward, each bucket after its last "
                    "gradient is final (grad_accum = 1)\n");
        else
            fprintf(out, "  gradient all-reduces run at the start of the optimizer phase: with "
                    "grad_accum = %" PRId64 " the micro-steps' sum comes first\n", g->train.grad_accum);
    }
    fprintf(out, "  (the CPU MPI backend runs each collective to completion where it is issued; "
            "this is what a\n  backend with a communication stream can hide)\n");
}
