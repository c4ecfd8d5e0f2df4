/* checkpoint.c - safetensors writer and a bounds-checked reader: the JSON
 * header is untrusted input, so every length and offset is checked before
 * it is used.  A bf16 param with an fp32 master copy is stored as that
 * master (F32, under the param's name); the master tensor is not stored
 * under its own name, so a checkpoint does not depend on the precision. */
#include "checkpoint.h"

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

/* Stored in a checkpoint of this mode under its own name. */
static int stored(const plan_file *pf, uint64_t i, int mode)
{
    return saved(&pf->tensors[i], mode) && !is_master(pf, i);
}

/* The tensor whose bytes are stored for tensor i: its master, or itself. */
static uint64_t source(const plan_file *pf, uint64_t i)
{
    int64_t m = master_of(pf, i);
    return m >= 0 ? (uint64_t)m : i;
}

uint16_t ckpt_bf16_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);   /* NaN: keep it a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);          /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

int ckpt_write_f32(exec_state *ex, uint64_t t, const float *h, uint64_t n, char *err,
                   size_t errlen)
{
    const plan_tensor *pt = &ex->pf->tensors[t];
    if (pt->dtype == PLAN_F32)
        return exec_write(ex, t, 0, h, n * 4, err, errlen);
    if (pt->dtype != PLAN_BF16)
        return fail(err, errlen, "internal: tensor '%s' is %s, not a float tensor",
                    plan_str(ex->pf, pt->name), st_dtype(pt->dtype));
    uint16_t *b = malloc(n * 2 + 2);
    if (!b)
        return fail(err, errlen, "out of memory writing %s", plan_str(ex->pf, pt->name));
    for (uint64_t k = 0; k < n; k++)
        b[k] = ckpt_bf16_from_f32(h[k]);
    int rc = exec_write(ex, t, 0, b, n * 2, err, errlen);
    free(b);
    return rc;
}

int ckpt_set_param(exec_state *ex, uint64_t i, const float *h, char *err, size_t errlen)
{
    const plan_param *p = &ex->pf->params[i];
    uint64_t n = plan_tensor_numel(&ex->pf->tensors[p->tensor]);
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
        const plan_tensor *t = &pf->tensors[grads ? i : source(pf, i)];
        sb_add(&h, ",");
        sb_json_str(&h, name);
        sb_add(&h, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype(t->dtype));
        for (unsigned d = 0; d < t->ndim; d++)
            sb_add(&h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        sb_add(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
               (unsigned long long)(off + t->bytes));
        off += t->bytes;
        if (t->bytes > maxb)
            maxb = t->bytes;
    }
    sb_add(&h, "}");
    while (!h.oom && (8 + h.n) % 8 != 0)   /* pad so the data starts 8-aligned */
        sb_add(&h, " ");
    char *buf = h.oom ? NULL : malloc(maxb ? maxb : 1);
    if (!buf) {
        free(h.p);
        return fail(err, errlen, "out of memory writing checkpoint %s", path);
    }
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        free(h.p);
        free(buf);
        return fail(err, errlen, "cannot write checkpoint %s: %s; check the directory", tmp,
                    strerror(errno));
    }
    uint64_t hlen = h.n;
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(hlen >> (8 * i));
    int rc = write_all(fd, le, 8) || write_all(fd, h.p, h.n) ? -1 : 0;
    if (rc)
        fail(err, errlen, "cannot write checkpoint %s: %s", tmp, strerror(errno));
    for (uint64_t i = 0; i < pf->ntensors && rc == 0; i++) {
        if (!pick(pf, i, grads))
            continue;
        uint64_t si = grads ? i : source(pf, i);
        const plan_tensor *t = &pf->tensors[si];
        if (exec_read(ex, si, 0, buf, t->bytes, err, errlen)) {
            rc = -1;
            break;
        }
        if (t->dtype == PLAN_F32) {
            const float *f = (const float *)buf;
            for (uint64_t k = 0; k < t->bytes / 4; k++)
                if (!isfinite(f[k])) {
                    rc = fail(err, errlen, "refusing to save a non-finite model: %s[%llu] is "
                              "%g; lower the learning rate or enable clip_grad",
                              plan_str(pf, t->name), (unsigned long long)k, (double)f[k]);
                    break;
                }
        }
        if (rc == 0 && write_all(fd, buf, t->bytes))
            rc = fail(err, errlen, "cannot write checkpoint %s: %s", tmp, strerror(errno));
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
            if (stored(pf, i, CKPT_FULL) &&
                strcmp(plan_str(pf, pf->tensors[i].name), e->name) == 0) {
                ti = i;
                break;
            }
        if (ti == pf->ntensors) {
            fail(err, errlen, "%s: tensor '%s' is not in this plan; the checkpoint belongs to "
                 "another model", path, e->name);
            goto out;
        }
        /* a bf16 param with a master is stored as its fp32 master */
        const plan_tensor *t = &pf->tensors[source(pf, ti)];
        if (seen[ti]) {
            fail(err, errlen, "%s: tensor '%s' appears twice; the checkpoint is damaged", path,
                 e->name);
            goto out;
        }
        seen[ti] = 1;
        if (strcmp(e->dtype, st_dtype(t->dtype)) != 0) {
            fail(err, errlen, "%s: tensor '%s' is %s, the plan wants %s; use a checkpoint of "
                 "this model", path, e->name, e->dtype, st_dtype(t->dtype));
            goto out;
        }
        int same = e->ndim == t->ndim;
        for (int d = 0; same && d < e->ndim; d++)
            same = e->shape[d] == (uint64_t)t->shape[d];
        if (!same) {
            char a[128] = "", b[128] = "";
            for (int d = 0; d < e->ndim; d++)
                snprintf(a + strlen(a), sizeof a - strlen(a), "%s%llu", d ? "," : "",
                         (unsigned long long)e->shape[d]);
            for (int d = 0; d < t->ndim; d++)
                snprintf(b + strlen(b), sizeof b - strlen(b), "%s%lld", d ? "," : "",
                         (long long)t->shape[d]);
            fail(err, errlen, "%s: tensor '%s' has shape [%s], the plan wants [%s]; use a "
                 "checkpoint of this model", path, e->name, a, b);
            goto out;
        }
        if (e->off[0] > e->off[1] || e->off[1] > dsize || e->off[1] - e->off[0] != t->bytes) {
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
            if (!stored(pf, i, mode) || strcmp(plan_str(pf, t->name), ents[k].name) != 0)
                continue;
            int64_t m = master_of(pf, i);
            if (m < 0) {
                if (exec_write(ex, i, 0, data + ents[k].off[0], t->bytes, err, errlen))
                    goto out;
                break;
            }
            /* master <- the stored fp32 values; param <- bf16(master) */
            uint64_t n = plan_tensor_numel(t);
            free(wide);
            wide = malloc(n * 4 + 4);
            if (!wide) {
                fail(err, errlen, "%s: out of memory", path);
                goto out;
            }
            memcpy(wide, data + ents[k].off[0], n * 4);
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
