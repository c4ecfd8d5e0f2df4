/* checkpoint.c - safetensors writer and a bounds-checked reader: the JSON
 * header is untrusted input, so every length and offset is checked before
 * it is used.  A bf16 param with an fp32 master copy is stored as that
 * master (F32, under the param's name); the master tensor is not stored
 * under its own name, so a checkpoint does not depend on the precision. */
#include "checkpoint.h"
#include "comm.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CKPT_MAX_HEADER (256u << 20)
#define CKPT_NAME_MAX 512

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static const char *st_dtype(uint32_t dt)
{
    static const char *const n[] = {"F32", "BF16", "F16", "I32", "I64"};
    return dt < 5 ? n[dt] : "?";
}

static int saved(const plan_tensor *t, int mode)
{
    return t->storage == PLAN_ST_PARAM || t->storage == PLAN_ST_BUFFER ||
           (mode == CKPT_FULL && t->storage == PLAN_ST_OPTSTATE);
}

/* The fp32 master copy stored in place of tensor i, or -1. */
static int64_t master_of(const plan_file *pf, uint64_t i)
{
    for (uint64_t k = 0; k < pf->nparams; k++)
        if (pf->params[k].tensor == i && pf->params[k].master >= 0)
            return pf->params[k].master;
    return -1;
}

/* Tensor i is some param's master: stored only through that param. */
static int is_master(const plan_file *pf, uint64_t i)
{
    for (uint64_t k = 0; k < pf->nparams; k++)
        if (pf->params[k].master >= 0 && (uint64_t)pf->params[k].master == i)
            return 1;
    return 0;
}

/* Tensor i is a flat buffer of the multi-tensor optimizer pass
 * (docs/passes.md): smaller tensors of its pool lie inside it as views.
 * Those are stored under their own names; the buffer itself is not, so a
 * checkpoint does not depend on how the params were grouped. */
static int is_flat(const plan_file *pf, uint64_t i)
{
    const plan_tensor *t = &pf->tensors[i];
    for (uint64_t k = 0; k < pf->ntensors; k++) {
        const plan_tensor *u = &pf->tensors[k];
        if (k != i && u->pool == t->pool && u->bytes < t->bytes && u->offset >= t->offset &&
            u->offset - t->offset <= t->bytes - u->bytes)
            return 1;
    }
    return 0;
}

/* Stored in a checkpoint of this mode under its own name. */
static int stored(const plan_file *pf, uint64_t i, int mode)
{
    return saved(&pf->tensors[i], mode) && !is_master(pf, i) && !is_flat(pf, i);
}

/* The tensor whose bytes are stored for tensor i: its master, or itself. */
static uint64_t source(const plan_file *pf, uint64_t i)
{
    int64_t m = master_of(pf, i);
    return m >= 0 ? (uint64_t)m : i;
}

/* ZeRO (docs/parallel.md): the param row whose tensor i holds only this
 * rank's slice (optimizer state from stage 1, gradients from stage 2), or -1.
 * Checkpoints keep whole tensors: a slice is gathered to write it and cut
 * from the whole to load it, so a file does not depend on the layout. */
static int64_t zero_owner(const plan_file *pf, uint64_t i)
{
    if (pf->train->par_ranks <= 1 || pf->train->par_zero < 1)
        return -1;
    for (uint64_t k = 0; k < pf->nparams; k++) {
        const plan_param *p = &pf->params[k];
        if ((p->state0 >= 0 && (uint64_t)p->state0 == i) ||
            (p->state1 >= 0 && (uint64_t)p->state1 == i) ||
            (p->master >= 0 && (uint64_t)p->master == i) ||
            (pf->train->par_zero >= 2 && p->grad >= 0 && (uint64_t)p->grad == i) ||
            (pf->train->par_zero >= 3 && p->grad >= 0 && p->tensor == i))
            return (int64_t)k;
    }
    return -1;
}

/* Expert parallelism (plan_tensor.expert_shard, docs/parallel.md): tensor i
 * holds this rank's experts, dim 0 of a global tensor par_expert times as
 * long; returns that factor (1 when not sharded) and this rank's slice
 * index.  Checkpoints store the global tensor under global expert ids. */
static int64_t ep_mult(const plan_file *pf, uint64_t i)
{
    return pf->tensors[i].expert_shard == PLAN_EXPERT_SHARD && pf->train->par_expert > 1
               ? pf->train->par_expert : 1;
}

static int64_t ep_index(const exec_state *ex)
{
    int64_t P = ex->pf->train->par_expert > 1 ? ex->pf->train->par_expert : 1;
    return comm_rank(ex->ctx.comm) % P;
}

/* The group tensor i's ZeRO slices are cut over: an expert shard's own
 * expert-DP group (the ranks holding the same experts), else the DP group. */
static int zero_group(const plan_file *pf, uint64_t i)
{
    return ep_mult(pf, i) > 1 ? COMM_GROUP_EXPERT_DP : COMM_GROUP_DP;
}

/* The tensor with param k's whole shape (this rank's experts): the param,
 * or at ZeRO stage 3, where the param is a slice, the "<name>.gathered"
 * activation forward reads (the plan loader checked it exists). */
static const plan_tensor *whole_of(const plan_file *pf, uint64_t k)
{
    const plan_tensor *t = &pf->tensors[pf->params[k].tensor];
    if (pf->train->par_ranks <= 1 || pf->train->par_zero < 3 || pf->params[k].grad < 0)
        return t;
    const char *name = plan_str(pf, t->name);
    size_t nl = strlen(name);
    for (uint64_t j = 0; j < pf->ntensors; j++) {
        const char *fn = plan_str(pf, pf->tensors[j].name);
        if (strncmp(fn, name, nl) == 0 && strcmp(fn + nl, ".gathered") == 0)
            return &pf->tensors[j];
    }
    return t;
}

uint64_t ckpt_param_numel(const plan_file *pf, uint64_t k)
{
    return plan_tensor_numel(whole_of(pf, k));
}

/* The whole tensor i stands for: its own shape, or a slice's param shape. */
static const plan_tensor *logical(const plan_file *pf, uint64_t i, uint64_t *bytes)
{
    int64_t k = zero_owner(pf, i);
    const plan_tensor *t = k >= 0 ? whole_of(pf, (uint64_t)k) : &pf->tensors[i];
    *bytes = plan_tensor_numel(t) * plan_dtype_size(pf->tensors[i].dtype) *
             (uint64_t)ep_mult(pf, i);
    return t;
}

/* The whole of tensor i into buf (logical bytes; buf holds twice that): a
 * ZeRO slice is first gathered over its group into this rank's whole
 * tensor, an expert shard's whole then over the EP group, in group-rank
 * order = global expert order.  Every rank must call this in the same order. */
static int read_whole(exec_state *ex, uint64_t i, void *buf, char *err, size_t errlen)
{
    const plan_tensor *t = &ex->pf->tensors[i];
    uint64_t bytes;
    int64_t em = ep_mult(ex->pf, i);
    logical(ex->pf, i, &bytes);
    uint64_t local = bytes / (uint64_t)em;   /* this rank's experts, or the whole */
    char *mine = em > 1 ? (char *)buf + bytes : buf;
    if (zero_owner(ex->pf, i) < 0) {
        if (exec_read(ex, i, 0, mine, t->bytes, err, errlen))
            return -1;
    } else {
        int64_t size;
        int group = zero_group(ex->pf, i);
        comm_group_index(ex->ctx.comm, group, &size);
        char *all = malloc((size_t)size * t->bytes + t->bytes);
        if (!all)
            return fail(err, errlen, "out of memory gathering %s", plan_str(ex->pf, t->name));
        int rc = exec_read(ex, i, 0, all + (size_t)size * t->bytes, t->bytes, err, errlen) ||
                 comm_allgather_host(ex->ctx.comm, all + (size_t)size * t->bytes, all,
                                     (int64_t)t->bytes, group, "checkpoint gather", err,
                                     errlen) ? -1 : 0;
        if (rc == 0)
            memcpy(mine, all, local);
        free(all);
        if (rc)
            return -1;
    }
    if (em > 1)
        return comm_allgather_host(ex->ctx.comm, mine, buf, (int64_t)local, COMM_GROUP_EP,
                                   "checkpoint gather of expert shards", err, errlen);
    return 0;
}

int ckpt_write_f32(exec_state *ex, uint64_t t, const float *h, uint64_t n, char *err,
                   size_t errlen)
{
    const plan_tensor *pt = &ex->pf->tensors[t];
    if (zero_owner(ex->pf, t) >= 0 && (uint64_t)plan_tensor_numel(pt) != n) {
        /* ZeRO slice (fp32 state, or a bf16/fp16 param at stage 3): this
         * rank's part of the whole h[0, n), zero padded, then as below */
        uint64_t s = plan_tensor_numel(pt), lo, k;
        int64_t size;
        lo = (uint64_t)comm_group_index(ex->ctx.comm, zero_group(ex->pf, t), &size) * s;
        float *sl = calloc(s + 1, sizeof *sl);
        if (!sl)
            return fail(err, errlen, "out of memory writing %s", plan_str(ex->pf, pt->name));
        for (k = 0; k < s && lo + k < n; k++)
            sl[k] = h[lo + k];
        int rc = ckpt_write_f32(ex, t, sl, s, err, errlen);
        free(sl);
        return rc;
    }
    if (pt->dtype == PLAN_F32)
        return exec_write(ex, t, 0, h, n * 4, err, errlen);
    if (pt->dtype != PLAN_BF16 && pt->dtype != PLAN_F16)
        return fail(err, errlen, "internal: tensor '%s' is %s, not a float tensor",
                    plan_str(ex->pf, pt->name), st_dtype(pt->dtype));
    uint16_t *b = malloc(n * 2 + 2);
    if (!b)
        return fail(err, errlen, "out of memory writing %s", plan_str(ex->pf, pt->name));
    for (uint64_t k = 0; k < n; k++)
        b[k] = pt->dtype == PLAN_F16 ? moek_f16_from_f32(h[k]) : moek_bf16_from_f32(h[k]);
    int rc = exec_write(ex, t, 0, b, n * 2, err, errlen);
    free(b);
    return rc;
}

int ckpt_set_param(exec_state *ex, uint64_t i, const float *h, char *err, size_t errlen)
{
    const plan_param *p = &ex->pf->params[i];
    uint64_t n = ckpt_param_numel(ex->pf, i);
    if (p->master >= 0 && ckpt_write_f32(ex, (uint64_t)p->master, h, n, err, errlen))
        return -1;
    return ckpt_write_f32(ex, p->tensor, h, n, err, errlen);
}

const char *ckpt_meta_get(const ckpt_meta *meta, int nmeta, const char *key)
{
    for (int i = 0; i < nmeta; i++)
        if (strcmp(meta[i].key, key) == 0)
            return meta[i].val;
    return NULL;
}

/* ---- writing ------------------------------------------------------------ */
typedef struct sbuf { char *p; size_t n, cap; int oom; } sbuf;

static void sb_add(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) { b->oom = 1; return; }
        if (b->p && b->n + (size_t)k < b->cap) { b->n += (size_t)k; return; }
        size_t cap = (b->cap + (size_t)k + 1) * 2;
        char *q = realloc(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = q;
        b->cap = cap;
    }
}

static void sb_json_str(sbuf *b, const char *s)
{
    sb_add(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            sb_add(b, "\\%c", c);
        else if (c < 0x20)
            sb_add(b, "\\u%04x", c);
        else
            sb_add(b, "%c", c);
    }
    sb_add(b, "\"");
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t k = write(fd, c, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Which tensors a file holds and under what name: the checkpoint's state
 * tensors under their own names, or (grads != 0) every param's gradient
 * under the param's name, so a reader pairs them without the plan. */
static const char *pick(const plan_file *pf, uint64_t i, int grads)
{
    const plan_tensor *t = &pf->tensors[i];
    if (!grads)
        return stored(pf, i, CKPT_FULL) ? plan_str(pf, t->name) : NULL;
    for (uint64_t k = 0; t->storage == PLAN_ST_GRAD && k < pf->nparams; k++)
        if (pf->params[k].grad >= 0 && (uint64_t)pf->params[k].grad == i)
            return plan_str(pf, pf->tensors[pf->params[k].tensor].name);
    return NULL;
}

static int save_file(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta,
                     int grads, char *err, size_t errlen);

int ckpt_save(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta, char *err,
              size_t errlen)
{
    return save_file(ex, path, meta, nmeta, 0, err, errlen);
}

int ckpt_save_grads(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta,
                    char *err, size_t errlen)
{
    return save_file(ex, path, meta, nmeta, 1, err, errlen);
}

static int save_file(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta,
                     int grads, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    sbuf h = {0};
    uint64_t off = 0, maxb = 0;
    sb_add(&h, "{\"__metadata__\":{");
    for (int i = 0; i < nmeta; i++) {
        sb_add(&h, i ? "," : "");
        sb_json_str(&h, meta[i].key);
        sb_add(&h, ":");
        sb_json_str(&h, meta[i].val);
    }
    sb_add(&h, "}");
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        const char *name = pick(pf, i, grads);
        if (!name)
            continue;
        /* the bytes stored: a bf16 param's fp32 master (same shape) */
        uint64_t tb;
        const plan_tensor *t = logical(pf, grads ? i : source(pf, i), &tb);
        sb_add(&h, ",");
        sb_json_str(&h, name);
        sb_add(&h, ":{\"dtype\":\"%s\",\"shape\":[",
               st_dtype(pf->tensors[grads ? i : source(pf, i)].dtype));
        for (unsigned d = 0; d < t->ndim; d++)
            sb_add(&h, "%s%lld", d ? "," : "", (long long)t->shape[d] *
                   (d ? 1 : ep_mult(pf, grads ? i : source(pf, i))));
        sb_add(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
               (unsigned long long)(off + tb));
        off += tb;
        if (tb > maxb)
            maxb = tb;
    }
    sb_add(&h, "}");
    while (!h.oom && (8 + h.n) % 8 != 0)   /* pad so the data starts 8-aligned */
        sb_add(&h, " ");
    char *buf = h.oom ? NULL : malloc(maxb ? 2 * maxb : 1);   /* + an expert shard's own part */
    if (!buf) {
        free(h.p);
        return fail(err, errlen, "out of memory writing checkpoint %s", path);
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* ZeRO: every rank gathers the slices, rank 0 alone writes the file */
    int writer = comm_rank(ex->ctx.comm) == 0;
    int fd = writer ? open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : -1;
    if (writer && fd < 0) {
        free(h.p);
        free(buf);
        return fail(err, errlen, "cannot write checkpoint %s: %s; check the directory", tmp,
                    strerror(errno));
    }
    uint64_t hlen = h.n;
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(hlen >> (8 * i));
    int rc = writer && (write_all(fd, le, 8) || write_all(fd, h.p, h.n)) ? -1 : 0;
    if (rc)
        fail(err, errlen, "cannot write checkpoint %s: %s", tmp, strerror(errno));
    /* after a write error rank 0 keeps gathering, so no peer waits in vain */
    for (uint64_t i = 0; i < pf->ntensors; i++) {
        if (!pick(pf, i, grads))
            continue;
        uint64_t si = grads ? i : source(pf, i), tb;
        const plan_tensor *t = &pf->tensors[si];
        logical(pf, si, &tb);
        if (read_whole(ex, si, buf, err, errlen)) {
            rc = -1;
            break;
        }
        if (rc == 0 && t->dtype == PLAN_F32) {
            const float *f = (const float *)buf;
            for (uint64_t k = 0; k < tb / 4; k++)
                if (!isfinite(f[k])) {
                    rc = fail(err, errlen, "refusing to save a non-finite model: %s[%llu] is "
                              "%g; lower the learning rate or enable clip_grad",
                              plan_str(pf, t->name), (unsigned long long)k, (double)f[k]);
                    break;
                }
        }
        if (rc == 0 && writer && write_all(fd, buf, tb))
            rc = fail(err, errlen, "cannot write checkpoint %s: %s", tmp, strerror(errno));
    }
    if (!writer) {
        free(h.p);
        free(buf);
        return rc;
    }
    if (rc == 0 && fsync(fd) != 0)
        rc = fail(err, errlen, "cannot sync checkpoint %s: %s", tmp, strerror(errno));
    if (close(fd) != 0 && rc == 0)
        rc = fail(err, errlen, "cannot close checkpoint %s: %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = fail(err, errlen, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (rc)
        unlink(tmp);
    else {
        /* make the rename itself durable */
        char dir[PATH_MAX];
        const char *s = strrchr(path, '/');
        snprintf(dir, sizeof dir, "%.*s", s ? (int)(s - path) + (s == path) : 1, s ? path : ".");
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    free(h.p);
    free(buf);
    return rc;
}

/* ---- reading: a small JSON parser over [p, end) -------------------------- */
typedef struct jp { const char *p, *end; char *err; size_t errlen; const char *path; } jp;

static int jfail(jp *j, const char *what)
{
    return fail(j->err, j->errlen, "%s: corrupt safetensors header: %s; the checkpoint is "
                "damaged, use another one", j->path, what);
}

static void jws(jp *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t'))
        j->p++;
}

static int jchar(jp *j, char c)
{
    jws(j);
    if (j->p >= j->end || *j->p != c) {
        char m[32];
        snprintf(m, sizeof m, "expected '%c'", c);
        return jfail(j, m);
    }
    j->p++;
    return 0;
}

static int jpeek(jp *j, char c)
{
    jws(j);
    return j->p < j->end && *j->p == c;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int jstring(jp *j, char *out, size_t cap)
{
    if (jchar(j, '"'))
        return -1;
    size_t n = 0;
    while (j->p < j->end && *j->p != '"') {
        unsigned c = (unsigned char)*j->p++;
        if (c == '\\') {
            if (j->p >= j->end)
                return jfail(j, "unterminated string");
            char e = *j->p++;
            switch (e) {
            case '"': case '\\': case '/': c = (unsigned char)e; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u': {
                if (j->end - j->p < 4)
                    return jfail(j, "short \\u escape");
                c = 0;
                for (int i = 0; i < 4; i++) {
                    int h = hexval(*j->p++);
                    if (h < 0)
                        return jfail(j, "bad \\u escape");
                    c = c * 16 + (unsigned)h;
                }
                if (c == 0 || c >= 0x80)
                    c = '?';   /* names we write are ASCII; never store a NUL */
                break;
            }
            default: return jfail(j, "bad escape");
            }
        } else if (c < 0x20) {
            return jfail(j, "control character in string");
        }
        if (n + 1 >= cap)
            return jfail(j, "string too long");
        out[n++] = (char)c;
    }
    if (j->p >= j->end)
        return jfail(j, "unterminated string");
    j->p++;
    out[n] = '\0';
    return 0;
}

static int juint(jp *j, uint64_t *v)
{
    jws(j);
    if (j->p >= j->end || *j->p < '0' || *j->p > '9')
        return jfail(j, "expected a non-negative integer");
    uint64_t x = 0;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        unsigned d = (unsigned)(*j->p++ - '0');
        if (x > (UINT64_MAX - d) / 10 || x > (1ull << 62))
            return jfail(j, "integer too large");
        x = x * 10 + d;
    }
    *v = x;
    return 0;
}

static int juint_array(jp *j, uint64_t *v, int max, int *n)
{
    if (jchar(j, '['))
        return -1;
    *n = 0;
    if (jpeek(j, ']'))
        return jchar(j, ']');
    for (;;) {
        if (*n >= max)
            return jfail(j, "array too long");
        if (juint(j, &v[(*n)++]))
            return -1;
        if (jpeek(j, ','))
            j->p++;
        else
            return jchar(j, ']');
    }
}

typedef struct centry {
    char name[CKPT_NAME_MAX];
    char dtype[8];
    uint64_t shape[PLAN_MAX_DIMS + 1];
    int ndim;
    uint64_t off[2];
} centry;

static int jentry(jp *j, centry *e)
{
    int have_dt = 0, have_shape = 0, have_off = 0;
    if (jchar(j, '{'))
        return -1;
    if (jpeek(j, '}'))
        return jfail(j, "empty tensor entry");
    for (;;) {
        char key[32];
        if (jstring(j, key, sizeof key) || jchar(j, ':'))
            return -1;
        if (strcmp(key, "dtype") == 0) {
            if (jstring(j, e->dtype, sizeof e->dtype))
                return -1;
            have_dt = 1;
        } else if (strcmp(key, "shape") == 0) {
            if (juint_array(j, e->shape, PLAN_MAX_DIMS + 1, &e->ndim))
                return -1;
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            int n;
            if (juint_array(j, e->off, 2, &n))
                return -1;
            if (n != 2)
                return jfail(j, "data_offsets needs two numbers");
            have_off = 1;
        } else {
            return jfail(j, "unknown key in a tensor entry");
        }
        if (jpeek(j, ','))
            j->p++;
        else
            break;
    }
    if (jchar(j, '}'))
        return -1;
    if (!have_dt || !have_shape || !have_off)
        return jfail(j, "tensor entry lacks dtype, shape or data_offsets");
    return 0;
}

static int read_file(const char *path, unsigned char **out, uint64_t *n, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errlen, "%s: cannot open checkpoint: %s; check the path", path,
                    strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(err, errlen, "%s: not a regular file; give a .safetensors checkpoint", path);
    }
    unsigned char *b = malloc((size_t)st.st_size + 1);
    if (!b) {
        close(fd);
        return fail(err, errlen, "%s: out of memory reading the checkpoint", path);
    }
    uint64_t got = 0;
    while (got < (uint64_t)st.st_size) {
        ssize_t k = read(fd, b + got, (size_t)st.st_size - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        got += (uint64_t)k;
    }
    close(fd);
    if (got != (uint64_t)st.st_size) {
        free(b);
        return fail(err, errlen, "%s: short read; check the file", path);
    }
    *out = b;
    *n = got;
    return 0;
}

int ckpt_load(exec_state *ex, const char *path, int mode, ckpt_meta *meta, int maxmeta,
              int *nmeta, char *err, size_t errlen)
{
    const plan_file *pf = ex->pf;
    unsigned char *file = NULL;
    uint64_t fsize = 0;
    centry *ents = NULL;
    char *seen = NULL;
    float *wide = NULL;
    int rc = -1, nm = 0;
    size_t nent = 0, cap = 0;
    if (read_file(path, &file, &fsize, err, errlen))
        return -1;
    if (fsize < 8) {
        fail(err, errlen, "%s: truncated checkpoint (%llu bytes); use another checkpoint", path,
             (unsigned long long)fsize);
        goto out;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | file[i];
    if (hlen > fsize - 8 || hlen > CKPT_MAX_HEADER) {
        fail(err, errlen, "%s: truncated or not a safetensors file (header length %llu, file "
             "%llu bytes); use another checkpoint", path, (unsigned long long)hlen,
             (unsigned long long)fsize);
        goto out;
    }
    const unsigned char *data = file + 8 + hlen;
    uint64_t dsize = fsize - 8 - hlen;
    jp j = {(const char *)file + 8, (const char *)file + 8 + hlen, err, errlen, path};
    if (jchar(&j, '{'))
        goto out;
    if (!jpeek(&j, '}'))
        for (;;) {
            char name[CKPT_NAME_MAX];
            if (jstring(&j, name, sizeof name) || jchar(&j, ':'))
                goto out;
            if (strcmp(name, "__metadata__") == 0) {
                if (jchar(&j, '{'))
                    goto out;
                if (!jpeek(&j, '}'))
                    for (;;) {
                        ckpt_meta m;
                        if (jstring(&j, m.key, sizeof m.key) || jchar(&j, ':') ||
                            jstring(&j, m.val, sizeof m.val))
                            goto out;
                        if (nm < maxmeta)
                            meta[nm++] = m;
                        if (jpeek(&j, ','))
                            j.p++;
                        else
                            break;
                    }
                if (jchar(&j, '}'))
                    goto out;
            } else {
                if (nent == cap) {
                    cap = cap ? cap * 2 : 64;
                    centry *q = realloc(ents, cap * sizeof *ents);
                    if (!q) {
                        fail(err, errlen, "%s: out of memory", path);
                        goto out;
                    }
                    ents = q;
                }
                centry *e = &ents[nent];
                memset(e, 0, sizeof *e);
                memcpy(e->name, name, sizeof name);
                if (jentry(&j, e))
                    goto out;
                nent++;
            }
            if (jpeek(&j, ','))
                j.p++;
            else
                break;
        }
    if (jchar(&j, '}'))
        goto out;
    jws(&j);
    if (j.p != j.end) {
        jfail(&j, "trailing bytes after the JSON object");
        goto out;
    }
    seen = calloc(pf->ntensors + 1, 1);
    if (!seen) {
        fail(err, errlen, "%s: out of memory", path);
        goto out;
    }
    for (size_t k = 0; k < nent; k++) {
        centry *e = &ents[k];
        uint64_t ti = pf->ntensors;
        for (uint64_t i = 0; i < pf->ntensors; i++)
            if (strcmp(plan_str(pf, pf->tensors[i].name), e->name) == 0 &&
                stored(pf, i, CKPT_FULL)) {
                ti = i;
                break;
            }
        if (ti == pf->ntensors) {
            fail(err, errlen, "%s: tensor '%s' is not in this plan; the checkpoint belongs to "
                 "another model", path, e->name);
            goto out;
        }
        /* a bf16 param with a master is stored as its fp32 master; a ZeRO
         * slice as the whole tensor */
        const plan_tensor *dt = &pf->tensors[source(pf, ti)];
        uint64_t tbytes;
        const plan_tensor *t = logical(pf, source(pf, ti), &tbytes);
        if (seen[ti]) {
            fail(err, errlen, "%s: tensor '%s' appears twice; the checkpoint is damaged", path,
                 e->name);
            goto out;
        }
        seen[ti] = 1;
        if (strcmp(e->dtype, st_dtype(dt->dtype)) != 0) {
            fail(err, errlen, "%s: tensor '%s' is %s, the plan wants %s; use a checkpoint of "
                 "this model", path, e->name, e->dtype, st_dtype(dt->dtype));
            goto out;
        }
        int64_t em = ep_mult(pf, source(pf, ti));   /* expert shards: the global shape */
        int same = e->ndim == t->ndim;
        for (int d = 0; same && d < e->ndim; d++)
            same = e->shape[d] == (uint64_t)(t->shape[d] * (d ? 1 : em));
        if (!same) {
            char a[128] = "", b[128] = "";
            for (int d = 0; d < e->ndim; d++)
                snprintf(a + strlen(a), sizeof a - strlen(a), "%s%llu", d ? "," : "",
                         (unsigned long long)e->shape[d]);
            for (int d = 0; d < t->ndim; d++)
                snprintf(b + strlen(b), sizeof b - strlen(b), "%s%lld", d ? "," : "",
                         (long long)(t->shape[d] * (d ? 1 : em)));
            fail(err, errlen, "%s: tensor '%s' has shape [%s], the plan wants [%s]; use a "
                 "checkpoint of this model", path, e->name, a, b);
            goto out;
        }
        if (e->off[0] > e->off[1] || e->off[1] > dsize || e->off[1] - e->off[0] != tbytes) {
            fail(err, errlen, "%s: tensor '%s' data [%llu, %llu) does not fit the %llu-byte "
                 "data section or its shape; the checkpoint is truncated or damaged", path,
                 e->name, (unsigned long long)e->off[0], (unsigned long long)e->off[1],
                 (unsigned long long)dsize);
            goto out;
        }
    }
    for (uint64_t i = 0; i < pf->ntensors; i++)
        if (stored(pf, i, mode) && !seen[i]) {
            fail(err, errlen, "%s: tensor '%s' is missing; use a checkpoint of this model%s",
                 path, plan_str(pf, pf->tensors[i].name),
                 pf->tensors[i].storage == PLAN_ST_OPTSTATE ? " (or --init-from for weights "
                 "only)" : "");
            goto out;
        }
    /* everything checked: now copy */
    for (size_t k = 0; k < nent; k++) {
        for (uint64_t i = 0; i < pf->ntensors; i++) {
            const plan_tensor *t = &pf->tensors[i];
            if (strcmp(plan_str(pf, t->name), ents[k].name) != 0 || !stored(pf, i, mode))
                continue;
            int64_t m = master_of(pf, i);
            if (m < 0 && zero_owner(pf, i) >= 0) {
                /* a ZeRO slice: cut this rank's part from the whole (of
                 * this rank's experts: lt has the local shape) */
                uint64_t tb;
                const plan_tensor *lt = logical(pf, i, &tb);
                uint64_t ln = plan_tensor_numel(lt);
                free(wide);
                wide = malloc(ln * 4 + 4);
                if (!wide) {
                    fail(err, errlen, "%s: out of memory", path);
                    goto out;
                }
                memcpy(wide, data + ents[k].off[0] + (uint64_t)ep_index(ex) * ln * 4 *
                       (ep_mult(pf, i) > 1), ln * 4);
                if (ckpt_write_f32(ex, i, wide, ln, err, errlen))
                    goto out;
                break;
            }
            /* expert shards: this rank's experts are one slice of the global tensor */
            uint64_t skip = ep_mult(pf, i) > 1 ? (uint64_t)ep_index(ex) * plan_tensor_numel(t) *
                            (m < 0 ? t->bytes / plan_tensor_numel(t) : 4) : 0;
            if (m < 0) {
                if (exec_write(ex, i, 0, data + ents[k].off[0] + skip, t->bytes, err, errlen))
                    goto out;
                break;
            }
            /* master <- the stored fp32 values; param <- bf16(master) or f16(master);
             * at ZeRO-3 both are slices of the whole (of this rank's experts) */
            uint64_t tb, n = plan_tensor_numel(logical(pf, i, &tb));
            if (zero_owner(pf, i) >= 0)
                skip = ep_mult(pf, i) > 1 ? (uint64_t)ep_index(ex) * n * 4 : 0;
            free(wide);
            wide = malloc(n * 4 + 4);
            if (!wide) {
                fail(err, errlen, "%s: out of memory", path);
                goto out;
            }
            memcpy(wide, data + ents[k].off[0] + skip, n * 4);
            if (ckpt_write_f32(ex, (uint64_t)m, wide, n, err, errlen) ||
                ckpt_write_f32(ex, i, wide, n, err, errlen))
                goto out;
            break;
        }
    }
    *nmeta = nm;
    rc = 0;
out:
    free(file);
    free(ents);
    free(seen);
    free(wide);
    return rc;
}
