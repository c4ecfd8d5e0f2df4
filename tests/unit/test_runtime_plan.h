/* test_runtime_plan.h - helpers for the runtime tests: a small plan writer
 * (the same records moec emits, built by hand) and a test kernel library
 * compiled on the fly, so the runtime is tested without the compiler. */
#ifndef TEST_RUNTIME_PLAN_H
#define TEST_RUNTIME_PLAN_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../runtime/plan.h"
#include "../../kernels/moek.h"

#define PB_MAX 64

typedef struct pb {
    char str[8192]; uint64_t nstr;
    plan_pool pools[PLAN_ST_COUNT];
    plan_tensor tensors[PB_MAX]; uint64_t nt;
    plan_lib libs[4]; uint64_t nlibs;
    plan_kernel kernels[PB_MAX]; uint64_t nk;
    plan_op ops[PB_MAX]; uint64_t nops;
    plan_arg args[PB_MAX * 8]; uint64_t nargs;
    plan_param params[PB_MAX]; uint64_t nparams;
    plan_train train;
    uint32_t model_name, version;
} pb;

static inline uint32_t pb_str(pb *b, const char *s)
{
    if (!*s)
        return 0;
    uint32_t off = (uint32_t)b->nstr;
    size_t n = strlen(s) + 1;
    memcpy(b->str + b->nstr, s, n);
    b->nstr += n;
    return off;
}

static inline void pb_init(pb *b)
{
    static const char *const names[] = {"param", "grad", "optstate", "act", "input", "buffer"};
    memset(b, 0, sizeof *b);
    b->nstr = 1;   /* offset 0: "" */
    for (int s = 0; s < PLAN_ST_COUNT; s++) {
        b->pools[s].name = pb_str(b, names[s]);
        b->pools[s].storage = (uint32_t)s;
    }
    b->libs[0].path = 0;
    b->nlibs = 1;
    b->model_name = pb_str(b, "testmodel");
    b->version = pb_str(b, "moec test");
    plan_train *t = &b->train;
    t->batch = 2; t->seq = 8; t->grad_accum = 1; t->steps = 10; t->seed = 42;
    t->eval_every = 0; t->eval_batches = 2; t->log_every = 1; t->vocab = 256;
    t->lr = 0.1f; t->min_lr = 0.01f; t->beta1 = 0.9f; t->beta2 = 0.95f; t->eps = 1e-8f;
    t->clip_grad = 1.0f; t->val_fraction = 0.1f;
}

/* A tensor in the pool of its storage class, at the next aligned offset. */
static inline uint32_t pb_tensor(pb *b, const char *name, uint32_t dtype, uint32_t storage,
                          uint32_t role, int ndim, ...)
{
    plan_tensor *t = &b->tensors[b->nt];
    memset(t, 0, sizeof *t);
    t->name = pb_str(b, name);
    t->dtype = (uint8_t)dtype;
    t->storage = (uint8_t)storage;
    t->role = (uint8_t)role;
    t->ndim = (uint8_t)ndim;
    t->pool = storage;
    va_list ap;
    va_start(ap, ndim);
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = va_arg(ap, int64_t);
        n *= (uint64_t)t->shape[i];
    }
    va_end(ap);
    t->bytes = n * plan_dtype_size(dtype);
    plan_pool *p = &b->pools[storage];
    t->offset = (p->bytes + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN;
    p->bytes = t->offset + t->bytes;
    return (uint32_t)b->nt++;
}

static inline uint32_t pb_lib(pb *b, const char *path)
{
    b->libs[b->nlibs].path = pb_str(b, path);
    return (uint32_t)b->nlibs++;
}

/* kinds: one letter per argument after ctx: t tensor, i i64, f f32, d f64 */
static inline uint32_t pb_kernel(pb *b, const char *sym, uint32_t lib, const char *kinds)
{
    plan_kernel *k = &b->kernels[b->nk];
    memset(k, 0, sizeof *k);
    k->symbol = pb_str(b, sym);
    k->lib = lib;
    k->nargs = (uint32_t)strlen(kinds);
    for (uint32_t i = 0; i < k->nargs; i++)
        k->arg_kinds[i] = kinds[i] == 't' ? PLAN_ARG_TENSOR : kinds[i] == 'i' ? PLAN_ARG_I64
                        : kinds[i] == 'f' ? PLAN_ARG_F32 : PLAN_ARG_F64;
    return (uint32_t)b->nk++;
}

/* Arguments follow the kernel's kinds: tensors and i64 as int64_t, f32/f64 as double. */
static inline uint32_t pb_op(pb *b, uint32_t kernel, uint32_t phase, const char *what, uint32_t line, ...)
{
    const plan_kernel *k = &b->kernels[kernel];
    plan_op *op = &b->ops[b->nops];
    memset(op, 0, sizeof *op);
    op->kernel = kernel;
    op->phase = phase;
    op->first_arg = b->nargs;
    op->nargs = k->nargs;
    op->src_file = pb_str(b, "test.moe");
    op->src_line = line;
    op->src_col = 3;
    op->what = pb_str(b, what);
    va_list ap;
    va_start(ap, line);
    for (uint32_t i = 0; i < k->nargs; i++) {
        plan_arg *a = &b->args[b->nargs++];
        memset(a, 0, sizeof *a);
        a->kind = k->arg_kinds[i];
        if (a->kind == PLAN_ARG_TENSOR) a->v.tensor = (uint64_t)va_arg(ap, int64_t);
        else if (a->kind == PLAN_ARG_I64) a->v.i64 = va_arg(ap, int64_t);
        else if (a->kind == PLAN_ARG_F32) a->v.f32 = (float)va_arg(ap, double);
        else a->v.f64 = va_arg(ap, double);
    }
    va_end(ap);
    return (uint32_t)b->nops++;
}

static inline void pb_param(pb *b, uint32_t tensor, int32_t grad, int32_t s0, int32_t s1, uint32_t init,
                     float std)
{
    plan_param *p = &b->params[b->nparams++];
    memset(p, 0, sizeof *p);
    p->tensor = tensor; p->grad = grad; p->state0 = s0; p->state1 = s1;
    p->init = init; p->init_std = std;
    p->master = -1;   /* fp32 params have no master copy */
}

static inline void pb_put(unsigned char *buf, uint64_t *at, const void *p, uint64_t n)
{
    memcpy(buf + *at, p, n);
    *at += (n + 7) / 8 * 8;
}

/* The file image (8-byte aligned, malloc'd); *n its length. */
static inline unsigned char *pb_finish(const pb *b, uint64_t *n)
{
    uint64_t size = sizeof(plan_header) + sizeof(plan_train);
    uint64_t secbytes[PLAN_SEC_COUNT] = {
        b->nstr, PLAN_ST_COUNT * sizeof(plan_pool), b->nt * sizeof(plan_tensor),
        b->nlibs * sizeof(plan_lib), b->nk * sizeof(plan_kernel), b->nops * sizeof(plan_op),
        b->nargs * sizeof(plan_arg), b->nparams * sizeof(plan_param)};
    for (int s = 0; s < PLAN_SEC_COUNT; s++)
        size += (secbytes[s] + 7) / 8 * 8;
    unsigned char *buf = aligned_alloc(8, (size + 7) / 8 * 8);
    memset(buf, 0, (size + 7) / 8 * 8);
    plan_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, PLAN_MAGIC, 8);
    h.format_version = PLAN_FORMAT_VERSION;
    h.header_bytes = sizeof h;
    h.file_bytes = size;
    h.source_hash = 0x1234;
    h.compiler_version = b->version;
    h.model_name = b->model_name;
    uint64_t at = sizeof h;
    pb_put(buf, &at, &b->train, sizeof b->train);
    const void *src[PLAN_SEC_COUNT] = {b->str, b->pools, b->tensors, b->libs, b->kernels,
                                       b->ops, b->args, b->params};
    uint64_t cnt[PLAN_SEC_COUNT] = {b->nstr, PLAN_ST_COUNT, b->nt, b->nlibs, b->nk, b->nops,
                                    b->nargs, b->nparams};
    for (int s = 0; s < PLAN_SEC_COUNT; s++) {
        h.sections[s].offset = at;
        h.sections[s].count = cnt[s];
        pb_put(buf, &at, src[s], secbytes[s]);
    }
    h.checksum = plan_fnv1a(buf + sizeof h, size - sizeof h, PLAN_FNV_OFFSET);
    memcpy(buf, &h, sizeof h);
    *n = size;
    return buf;
}

/* Recompute the checksum after a deliberate edit of a finished image. */
static inline void pb_reseal(unsigned char *buf, uint64_t n)
{
    plan_header h;
    memcpy(&h, buf, sizeof h);
    h.checksum = plan_fnv1a(buf + sizeof h, n - sizeof h, PLAN_FNV_OFFSET);
    memcpy(buf, &h, sizeof h);
}

static inline int pb_write(const pb *b, const char *path)
{
    uint64_t n;
    unsigned char *buf = pb_finish(b, &n);
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(buf, 1, n, f) == n;
    if (f)
        fclose(f);
    free(buf);
    return ok ? 0 : -1;
}

/* A kernel library implementing a few moek.h kernels and the device
 * services on host memory: enough to train a byte-level bigram model. */
static const char test_kernel_src[] =
    "#include <math.h>\n#include <stdlib.h>\n#include <string.h>\n#include <stdint.h>\n"
    "typedef struct moek_ctx { void *stream, *blas, *workspace; int64_t workspace_bytes;"
    " int *status; int num_threads; } moek_ctx;\n"
    "int moek_device_count(void) { return 1; }\n"
    "int moek_device_half_native(void) { return 0; }\n"
    "int moek_device_init(moek_ctx *c, int64_t d, int64_t w, char *e, int64_t n)"
    " { (void)d; (void)e; (void)n; c->workspace = 0; c->workspace_bytes = w; return 0; }\n"
    "void moek_device_fini(moek_ctx *c) { (void)c; }\n"
    "void *moek_device_alloc(const moek_ctx *c, int64_t b, char *e, int64_t n)"
    " { (void)c; (void)e; (void)n; return calloc(1, (size_t)b); }\n"
    "void moek_device_free(const moek_ctx *c, void *p) { (void)c; free(p); }\n"
    "int moek_device_copy(const moek_ctx *c, void *d, const void *s, int64_t b, int64_t k,"
    " char *e, int64_t n) { (void)c; (void)k; (void)e; (void)n; memcpy(d, s, (size_t)b); return 0; }\n"
    "int moek_device_sync(const moek_ctx *c, char *e, int64_t n) { (void)c; (void)e; (void)n; return 0; }\n"
    "void moek_fill(const moek_ctx *c, float *x, int64_t n, float v)"
    " { (void)c; for (int64_t i = 0; i < n; i++) x[i] = v; }\n"
    "void moek_add_fwd(const moek_ctx *c, const float *a, const float *b, float *y, int64_t n)"
    " { (void)c; for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i]; }\n"
    "void moek_scale_fwd(const moek_ctx *c, const float *x, float *y, int64_t n, float s)"
    " { (void)c; for (int64_t i = 0; i < n; i++) y[i] = x[i] * s; }\n"
    "void test_axpy_f64(const moek_ctx *c, double a, const float *x, float *y, int64_t n)"
    " { (void)c; for (int64_t i = 0; i < n; i++) y[i] += (float)(a * x[i]); }\n"
    "void moek_accumulate(const moek_ctx *c, float *d, const float *s, int64_t n)"
    " { (void)c; for (int64_t i = 0; i < n; i++) d[i] += s[i]; }\n"
    "void moek_embedding_fwd(const moek_ctx *c, const int32_t *ids, const float *tab, float *out,"
    " int64_t N, int64_t V, int64_t D) { for (int64_t i = 0; i < N; i++) {"
    " if (ids[i] < 0 || ids[i] >= V) { if (!*c->status) *c->status = 1; return; }"
    " memcpy(out + i * D, tab + (int64_t)ids[i] * D, (size_t)D * 4); } }\n"
    "void moek_embedding_bwd(const moek_ctx *c, const float *dout, const int32_t *ids, float *dt,"
    " int64_t N, int64_t V, int64_t D) { (void)c; memset(dt, 0, (size_t)(V * D) * 4);"
    " for (int64_t i = 0; i < N; i++) for (int64_t d = 0; d < D; d++)"
    " dt[(int64_t)ids[i] * D + d] += dout[i * D + d]; }\n"
    "void moek_cross_entropy_fwd(const moek_ctx *c, const float *lg, const int32_t *tg, float *loss,"
    " float *lse, int64_t N, int64_t V) { double s = 0; for (int64_t i = 0; i < N; i++) {"
    " if (tg[i] < 0 || tg[i] >= V) { if (!*c->status) *c->status = 1; return; }"
    " const float *r = lg + i * V; float m = r[0]; for (int64_t v = 1; v < V; v++) if (r[v] > m) m = r[v];"
    " double z = 0; for (int64_t v = 0; v < V; v++) z += exp((double)r[v] - m);"
    " lse[i] = (float)(m + log(z)); s += lse[i] - r[tg[i]]; } *loss = (float)(s / N); }\n"
    "void moek_cross_entropy_bwd(const moek_ctx *c, const float *dl, const float *lg, const int32_t *tg,"
    " const float *lse, float *dlg, int64_t N, int64_t V) { (void)c; for (int64_t i = 0; i < N; i++)"
    " for (int64_t v = 0; v < V; v++) dlg[i * V + v] = (float)(*dl / N * (exp((double)lg[i * V + v] - lse[i])"
    " - (v == tg[i]))); }\n"
    "void moek_sumsq_accum(const moek_ctx *c, const float *x, float *acc, int64_t n)"
    " { (void)c; double s = 0; for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i]; *acc += (float)s; }\n"
    "void moek_adamw(const moek_ctx *c, float *p, const float *g, float *m, float *v, int64_t n,"
    " const float *h, const float *nsq, float wd) { (void)c; float sc = 1;"
    " if (h[6] > 0 && sqrtf(*nsq) > h[6]) sc = h[6] / sqrtf(*nsq);"
    " for (int64_t i = 0; i < n; i++) { float gi = g[i] * sc; m[i] = h[1] * m[i] + (1 - h[1]) * gi;"
    " v[i] = h[2] * v[i] + (1 - h[2]) * gi * gi; float mh = m[i] / h[4], vh = v[i] / h[5];"
    " p[i] -= h[0] * (mh / (sqrtf(vh) + h[3]) + wd * p[i]); } }\n";

/* Compiles test_kernel_src (plus extra) into dir/name; 0 on success. */
static inline int pb_build_lib(const char *dir, const char *name, const char *extra)
{
    char src[512], cmd[2048];
    snprintf(src, sizeof src, "%s/%s.c", dir, name);
    FILE *f = fopen(src, "w");
    if (!f)
        return -1;
    fputs(test_kernel_src, f);
    if (extra)
        fputs(extra, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "cc -O1 -shared -fPIC -o %s/%s %s -lm 2>&1", dir, name, src);
    return system(cmd) == 0 ? 0 : -1;
}

/* A trainable byte-level bigram model: logits = table[tokens], cross
 * entropy, AdamW.  Gradients accumulate over grad_accum micro-steps
 * through an activation temporary; the optimizer phase resets them. */
static inline void pb_bigram(pb *b, int64_t grad_accum)
{
    plan_train *t = &b->train;
    t->grad_accum = grad_accum;
    int64_t B = t->batch, T = t->seq, V = 256, N = B * T;
    uint32_t tok = pb_tensor(b, "tokens", PLAN_I32, PLAN_ST_INPUT, PLAN_ROLE_TOKENS, 2, B, T);
    uint32_t tgt = pb_tensor(b, "targets", PLAN_I32, PLAN_ST_INPUT, PLAN_ROLE_TARGETS, 2, B, T);
    uint32_t hyp = pb_tensor(b, "hyper", PLAN_F32, PLAN_ST_INPUT, PLAN_ROLE_HYPER, 1, (int64_t)MOEK_HYPER_COUNT);
    uint32_t seed = pb_tensor(b, "loss_seed", PLAN_F32, PLAN_ST_INPUT, PLAN_ROLE_LOSS_SEED, 1, (int64_t)1);
    uint32_t w = pb_tensor(b, "bigram.weight", PLAN_F32, PLAN_ST_PARAM, 0, 2, V, V);
    uint32_t gw = pb_tensor(b, "bigram.weight.grad", PLAN_F32, PLAN_ST_GRAD, 0, 2, V, V);
    uint32_t m = pb_tensor(b, "bigram.weight.adam_m", PLAN_F32, PLAN_ST_OPTSTATE, 0, 2, V, V);
    uint32_t v = pb_tensor(b, "bigram.weight.adam_v", PLAN_F32, PLAN_ST_OPTSTATE, 0, 2, V, V);
    uint32_t logits = pb_tensor(b, "logits", PLAN_F32, PLAN_ST_ACT, PLAN_ROLE_LOGITS, 2, N, V);
    uint32_t lse = pb_tensor(b, "lse", PLAN_F32, PLAN_ST_ACT, 0, 1, N);
    uint32_t loss = pb_tensor(b, "loss", PLAN_F32, PLAN_ST_ACT, PLAN_ROLE_LOSS, 1, (int64_t)1);
    uint32_t dlg = pb_tensor(b, "logits.grad", PLAN_F32, PLAN_ST_ACT, 0, 2, N, V);
    uint32_t gtmp = pb_tensor(b, "bigram.weight.grad.tmp", PLAN_F32, PLAN_ST_ACT, 0, 2, V, V);
    uint32_t nsq = pb_tensor(b, "grad_norm_sq", PLAN_F32, PLAN_ST_ACT, PLAN_ROLE_NORM_SQ, 1, (int64_t)1);
    uint32_t kemb = pb_kernel(b, "moek_embedding_fwd", 0, "tttiii");
    uint32_t kce = pb_kernel(b, "moek_cross_entropy_fwd", 0, "ttttii");
    uint32_t kceb = pb_kernel(b, "moek_cross_entropy_bwd", 0, "tttttii");
    uint32_t kembb = pb_kernel(b, "moek_embedding_bwd", 0, "tttiii");
    uint32_t kacc = pb_kernel(b, "moek_accumulate", 0, "tti");
    uint32_t kfill = pb_kernel(b, "moek_fill", 0, "tif");
    uint32_t ksq = pb_kernel(b, "moek_sumsq_accum", 0, "tti");
    uint32_t kadam = pb_kernel(b, "moek_adamw", 0, "ttttittf");
    pb_op(b, kemb, PLAN_PHASE_FORWARD, "embedding", 4, (int64_t)tok, (int64_t)w, (int64_t)logits, N, V, V);
    pb_op(b, kce, PLAN_PHASE_FORWARD, "cross_entropy", 5, (int64_t)logits, (int64_t)tgt, (int64_t)loss, (int64_t)lse, N, V);
    pb_op(b, kceb, PLAN_PHASE_BACKWARD, "cross_entropy (backward)", 5, (int64_t)seed, (int64_t)logits,
          (int64_t)tgt, (int64_t)lse, (int64_t)dlg, N, V);
    pb_op(b, kembb, PLAN_PHASE_BACKWARD, "embedding (backward)", 4, (int64_t)dlg, (int64_t)tok, (int64_t)gtmp, N, V, V);
    pb_op(b, kacc, PLAN_PHASE_BACKWARD, "grad accumulate", 4, (int64_t)gw, (int64_t)gtmp, V * V);
    pb_op(b, kfill, PLAN_PHASE_OPTIMIZER, "grad norm reset", 9, (int64_t)nsq, (int64_t)1, 0.0);
    pb_op(b, ksq, PLAN_PHASE_OPTIMIZER, "grad norm", 9, (int64_t)gw, (int64_t)nsq, V * V);
    pb_op(b, kadam, PLAN_PHASE_OPTIMIZER, "adamw", 9, (int64_t)w, (int64_t)gw, (int64_t)m, (int64_t)v, V * V,
          (int64_t)hyp, (int64_t)nsq, 0.0);
    pb_op(b, kfill, PLAN_PHASE_OPTIMIZER, "grad reset", 9, (int64_t)gw, V * V, 0.0);
    pb_param(b, w, (int32_t)gw, (int32_t)m, (int32_t)v, PLAN_INIT_NORMAL, 0.02f);
    /* a logged metric: half the loss */
    uint32_t half = pb_tensor(b, "half_loss", PLAN_F32, PLAN_ST_ACT, PLAN_ROLE_METRIC, 1, (int64_t)1);
    uint32_t ksc = pb_kernel(b, "moek_scale_fwd", 0, "ttif");
    pb_op(b, ksc, PLAN_PHASE_FORWARD, "metric", 6, (int64_t)loss, (int64_t)half, (int64_t)1, 0.5);
}

#endif
