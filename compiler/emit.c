/* emit.c - writes the planned graph as plan.bin (runtime/plan.h,
 * docs/plan-format.md).
 *
 * The whole file is assembled in memory (plans are small: records, never
 * weights), checksummed, then written to a temporary file in the target's
 * folder and renamed over the target, so a reader never sees half a plan.
 * Every record is memset before it is filled so padding bytes, and hence
 * the checksum, are deterministic.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "explain.h"
#include "internal_ops.h"
#include "passes.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "plan.bin is little-endian; this writer stores structs as they are in memory");

#define EMIT_COMPILER_VERSION "moec 0.1.0"

typedef struct em_buf {
    unsigned char *p;
    size_t n, cap;
} em_buf;

typedef struct em_ctx {
    const ir_graph *g;
    em_buf strs;
    uint32_t *hash;          /* open addressing: string offsets, 0 = empty */
    size_t hcap, hcount;
    em_buf pools, tensors, libs, kernels, ops, args, params;
    int *tensor_of;          /* value -> tensor index, -1 when not emitted */
    moec_error *err;
} em_ctx;

static void em_put(em_buf *b, const void *data, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p)
            abort();   /* out of memory, as ir_alloc */
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static uint64_t em_strhash(const char *s)
{
    return plan_fnv1a(s, strlen(s), PLAN_FNV_OFFSET);
}

static void em_rehash(em_ctx *c)
{
    size_t ncap = c->hcap ? c->hcap * 2 : 1024;
    uint32_t *h = calloc(ncap, sizeof *h);
    if (!h)
        abort();
    for (size_t i = 0; i < c->hcap; i++) {
        if (!c->hash[i])
            continue;
        size_t j = em_strhash((const char *)c->strs.p + c->hash[i]) & (ncap - 1);
        while (h[j])
            j = (j + 1) & (ncap - 1);
        h[j] = c->hash[i];
    }
    free(c->hash);
    c->hash = h;
    c->hcap = ncap;
}

/* Offset of s in the string section, adding it once. */
static uint32_t em_str(em_ctx *c, const char *s)
{
    if (!s || !*s)
        return 0;
    if ((c->hcount + 1) * 2 > c->hcap)
        em_rehash(c);
    size_t j = em_strhash(s) & (c->hcap - 1);
    while (c->hash[j]) {
        if (strcmp((const char *)c->strs.p + c->hash[j], s) == 0)
            return c->hash[j];
        j = (j + 1) & (c->hcap - 1);
    }
    uint32_t off = (uint32_t)c->strs.n;
    em_put(&c->strs, s, strlen(s) + 1);
    c->hash[j] = off;
    c->hcount++;
    return off;
}

static int em_fail(em_ctx *c, ir_srcloc loc, const char *hint, const char *fmt, const char *a,
                   const char *b)
{
    memset(c->err, 0, sizeof *c->err);
    c->err->loc = loc;
    snprintf(c->err->msg, sizeof c->err->msg, fmt, a, b);
    snprintf(c->err->hint, sizeof c->err->hint, "%s", hint ? hint : "");
    return -1;
}

static uint8_t em_arg_kind(const ir_opdef *d, const ir_ref *r)
{
    switch (r->kind) {
    case IR_REF_IN: case IR_REF_OUT: case IR_REF_DIN: case IR_REF_DOUT: return PLAN_ARG_TENSOR;
    case IR_REF_DIM: case IR_REF_INT: return PLAN_ARG_I64;
    case IR_REF_ATTR: return d->attr_kinds[r->index];
    case IR_REF_FLOAT: return PLAN_ARG_F32;
    }
    return PLAN_ARG_I64;
}

/* Index of the kernel (symbol, lib) with these argument kinds, added once. */
static int em_kernel(em_ctx *c, const ir_node *n, uint32_t *out)
{
    const ir_opdef *d = n->def;
    int count;
    const ir_ref *t = iop_template(n, &count);
    const char *sym = iop_symbol(n);
    if (!sym || !*sym)
        return em_fail(c, n->loc, NULL, "op '%s' has no %s kernel symbol", d->name,
                       n->is_backward ? "backward" : "forward");
    if (count < 0 || count > PLAN_MAX_KERNEL_ARGS)
        return em_fail(c, d->loc, "split the kernel or pass a struct of sizes",
                       "kernel '%s' of op '%s' has more arguments than a plan allows (24)", sym,
                       d->name);
    plan_kernel k;
    memset(&k, 0, sizeof k);
    k.symbol = em_str(c, sym);
    k.lib = 0;
    for (int i = 0; d->lib && i < c->g->nlibs; i++)
        if (strcmp(c->g->libs[i], d->lib) == 0)
            k.lib = (uint32_t)i + 1;
    k.nargs = (uint32_t)count;
    for (int a = 0; a < count; a++) {
        if (t[a].kind == IR_REF_ATTR && (t[a].index < 0 || t[a].index >= d->nattrs))
            return em_fail(c, d->loc, NULL, "kernel '%s' of op '%s' names an attribute the op "
                           "does not have", sym, d->name);
        k.arg_kinds[a] = em_arg_kind(d, &t[a]);
    }
    plan_kernel *all = (plan_kernel *)c->kernels.p;
    size_t nk = c->kernels.n / sizeof k;
    for (size_t i = 0; i < nk; i++) {
        if (all[i].symbol != k.symbol || all[i].lib != k.lib)
            continue;
        if (all[i].nargs != k.nargs || memcmp(all[i].arg_kinds, k.arg_kinds, sizeof k.arg_kinds) != 0)
            return em_fail(c, d->loc, "every declaration of a kernel symbol must pass the same "
                           "argument types", "kernel '%s' is called with two different argument "
                           "lists (op '%s')", sym, d->name);
        *out = (uint32_t)i;
        return 0;
    }
    em_put(&c->kernels, &k, sizeof k);
    *out = (uint32_t)nk;
    return 0;
}

static int em_op(em_ctx *c, const ir_node *n)
{
    uint32_t kernel;
    if (em_kernel(c, n, &kernel) < 0)
        return -1;
    int count;
    const ir_ref *t = iop_template(n, &count);
    plan_op op;
    memset(&op, 0, sizeof op);
    op.kernel = kernel;
    op.phase = n->phase;
    op.first_arg = c->args.n / sizeof(plan_arg);
    op.nargs = (uint32_t)count;
    op.src_file = em_str(c, n->loc.file);
    op.src_line = (uint32_t)(n->loc.line > 0 ? n->loc.line : 0);
    op.src_col = (uint32_t)(n->loc.col > 0 ? n->loc.col : 0);
    op.what = em_str(c, n->what ? n->what : n->def->name);
    for (int a = 0; a < count; a++) {
        plan_arg arg;
        memset(&arg, 0, sizeof arg);
        arg.kind = em_arg_kind(n->def, &t[a]);
        switch (t[a].kind) {
        case IR_REF_IN: case IR_REF_OUT: case IR_REF_DIN: case IR_REF_DOUT: {
            int v = iop_ref_value(n, &t[a]);
            if (v < 0 || v >= c->g->nvalues || c->tensor_of[v] < 0)
                return em_fail(c, n->loc, "this is a compiler bug; please report it",
                               "internal error: an argument of kernel '%s' (%s) names no "
                               "planned tensor", iop_symbol(n), op.what ? (const char *)c->strs.p + op.what : "");
            arg.v.tensor = (uint64_t)c->tensor_of[v];
            break;
        }
        case IR_REF_DIM:
            arg.v.i64 = t[a].index >= 0 && t[a].index < IR_MAX_SYMS ? n->dims[t[a].index] : 0;
            break;
        case IR_REF_INT:
            arg.v.i64 = t[a].i;
            break;
        case IR_REF_FLOAT:
            arg.v.f32 = (float)t[a].f;
            break;
        case IR_REF_ATTR:
            if (arg.kind == PLAN_ARG_F32)
                arg.v.f32 = (float)n->attrs[t[a].index].f;
            else if (arg.kind == PLAN_ARG_F64)
                arg.v.f64 = n->attrs[t[a].index].f;
            else
                arg.v.i64 = n->attrs[t[a].index].i;
            break;
        }
        em_put(&c->args, &arg, sizeof arg);
    }
    em_put(&c->ops, &op, sizeof op);
    return 0;
}

/* Value v is (part of) an expert param sharded over the expert-parallel
 * ranks: the param, its gradient, optimizer states or master copy
 * (compiler/parallel_ep.c shrank them to the local experts). */
static bool em_expert_shard(const ir_graph *g, int v)
{
    if (g->par_ranks <= 1 || g->par_expert <= 1)
        return false;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->expert_axis == 0 && (pp->value == v || pp->grad == v || pp->state0 == v ||
                                     pp->state1 == v || pp->master == v))
            return true;
    }
    return false;
}

static void em_tables(em_ctx *c)
{
    const ir_graph *g = c->g;
    static const char *const pool_names[PLAN_ST_COUNT] = {"param", "grad", "optstate", "act",
                                                           "input", "buffer"};
    for (int s = 0; s < PLAN_ST_COUNT; s++) {
        plan_pool p;
        memset(&p, 0, sizeof p);
        p.name = em_str(c, pool_names[s]);
        p.storage = (uint32_t)s;
        p.bytes = (uint64_t)g->pool_bytes[s];
        em_put(&c->pools, &p, sizeof p);
    }
    int nt = 0;
    for (int v = 0; v < g->nvalues; v++) {
        const ir_value *val = &g->values[v];
        c->tensor_of[v] = -1;
        if (val->pool < 0)
            continue;
        plan_tensor t;
        memset(&t, 0, sizeof t);
        t.name = em_str(c, val->name);
        t.dtype = val->dtype;
        t.storage = val->storage;
        t.ndim = val->ndim;
        t.role = val->role;
        t.pool = (uint32_t)val->pool;
        for (int i = 0; i < val->ndim && i < PLAN_MAX_DIMS; i++)
            t.shape[i] = val->shape[i];
        t.offset = val->offset;
        t.bytes = ir_value_bytes(val);
        t.expert_shard = em_expert_shard(g, v) ? PLAN_EXPERT_SHARD : 0;
        em_put(&c->tensors, &t, sizeof t);
        c->tensor_of[v] = nt++;
    }
    plan_lib lib;
    memset(&lib, 0, sizeof lib);
    em_put(&c->libs, &lib, sizeof lib);   /* index 0: the device library */
    for (int i = 0; i < g->nlibs; i++) {
        lib.path = em_str(c, g->libs[i]);
        em_put(&c->libs, &lib, sizeof lib);
    }
}

static int32_t em_tensor(const em_ctx *c, int v)
{
    return v >= 0 && v < c->g->nvalues ? c->tensor_of[v] : -1;
}

static int em_params(em_ctx *c)
{
    const ir_graph *g = c->g;
    for (int p = 0; p < g->nparams; p++) {
        const ir_param *pp = &g->params[p];
        if (pp->tied_to >= 0)
            continue;   /* shares the other param's storage and row */
        plan_param row;
        memset(&row, 0, sizeof row);
        if (em_tensor(c, pp->value) < 0)
            return em_fail(c, pp->loc, "this is a compiler bug; please report it",
                           "internal error: param '%s' has no planned tensor%s",
                           g->values[pp->value].name, "");
        row.tensor = (uint32_t)em_tensor(c, pp->value);
        row.grad = em_tensor(c, pp->grad);
        row.state0 = em_tensor(c, pp->state0);
        row.state1 = em_tensor(c, pp->state1);
        /* a bf16/f16 param's fp32 master copy (optimizer pass); -1 for fp32 params */
        row.master = g->values[pp->value].dtype == PLAN_BF16 || g->values[pp->value].dtype == PLAN_F16
                         ? em_tensor(c, pp->master) : -1;
        row.init = pp->init;
        row.init_std = pp->init_std;
        row.weight_decay = pp->decay && row.grad >= 0 ? g->train.weight_decay : 0.0f;
        em_put(&c->params, &row, sizeof row);
    }
    return 0;
}

static void em_pad8(em_buf *b)
{
    static const unsigned char zeros[8] = {0};
    if (b->n % 8)
        em_put(b, zeros, 8 - b->n % 8);
}

/* Writes data to path through a temporary file and a rename. */
static int em_write_file(em_ctx *c, const char *path, const em_buf *file)
{
    ir_srcloc none = {NULL, 0, 0};
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    if (!tmp)
        abort();
    snprintf(tmp, plen + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        int e = errno;
        free(tmp);
        em_fail(c, none, "check that the output folder exists and is writable (or use -o)",
                "cannot write plan '%s': %s", path, strerror(e));
        return -1;
    }
    /* mkstemp makes the file 0600; give the plan the usual umask mode */
    mode_t mask = umask(0);
    umask(mask);
    int e = fchmod(fd, 0666 & ~mask) < 0 ? errno : 0;
    size_t done = 0;
    while (!e && done < file->n) {
        ssize_t w = write(fd, file->p + done, file->n - done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            e = errno;
            break;
        }
        done += (size_t)w;
    }
    if (!e && fsync(fd) < 0 && errno != EINVAL)
        e = errno;
    if (close(fd) < 0 && !e)
        e = errno;
    if (!e && rename(tmp, path) < 0)
        e = errno;
    if (e) {
        unlink(tmp);
        free(tmp);
        em_fail(c, none, e == ENOSPC || e == EDQUOT || e == EFBIG ? "free some disk space, or write elsewhere with -o"
                         : e == EISDIR ? "that path is a folder: name a file with -o"
                         : "choose another output path with -o",
                "cannot write plan '%s': %s", path, strerror(e));
        return -1;
    }
    free(tmp);
    return 0;
}

static void em_free(em_ctx *c)
{
    em_buf *bufs[] = {&c->strs, &c->pools, &c->tensors, &c->libs, &c->kernels, &c->ops,
                      &c->args, &c->params};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(bufs[i]->p);
    free(c->hash);
    free(c->tensor_of);
}

int pass_emit(const ir_graph *g, const char *path, moec_error *err)
{
    em_ctx c;
    memset(&c, 0, sizeof c);
    c.g = g;
    c.err = err;
    c.tensor_of = malloc(sizeof(int) * (size_t)(g->nvalues + 1));
    if (!c.tensor_of)
        abort();
    em_put(&c.strs, "", 1);   /* offset 0: the empty string */
    em_tables(&c);
    for (int ni = 0; ni < g->nnodes; ni++) {
        if (em_op(&c, &g->nodes[ni]) < 0) {
            em_free(&c);
            return -1;
        }
    }
    if (em_params(&c) < 0) {
        em_free(&c);
        return -1;
    }

    plan_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, PLAN_MAGIC, 8);
    h.format_version = PLAN_FORMAT_VERSION;
    h.header_bytes = sizeof h;
    h.source_hash = g->source_hash;
    h.compiler_version = em_str(&c, EMIT_COMPILER_VERSION);
    h.model_name = em_str(&c, g->model_name);

    explain_counts counts;
    explain_count(g, &counts);
    plan_train tr = g->train;
    tr.data_path = em_str(&c, g->data_path);
    tr.flops_per_token = counts.flops_per_token;
    tr.param_count = counts.params;
    tr.active_param_count = counts.active_params;
    tr.workspace_bytes = explain_workspace_bytes(g);
    tr.gpu_workspace_bytes = explain_gpu_workspace_bytes(g);
    tr.par_ranks = g->par_ranks;
    tr.par_expert = g->par_expert;
    tr.par_zero = g->par_zero;

    /* layout: header, train, then the sections in enum order, each 8-aligned */
    em_buf file = {NULL, 0, 0};
    em_put(&file, &h, sizeof h);
    em_put(&file, &tr, sizeof tr);
    em_pad8(&file);
    const em_buf *secs[PLAN_SEC_COUNT] = {&c.strs, &c.pools, &c.tensors, &c.libs, &c.kernels,
                                          &c.ops, &c.args, &c.params};
    const size_t recsize[PLAN_SEC_COUNT] = {1, sizeof(plan_pool), sizeof(plan_tensor),
                                            sizeof(plan_lib), sizeof(plan_kernel),
                                            sizeof(plan_op), sizeof(plan_arg), sizeof(plan_param)};
    for (int s = 0; s < PLAN_SEC_COUNT; s++) {
        h.sections[s].offset = file.n;
        h.sections[s].count = secs[s]->n / recsize[s];
        if (secs[s]->n)
            em_put(&file, secs[s]->p, secs[s]->n);
        em_pad8(&file);
    }
    h.file_bytes = file.n;
    h.checksum = plan_fnv1a(file.p + sizeof h, file.n - sizeof h, PLAN_FNV_OFFSET);
    memcpy(file.p, &h, sizeof h);

    int rc = em_write_file(&c, path, &file);
    free(file.p);
    em_free(&c);
    return rc;
}
