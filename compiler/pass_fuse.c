/* pass_fuse.c - fusion: forward patterns -> the fused ops that declare them.
 *
 * The rules live in the stdlib, each in its fused op's `fuses { }` body
 * (compiler/fuse.h); this file knows no op by name.  fuse_rule_lower checks
 * a rule once, at elaboration; pass_fuse matches every rule against the
 * forward graph and rewrites each match into one node.
 *
 * A match of rule R at root node r (a node of R's last op):
 *  - walking R's ops from the last to the first, each op's node is the
 *    producer of a value already bound to one of its outputs (so the
 *    pattern is connected; fuse_rule_lower checks that it is);
 *  - every node is a forward node of the op's instance for the fused op's
 *    dtype (`rms_norm<bf16>` goes with `add_rms_norm<bf16>`), used by one
 *    match only;
 *  - a slot bound twice is bound to the same value, an attribute the rule
 *    ties to a fused attribute agrees wherever it appears (bit for bit),
 *    and a literal attribute equals its literal;
 *  - an intermediate (a slot that is not a fused output) is a plain
 *    activation with no role, read exactly once in the whole graph;
 *  - an output the rule leaves unnamed is a plain activation nobody reads;
 *  - a fused output that other nodes read (the residual sum of add +
 *    RMSNorm) is read only after the root, where the fused node will sit.
 * The fused node takes the root's place; the other nodes of the match go,
 * and their values are no longer produced by anything.
 *
 * Runs before autodiff (-O2), so the backward of the fused op is its own
 * backward kernel: one launch instead of one per op.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuse.h"
#include "internal_ops.h"
#include "pass_util.h"

/* ------------------------------------------------------------ the rules */

static int fr_slot(const ir_fuse *r, const char *name)
{
    for (int s = 0; s < r->nslots; s++)
        if (strcmp(r->slot_name[s], name) == 0)
            return s;
    return -1;
}

static int fr_index(const char *const *names, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (names[i] && strcmp(names[i], name) == 0)
            return i;
    return -1;
}

/* Binds argument `arg` (positional #pos, or by name) of pattern op k. */
static int fr_arg(ir_fuse *r, diag_ctx *d, const ir_opdef *fused, const ir_opdef *pd, ir_fuse_op *po,
                  const ast_node *arg, int pos, bool *in_set, bool *attr_set)
{
    const ast_node *x = arg->a;
    int in = -1, at = -1;
    if (arg->name) {
        in = fr_index(pd->input_names, pd->ninputs, arg->name);
        at = in < 0 ? fr_index(pd->attr_names, pd->nattrs, arg->name) : -1;
        if (in < 0 && at < 0) {
            diag_error(d, arg->span, NULL, "`%s` has no argument `%s`", pd->name, arg->name);
            return -1;
        }
    } else if (pos < pd->ninputs) {
        in = pos;
    } else if (pos - pd->ninputs < pd->nattrs) {
        at = pos - pd->ninputs;
    } else {
        diag_error(d, arg->span, NULL, "too many arguments to `%s` in a fusion pattern", pd->name);
        return -1;
    }
    if (in >= 0) {
        int s = x->kind == AST_NAME ? fr_slot(r, x->name) : -1;
        if (s < 0 || r->slot_out[s] == -2) {
            diag_error(d, x->span, "a tensor argument names a fused input or an earlier result",
                       "`%s` is not a value of the pattern", x->kind == AST_NAME ? x->name : "this");
            return -1;
        }
        if (in_set[in]) {
            diag_error(d, arg->span, NULL, "input `%s` of `%s` is given twice", pd->input_names[in], pd->name);
            return -1;
        }
        po->in[in] = s;
        in_set[in] = true;
        return 0;
    }
    if (attr_set[at]) {
        diag_error(d, arg->span, NULL, "attribute `%s` of `%s` is given twice", pd->attr_names[at], pd->name);
        return -1;
    }
    attr_set[at] = true;
    if (x->kind == AST_NAME) {
        int fa = fr_index(fused->attr_names, fused->nattrs, x->name);
        if (fa < 0 || fused->attr_kinds[fa] != pd->attr_kinds[at]) {
            diag_error(d, x->span, "an attribute is a number or an attribute of the fused op of the same kind",
                       "`%s` is not a%s attribute of `%s`", x->name,
                       pd->attr_kinds[at] == PLAN_ARG_F32 ? " float" : "n int", fused->name);
            return -1;
        }
        po->attr_src[at] = fa;
        return 0;
    }
    bool neg = x->kind == AST_UNOP && x->op == AST_OP_NEG;
    const ast_node *lit = neg ? x->a : x;
    if (lit->kind != AST_INT && lit->kind != AST_FLOAT) {
        diag_error(d, x->span, "write a number or a name", "attribute `%s` of `%s` must be a literal or an "
                   "attribute of `%s`", pd->attr_names[at], pd->name, fused->name);
        return -1;
    }
    double v = lit->kind == AST_INT ? (double)lit->i : lit->f;
    po->attr_src[at] = -1;
    if (pd->attr_kinds[at] == PLAN_ARG_F32)
        po->attr_lit[at].f = (double)(float)(neg ? -v : v);   /* attributes are stored as float */
    else
        po->attr_lit[at].i = (int64_t)(neg ? -v : v);
    return 0;
}

static int fr_stmt(ir_graph *g, diag_ctx *d, const ir_opdef *fused, ir_fuse *r, const ast_node *st)
{
    if (!st)
        return -1;   /* a syntax error, already reported */
    if (st->kind != AST_ASSIGN || !st->a || st->a->kind != AST_CALL) {
        diag_error(d, st->span, "each line is `out, ... = op(args)`", "a fusion pattern holds only op calls");
        return -1;
    }
    const ast_node *call = st->a;
    const ir_opdef *pd = ir_def_find(g, call->name);
    if (!pd || pd->fuse || pd == fused || pd->lib) {
        diag_error(d, call->span, "a pattern calls extern ops of the kernel library",
                   "`%s` in the pattern of `%s` is not an op that can be fused", call->name, fused->name);
        return -1;
    }
    if (r->nops >= IR_FUSE_MAX_OPS) {
        diag_error(d, st->span, NULL, "a fusion pattern has at most %d ops", IR_FUSE_MAX_OPS);
        return -1;
    }
    ir_fuse_op *po = &r->ops[r->nops];
    po->op = pd->name;
    po->nin = pd->ninputs;
    po->nout = pd->noutputs;
    po->nattr = pd->nattrs;
    bool in_set[IR_MAX_PORTS] = {0}, attr_set[IR_MAX_SYMS] = {0};
    int pos = 0;
    for (int i = 0; i < call->list.n; i++) {
        const ast_node *arg = call->list.items[i];
        if (fr_arg(r, d, fused, pd, po, arg, arg->name ? -1 : pos, in_set, attr_set))
            return -1;
        pos += arg->name == NULL;
    }
    for (int i = 0; i < pd->ninputs; i++)
        if (!in_set[i]) {
            diag_error(d, call->span, NULL, "the pattern does not give input `%s` of `%s`", pd->input_names[i],
                       pd->name);
            return -1;
        }
    for (int i = 0; i < pd->nattrs; i++)
        if (!attr_set[i]) {
            diag_error(d, call->span, "a pattern ties every attribute, so a match computes the same thing",
                       "the pattern does not give attribute `%s` of `%s`", pd->attr_names[i], pd->name);
            return -1;
        }
    if (st->list.n > pd->noutputs) {
        diag_error(d, st->span, NULL, "`%s` has %d output%s, the pattern names %d", pd->name, pd->noutputs,
                   pd->noutputs == 1 ? "" : "s", st->list.n);
        return -1;
    }
    for (int o = 0; o < pd->noutputs; o++)
        po->out[o] = -1;
    for (int o = 0; o < st->list.n; o++) {
        const ast_node *t = st->list.items[o];
        if (fr_slot(r, t->name) >= 0 || r->nslots >= IR_FUSE_MAX_SLOTS) {
            diag_error(d, t->span, "each value of a pattern is named once", "`%s` is already a value of the "
                       "pattern", t->name);
            return -1;
        }
        int s = r->nslots++;
        r->slot_name[s] = t->name;
        r->slot_in[s] = -1;
        r->slot_out[s] = fr_index(fused->output_names, fused->noutputs, t->name);
        po->out[o] = s;
    }
    r->nops++;
    return 0;
}

/* The fused dim symbols, read off the fused inputs' declared shapes. */
static int fr_dims(diag_ctx *d, const ast_node *op_ast, const ir_opdef *fused, ir_fuse *r)
{
    for (int k = 0; k < fused->ndims; k++) {
        r->dim_in[k] = -1;
        int in = 0;
        for (int i = 0; i < op_ast->list.n && r->dim_in[k] < 0; i++) {
            const ast_node *sp = op_ast->list.items[i];
            if (!sp->a || !(sp->a->flags & AST_F_HAS_TYPE))
                continue;   /* an attribute */
            const ast_list *dims = &sp->a->list;
            for (int j = 0; j < dims->n && r->dim_in[k] < 0; j++) {
                const ast_node *dn = dims->items[j];
                const char *nm = dn->flags & AST_F_STAR ? dn->name
                               : dn->a && dn->a->kind == AST_NAME ? dn->a->name : NULL;
                if (nm && strcmp(nm, fused->dim_names[k]) == 0) {
                    r->dim_in[k] = in;
                    r->dim_star[k] = dn->flags & AST_F_STAR;
                    r->dim_back[k] = dims->n - j;
                }
            }
            in++;
        }
        if (r->dim_in[k] < 0) {
            diag_error(d, op_ast->span, "give a fused op's inputs plain dims (`*N`, `D`)",
                       "dim `%s` of fused op `%s` is not a plain dim of one of its inputs", fused->dim_names[k],
                       fused->name);
            return -1;
        }
    }
    return 0;
}

int fuse_rule_lower(ir_graph *g, diag_ctx *d, const ast_node *op_ast, const ast_node *entry,
                    const ir_opdef *fused, ir_fuse *r)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < fused->ninputs; i++) {
        r->slot_name[r->nslots] = fused->input_names[i];
        r->slot_in[r->nslots] = i;
        r->slot_out[r->nslots++] = -1;
    }
    if (entry->list.n == 0) {
        diag_error(d, entry->span, "write `fuses { out = op(args) ... }`", "empty fusion pattern in `%s`",
                   fused->name);
        return -1;
    }
    for (int i = 0; i < entry->list.n; i++)
        if (fr_stmt(g, d, fused, r, entry->list.items[i]))
            return -1;
    /* every fused input read, every fused output named, every attribute tied */
    for (int s = 0; s < fused->ninputs; s++) {
        bool used = false;
        for (int k = 0; k < r->nops; k++)
            for (int i = 0; i < r->ops[k].nin; i++)
                used |= r->ops[k].in[i] == s;
        if (!used) {
            diag_error(d, entry->span, NULL, "the pattern of `%s` does not use its input `%s`", fused->name,
                       fused->input_names[s]);
            return -1;
        }
    }
    for (int o = 0; o < fused->noutputs; o++)
        if (fr_slot(r, fused->output_names[o]) < 0) {
            diag_error(d, entry->span, "name each output of the fused op in the pattern",
                       "the pattern of `%s` does not compute its output `%s`", fused->name,
                       fused->output_names[o]);
            return -1;
        }
    for (int a = 0; a < fused->nattrs; a++) {
        bool used = false;
        for (int k = 0; k < r->nops; k++)
            for (int i = 0; i < r->ops[k].nattr; i++)
                used |= r->ops[k].attr_src[i] == a;
        if (!used) {
            diag_error(d, entry->span, NULL, "the pattern of `%s` does not use its attribute `%s`", fused->name,
                       fused->attr_names[a]);
            return -1;
        }
    }
    /* an intermediate is read in the pattern, or its value would be lost */
    for (int s = fused->ninputs; s < r->nslots; s++) {
        bool read = r->slot_out[s] >= 0;
        for (int k = 0; k < r->nops; k++)
            for (int i = 0; i < r->ops[k].nin; i++)
                read |= r->ops[k].in[i] == s;
        if (!read) {
            diag_error(d, entry->span, "name it as an output of the fused op, or leave it out",
                       "`%s` in the pattern of `%s` is neither read nor an output", r->slot_name[s], fused->name);
            return -1;
        }
    }
    /* connected: every op but the last feeds a later one */
    for (int k = 0; k + 1 < r->nops; k++) {
        bool feeds = false;
        for (int o = 0; o < r->ops[k].nout; o++)
            for (int l = k + 1; l < r->nops; l++)
                for (int i = 0; i < r->ops[l].nin; i++)
                    feeds |= r->ops[k].out[o] >= 0 && r->ops[l].in[i] == r->ops[k].out[o];
        if (!feeds) {
            diag_error(d, entry->list.items[k]->span, "the last call is the root; every other one feeds a later one",
                       "`%s` in the pattern of `%s` feeds no later op", r->ops[k].op, fused->name);
            return -1;
        }
    }
    return fr_dims(d, op_ast, fused, r);
}

/* ------------------------------------------------------------ the pass */

typedef struct fu_state {
    ir_graph *g;
    int *reads;        /* per value: read arguments over all nodes */
    int *last_read;    /* per value: the last node that reads it */
    bool *taken;       /* per node: part of a match already */
} fu_state;

/* "rms_norm<bf16>" is rms_norm's instance for the suffix "<bf16>".  An op
 * whose ports are all fixed-type (topk: f32 and i32) has no instances, so
 * its one def goes with every instance of the fused op, provided none of
 * the node's values is half. */
static bool fu_is(const ir_graph *g, const ir_node *n, const char *base, const char *suffix)
{
    size_t len = strlen(base);
    const ir_opdef *def = n->def;
    if (strncmp(def->name, base, len) != 0)
        return false;
    if (strcmp(def->name + len, suffix) == 0)
        return true;
    if (def->name[len] != '\0' || !*suffix)
        return false;
    char inst[160];
    snprintf(inst, sizeof inst, "%s%s", base, suffix);
    if (ir_def_find(g, inst))
        return false;
    for (int i = 0; i < IR_MAX_PORTS; i++) {
        int vs[2] = {i < def->ninputs ? n->inputs[i] : -1, i < def->noutputs ? n->outputs[i] : -1};
        for (int j = 0; j < 2; j++)
            if (vs[j] >= 0 && (g->values[vs[j]].dtype == PLAN_BF16 || g->values[vs[j]].dtype == PLAN_F16))
                return false;
    }
    return true;
}

static bool fu_bind(int *slot_val, int s, int v)
{
    if (s < 0)
        return true;
    if (slot_val[s] >= 0 && slot_val[s] != v)
        return false;
    slot_val[s] = v;
    return true;
}

static bool fu_plain(const ir_graph *g, int v)
{
    const ir_value *x = &g->values[v];
    return x->storage == PLAN_ST_ACT && x->role == PLAN_ROLE_NONE && v != g->loss && v != g->logits;
}

/* Tries rule r of fused def at root node `root`; fills nodes[] (per op)
 * and the fused node on success. */
static bool fu_match(fu_state *st, const ir_opdef *fused, const char *suffix, int root, int *nodes, ir_node *out)
{
    ir_graph *g = st->g;
    const ir_fuse *r = fused->fuse;
    int slot_val[IR_FUSE_MAX_SLOTS];
    bool attr_set[IR_MAX_SYMS] = {0};
    ir_scalar attrs[IR_MAX_SYMS];
    memset(attrs, 0, sizeof attrs);
    for (int s = 0; s < r->nslots; s++)
        slot_val[s] = -1;
    for (int k = r->nops - 1; k >= 0; k--) {
        const ir_fuse_op *po = &r->ops[k];
        int ni = -1;
        if (k == r->nops - 1) {
            ni = root;
        } else {
            for (int o = 0; o < po->nout && ni < 0; o++)
                if (po->out[o] >= 0 && slot_val[po->out[o]] >= 0)
                    ni = g->values[slot_val[po->out[o]]].producer;
        }
        if (ni < 0 || st->taken[ni])
            return false;
        for (int j = k + 1; j < r->nops; j++)
            if (nodes[j] == ni)
                return false;
        const ir_node *n = &g->nodes[ni];
        if (n->is_backward || n->phase != PLAN_PHASE_FORWARD || !fu_is(g, n, po->op, suffix) ||
            n->def->ninputs != po->nin || n->def->noutputs != po->nout || n->def->nattrs != po->nattr)
            return false;
        nodes[k] = ni;
        for (int o = 0; o < po->nout; o++)
            if (!fu_bind(slot_val, po->out[o], n->outputs[o]))
                return false;
        for (int i = 0; i < po->nin; i++)
            if (n->inputs[i] < 0 || !fu_bind(slot_val, po->in[i], n->inputs[i]))
                return false;
        for (int a = 0; a < po->nattr; a++) {
            int fa = po->attr_src[a];
            if (fa < 0) {
                if (!ir_scalar_same(n->attrs[a], po->attr_lit[a]))
                    return false;
            } else if (attr_set[fa]) {
                if (!ir_scalar_same(n->attrs[a], attrs[fa]))
                    return false;
            } else {
                attrs[fa] = n->attrs[a];
                attr_set[fa] = true;
            }
        }
    }
    /* values: intermediates read once, unnamed outputs unread, exposed
     * outputs read only after the root */
    for (int s = 0; s < r->nslots; s++) {
        int v = slot_val[s];
        if (v < 0 || r->slot_in[s] >= 0)
            continue;
        if (r->slot_out[s] < 0 && (!fu_plain(g, v) || st->reads[v] != 1))
            return false;
    }
    /* a fused output the pattern reads itself (the residual sum) must have
     * a reader outside: otherwise its gradient would be a zero-filled
     * tensor, one launch and one tensor more than the unfused ops */
    for (int s = 0; s < r->nslots; s++) {
        int inner = 0;
        for (int k = 0; k < r->nops; k++)
            for (int i = 0; i < r->ops[k].nin; i++)
                inner += r->ops[k].in[i] == s;
        if (r->slot_out[s] >= 0 && fused->output_diff[r->slot_out[s]] && inner > 0 && slot_val[s] >= 0 &&
            st->reads[slot_val[s]] <= inner)
            return false;   /* (a saved output, e.g. SwiGLU's gate, has no gradient: no such cost) */
    }
    for (int s = 0; s < r->nslots; s++)
        if (r->slot_out[s] >= 0 && slot_val[s] >= 0 && st->last_read[slot_val[s]] >= 0) {
            int v = slot_val[s];
            for (int ni = 0; ni < root; ni++) {
                bool inside = false;
                for (int k = 0; k < r->nops; k++)
                    inside |= nodes[k] == ni;
                if (inside)
                    continue;
                for (int i = 0; i < g->nodes[ni].def->ninputs; i++)
                    if (g->nodes[ni].inputs[i] == v)
                        return false;
            }
        }
    for (int k = 0; k < r->nops; k++) {
        const ir_node *n = &g->nodes[nodes[k]];
        for (int o = 0; o < r->ops[k].nout; o++)
            if (r->ops[k].out[o] < 0 && n->outputs[o] >= 0 &&
                (!fu_plain(g, n->outputs[o]) || st->reads[n->outputs[o]] != 0))
                return false;
    }
    /* the fused node */
    const ir_node *rn = &g->nodes[root];
    memset(out, 0, sizeof *out);
    out->def = fused;
    out->phase = PLAN_PHASE_FORWARD;
    out->grad_of = -1;
    for (int i = 0; i < IR_MAX_PORTS; i++)
        out->inputs[i] = out->outputs[i] = out->grads_in[i] = out->grads_out[i] = -1;
    for (int s = 0; s < r->nslots; s++) {
        if (r->slot_in[s] >= 0)
            out->inputs[r->slot_in[s]] = slot_val[s];
        if (r->slot_out[s] >= 0)
            out->outputs[r->slot_out[s]] = slot_val[s];
    }
    for (int k = 0; k < fused->ndims; k++) {
        const ir_value *x = &g->values[out->inputs[r->dim_in[k]]];
        int back = r->dim_back[k];
        if (back > x->ndim)
            return false;
        int64_t v = 1;
        if (r->dim_star[k])
            for (int j = 0; j <= x->ndim - back; j++)
                v *= x->shape[j];
        else
            v = x->shape[x->ndim - back];
        out->dims[k] = v;
    }
    memcpy(out->attrs, attrs, sizeof out->attrs);
    out->loc = rn->loc;
    out->what = ir_strfmt(g, "%s (fused %s)", rn->what ? rn->what : rn->def->name, fused->name);
    return true;
}

int pass_fuse(ir_graph *g, moec_error *err)
{
    (void)err;
    fu_state st = {g, NULL, NULL, NULL};
    int nv = g->nvalues + 1, nn = g->nnodes + 1;
    st.reads = calloc((size_t)nv, sizeof *st.reads);
    st.last_read = malloc(sizeof(int) * (size_t)nv);
    st.taken = calloc((size_t)nn, sizeof *st.taken);
    int *order = malloc(sizeof(int) * (size_t)nn);
    bool *drop = calloc((size_t)nn, sizeof *drop);
    if (!st.reads || !st.last_read || !st.taken || !order || !drop)
        abort();   /* out of memory, as ir_alloc */
    for (int v = 0; v < nv; v++)
        st.last_read[v] = -1;
    for (int ni = 0; ni < g->nnodes; ni++) {
        const ir_node *n = &g->nodes[ni];
        int count;
        const ir_ref *t = iop_template(n, &count);
        for (int a = 0; a < count; a++) {
            int v = iop_ref_value(n, &t[a]);
            if (v >= 0 && v < g->nvalues && pu_reads(n, &t[a])) {
                st.reads[v]++;
                st.last_read[v] = ni;
            }
        }
    }
    int changed = 0;
    /* longer rules first: matmul + bias + GELU takes its nodes before
     * matmul + bias could take the first two, whatever the stdlib order */
    for (int len = IR_FUSE_MAX_OPS; len > 0; len--) {
        for (int di = 0; di < g->ndefs; di++) {
            const ir_opdef *fd = g->defs[di];
            if (!fd->fuse || fd->fuse->nops != len)
                continue;
            const char *suffix = strchr(fd->name, '<');
            suffix = suffix ? suffix : "";
            for (int ni = 0; ni < g->nnodes; ni++) {
                int nodes[IR_FUSE_MAX_OPS];
                ir_node fusednode;
                if (st.taken[ni] || !fu_match(&st, fd, suffix, ni, nodes, &fusednode))
                    continue;
                for (int k = 0; k < fd->fuse->nops; k++) {
                    st.taken[nodes[k]] = true;
                    drop[nodes[k]] = nodes[k] != ni;
                }
                g->nodes[ni] = fusednode;
                changed++;
            }
        }
    }
    if (changed) {
        int n = 0;
        for (int ni = 0; ni < g->nnodes; ni++)
            if (!drop[ni])
                order[n++] = ni;
        pu_reorder(g, order, n);
    }
    free(st.reads), free(st.last_read), free(st.taken), free(order), free(drop);
    return 0;
}
