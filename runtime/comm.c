/* comm.c - the communication interface: backend loading, the built-in
 * single-rank backend and the "@comm" collective kernels (see comm.h). */
#include "comm.h"
#include "plan.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define CX_RETIRED_MAX 64   /* doublings of a scratch buffer: far past any memory */

struct comm {
    const comm_backend *be;
    void *impl;
    void *dl;                 /* dlopen handle of the backend library, NULL for single */
    int rank, world;
    int aborted;
    const comm_zero_backend *zero;   /* ZeRO collectives, NULL if the backend lacks them */
    comm_bind_stream_fn bind;        /* nccl: follows ctx->stream; NULL for the others */
    int device;               /* plan tensors are device memory (--device cuda) */
    int direct;               /* ... and the backend takes them (COMM_CAP_DEVICE_BUFFERS) */
    comm_device dev;          /* the kernel library's copy service (comm_set_device) */
    char err[1024];           /* first collective failure */
    /* expert parallelism (comm_ep.c part below) */
    const comm_ep_backend *ep;   /* NULL: the backend has no all-to-all */
    int64_t expert;              /* expert-parallel size the groups were made with */
    unsigned char *ep_send, *ep_recv;   /* staging, grown on first use */
    int64_t ep_send_cap, ep_recv_cap;
    struct {                  /* device scratch of the direct path (cx_dscratch): */
        void *p;              /* an exchange's send (0) and receive (1) buffers, */
        int64_t cap;          /* and zeros (2: allocated zeroed, never written) */
    } dscr[3];
    void *retired[CX_RETIRED_MAX];   /* outgrown scratch, freed by comm_release_device */
    int nretired;
    /* ZeRO's host staging, grown to the largest op and kept: a malloc/free
     * per op left glibc's heap holding several sizes at once (resident
     * memory above what moec --explain predicts) */
    unsigned char *zstage;
    int64_t zstage_cap;
};

/* Grows a kept staging buffer to want bytes; -1 when out of memory. */
static int stage_grow(unsigned char **p, int64_t *cap, int64_t want)
{
    if (want <= *cap)
        return 0;
    unsigned char *q = realloc(*p, (size_t)want);
    if (!q)
        return -1;
    *p = q;
    *cap = want;
    return 0;
}

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* ---- single rank: a sum over one rank is the identity ------------------ */
static int single_init(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                       size_t errlen)
{
    (void)a; (void)err; (void)errlen;
    *impl = NULL;
    *rank = 0;
    *world = 1;
    return 0;
}

static int single_allreduce(void *impl, float *const *bufs, const int64_t *ns, int count,
                            int group, const char *what, char *err, size_t errlen)
{
    (void)impl; (void)bufs; (void)ns; (void)count; (void)group; (void)what; (void)err;
    (void)errlen;
    return 0;
}

static int single_allreduce_host(void *impl, double *buf, int64_t n, int group, const char *what,
                                 char *err, size_t errlen)
{
    (void)impl; (void)buf; (void)n; (void)group; (void)what; (void)err; (void)errlen;
    return 0;
}

static void single_abort(void *impl, int code) { (void)impl; (void)code; }
static void single_fini(void *impl) { (void)impl; }

static const comm_backend single_backend = {
    COMM_BACKEND_ABI, "single", single_init, single_allreduce, single_allreduce_host,
    single_abort, single_fini,
};

/* ---- loading ------------------------------------------------------------ */
static int launched_by_mpi(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                       "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]))
            return 1;
    return 0;
}

static void *open_backend(const comm_opts *o, const char *file, char *searched, size_t sn,
                          char *dlerr, size_t dn)
{
    const char *env = getenv("MOEC_KERNELS");
    char dirs[4][PATH_MAX], path[PATH_MAX + 64];
    const size_t dirmax = PATH_MAX - 64;   /* room for the file name */
    int nd = 0;
    if (env && *env)
        snprintf(dirs[nd++], PATH_MAX, "%s", env);
    if (o->exe_dir && *o->exe_dir) {
        snprintf(dirs[nd++], PATH_MAX, "%s/build", o->exe_dir);
        snprintf(dirs[nd++], PATH_MAX, "%s", o->exe_dir);
        snprintf(dirs[nd++], PATH_MAX, "%s/../lib/moec", o->exe_dir);
    }
    searched[0] = '\0';
    for (int i = 0; i < nd; i++) {
        if (strnlen(dirs[i], PATH_MAX) > dirmax)
            continue;
        snprintf(path, sizeof path, "%.*s/%.60s", (int)dirmax, dirs[i], file);
        /* GLOBAL: Open MPI's own plugins resolve libmpi symbols through it */
        void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL | RTLD_NODELETE);
        if (h)
            return h;
        const char *e = dlerror();
        if (e && !strstr(e, "No such file"))
            snprintf(dlerr, dn, "%s", e);
        size_t l = strlen(searched);
        snprintf(searched + l, sn - l, "%s%s", l ? ", " : "", dirs[i]);
    }
    return NULL;
}

comm *comm_open(const comm_opts *o, char *err, size_t errlen)
{
    const char *want = o->backend && strcmp(o->backend, "auto") != 0 ? o->backend : NULL;
    if (!want)
        want = !launched_by_mpi() ? "single" : o->device_cuda ? "nccl" : "mpi";
    comm *c = calloc(1, sizeof *c);
    if (!c) {
        fail(err, errlen, "out of memory");
        return NULL;
    }
    if (strcmp(want, "single") == 0) {
        c->be = &single_backend;
    } else if (strcmp(want, "mpi") == 0 || strcmp(want, "nccl") == 0) {
        char file[64], searched[4 * PATH_MAX + 16], dlerr[512] = "";
        snprintf(file, sizeof file, "libmoec_comm_%s.so", want);
        c->dl = open_backend(o, file, searched, sizeof searched, dlerr, sizeof dlerr);
        if (!c->dl) {
            fail(err, errlen, "cannot load the %s backend %s (%s; searched %s); build it with "
                 "`make %s`, or set MOEC_KERNELS to its directory", want, file,
                 *dlerr ? dlerr : "not found", *searched ? searched : "nowhere",
                 strcmp(want, "mpi") == 0 ? "comm-mpi" : "comm-nccl");
            free(c);
            return NULL;
        }
        comm_backend_fn fn;
        void *sym = dlsym(c->dl, COMM_BACKEND_SYMBOL);
        memcpy(&fn, &sym, sizeof fn);
        c->be = sym ? fn() : NULL;
        comm_zero_fn zf;
        void *zsym = dlsym(c->dl, COMM_ZERO_SYMBOL);
        memcpy(&zf, &zsym, sizeof zf);
        c->zero = zsym ? zf() : NULL;
        void *bsym = dlsym(c->dl, COMM_BIND_STREAM_SYMBOL);
        memcpy(&c->bind, &bsym, sizeof c->bind);
        if (c->zero && c->zero->abi != COMM_BACKEND_ABI)
            c->zero = NULL;
        if (!c->be || c->be->abi != COMM_BACKEND_ABI) {
            fail(err, errlen, "%s is not a moec communication backend of ABI %d; rebuild it "
                 "from this source tree", file, COMM_BACKEND_ABI);
            dlclose(c->dl);
            free(c);
            return NULL;
        }
    } else {
        fail(err, errlen, "unknown communication backend '%s'; use --comm single, mpi or nccl",
             want);
        free(c);
        return NULL;
    }
    c->expert = o->expert > 0 ? o->expert : 1;
    if (c->dl) {
        comm_ep_backend_fn efn;
        void *esym = dlsym(c->dl, COMM_EP_SYMBOL);
        memcpy(&efn, &esym, sizeof efn);
        c->ep = esym ? efn() : NULL;
        if (c->ep && c->ep->abi != COMM_BACKEND_ABI)
            c->ep = NULL;
    }
    int64_t caps = 0;
    if (c->dl) {
        comm_caps_fn cfn;
        void *csym = dlsym(c->dl, COMM_CAPS_SYMBOL);
        memcpy(&cfn, &csym, sizeof cfn);
        caps = csym ? cfn() : 0;
    }
    c->device = o->device_cuda != 0;
    c->direct = c->device && (caps & COMM_CAP_DEVICE_BUFFERS);
    /* test hook: either device path on CPU ranks (the CPU copy service is
     * a memcpy and MPI takes any host pointer) */
    const char *force = getenv("MOEC_TEST_COMM_DEVICE");
    if (force && *force) {
        if (strcmp(force, "staged") != 0 && strcmp(force, "direct") != 0) {
            fail(err, errlen, "MOEC_TEST_COMM_DEVICE is '%s'; use staged or direct (or unset it)",
                 force);
            if (c->dl)
                dlclose(c->dl);
            free(c);
            return NULL;
        }
        c->device = 1;
        c->direct = strcmp(force, "direct") == 0;
    }
    comm_init_args a = {o->expert > 0 ? o->expert : 1, o->timeout_s > 0 ? o->timeout_s : 300.0,
                        o->device_cuda, NULL};
    char e[768];
    if (c->be->init(&c->impl, &a, &c->rank, &c->world, e, sizeof e)) {
        fail(err, errlen, "the %s backend failed to start: %s", c->be->name, e);
        if (c->dl)
            dlclose(c->dl);
        free(c);
        return NULL;
    }
    return c;
}

int comm_rank(const comm *c) { return c ? c->rank : 0; }
int comm_world(const comm *c) { return c ? c->world : 1; }
const char *comm_backend_name(const comm *c) { return c ? c->be->name : "single"; }
const char *comm_error(const comm *c) { return c ? c->err : ""; }

int comm_allreduce_host(comm *c, double *buf, int64_t n, int group, const char *what, char *err,
                        size_t errlen)
{
    if (!c || c->world == 1)
        return 0;
    if (c->be->allreduce_f64_host(c->impl, buf, n, group, what, err, errlen)) {
        if (!c->err[0])
            snprintf(c->err, sizeof c->err, "%s", err);
        return -1;
    }
    return 0;
}

void comm_abort(comm *c, int code)
{
    if (c && c->world > 1 && !c->aborted) {
        c->aborted = 1;
        c->be->abort(c->impl, code);
    }
}

void comm_close(comm *c)
{
    if (!c)
        return;
    if (!c->aborted)
        c->be->fini(c->impl);
    if (c->dl)
        dlclose(c->dl);
    free(c->ep_send);
    free(c->ep_recv);
    free(c->zstage);
    free(c);
}

/* ---- the collective kernels ---------------------------------------------- */
/* The communicator of a collective op, with the backend told the compute
 * stream the op's buffers belong to (nccl orders its own stream after that
 * stream's work and that stream after the collective; until told, it orders
 * nothing).  Every moec_comm_* op starts here. */
static comm *cx_enter(const moek_ctx *ctx)
{
    comm *c = ctx->comm;
    if (c && c->bind)
        c->bind(c->impl, ctx->stream);
    return c;
}

static void collective_failed(const moek_ctx *ctx, comm *c, const char *e)
{
    if (c && !c->err[0])
        snprintf(c->err, sizeof c->err, "%s", e);
    if (*ctx->status == 0)
        *ctx->status = MOEK_E_DEVICE;
}

/* A bucket's tensors in address order, cut into runs that each tile one
 * address range: the next tensor starts at the first PLAN_ALIGN boundary
 * after the one before, so the bytes between are alignment padding that no
 * tensor owns and that stays zero (pools are zeroed at allocation and no
 * kernel writes past its tensor).  A run is reduced in place as one buffer:
 * no packing into a staging copy and back.  The multi-tensor pass's flat
 * gradient buffers (compiler/pass_multi_tensor.c), and grads laid out back
 * to back, make long runs the common case.  Offsets are the plan's, so every
 * rank cuts the same runs.  Returns the number of runs. */
static int tiled_runs(float *const *bufs, const int64_t *ns, int count, float **start,
                      int64_t *span)
{
    int ord[COMM_MULTI_MAX], runs = 0;
    for (int i = 0; i < count; i++) {
        int j = i;
        for (; j > 0 && (uintptr_t)bufs[ord[j - 1]] > (uintptr_t)bufs[i]; j--)
            ord[j] = ord[j - 1];
        ord[j] = i;
    }
    for (int k = 0; k < count; k++) {
        float *b = bufs[ord[k]];
        uintptr_t end = runs ? (uintptr_t)(start[runs - 1] + span[runs - 1]) : 0;
        if (runs && (uintptr_t)b == (end + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN &&
            (uintptr_t)b % PLAN_ALIGN == 0) {
            span[runs - 1] = b + ns[ord[k]] - start[runs - 1];
        } else {
            start[runs] = b;
            span[runs++] = ns[ord[k]];
        }
    }
    return runs;
}

void moec_comm_allreduce_f32_multi(const moek_ctx *ctx, int64_t group, int64_t bucket,
                                   int64_t count, float *t0, int64_t n0, float *t1, int64_t n1,
                                   float *t2, int64_t n2, float *t3, int64_t n3, float *t4,
                                   int64_t n4, float *t5, int64_t n5, float *t6, int64_t n6,
                                   float *t7, int64_t n7)
{
    comm *c = cx_enter(ctx);
    if (!c || c->world == 1 || *ctx->status)
        return;
    if (count < 1 || count > COMM_MULTI_MAX) {
        *ctx->status = *ctx->status ? *ctx->status : MOEK_E_SHAPE;
        return;
    }
    float *const bufs[COMM_MULTI_MAX] = {t0, t1, t2, t3, t4, t5, t6, t7};
    const int64_t ns[COMM_MULTI_MAX] = {n0, n1, n2, n3, n4, n5, n6, n7};
    char what[96], e[1024];
    if (bucket < 0)   /* not gradients: the expert load of a router bias update */
        snprintf(what, sizeof what, "all-reduce of an expert load (router bias update)");
    else
        snprintf(what, sizeof what, "all-reduce of gradient bucket %" PRId64, bucket);
    float *start[COMM_MULTI_MAX];
    int64_t span[COMM_MULTI_MAX];
    int runs = tiled_runs(bufs, ns, (int)count, start, span), rc = 0;
    if (runs < count)   /* in place, one collective per run */
        for (int r = 0; r < runs && rc == 0; r++)
            rc = c->be->allreduce_f32(c->impl, &start[r], &span[r], 1, (int)group, what, e,
                                      sizeof e);
    else                /* nothing tiles: one collective, the backend packs */
        rc = c->be->allreduce_f32(c->impl, bufs, ns, (int)count, (int)group, what, e, sizeof e);
    if (rc)
        collective_failed(ctx, c, e);
}

void moec_comm_allreduce_f32(const moek_ctx *ctx, float *buf, int64_t n, int64_t group)
{
    comm *c = cx_enter(ctx);
    if (!c || c->world == 1 || *ctx->status)
        return;
    char e[1024];
    if (c->be->allreduce_f32(c->impl, &buf, &n, 1, (int)group, "all-reduce", e, sizeof e))
        collective_failed(ctx, c, e);
}

/* ---- ZeRO: slices over a group ------------------------------------------ */
int comm_group_index(const comm *c, int group, int64_t *size)
{
    comm_group g;
    if (!c || c->world == 1 || comm_group_of(c->rank, c->world, c->expert, group, &g)) {
        *size = 1;
        return 0;
    }
    *size = g.size;
    return (int)g.index;
}

static int zero_missing(comm *c, char *err, size_t errlen)
{
    return fail(err, errlen, "rank %d: the %s backend has no ZeRO collectives (%s); rebuild it "
                "from this source tree", c->rank, c->be->name, COMM_ZERO_SYMBOL);
}

/* ---- plan tensors: host memory, or device memory (--device cuda) -------
 * CX_HOST: the tensors are host memory (CPU kernels): memcpy, as always.
 * CX_STAGED: device memory and a backend that takes host buffers: every
 * buffer goes through host memory with the kernel library's copy service.
 * CX_DIRECT: device memory and a backend that takes device buffers
 * (COMM_CAP_DEVICE_BUFFERS: nccl): plan tensors go straight to it; only
 * padding, packing and the gradient add use device scratch or the host. */
enum { CX_HOST, CX_STAGED, CX_DIRECT };

static int cx_mode(const comm *c)
{
    return !c || !c->device ? CX_HOST : c->direct ? CX_DIRECT : CX_STAGED;
}

const char *comm_buffer_mode(const comm *c)
{
    static const char *const m[] = {"host", "staged", "direct"};
    return m[cx_mode(c)];
}

void comm_set_device(comm *c, const comm_device *d)
{
    if (c && d)
        c->dev = *d;
}

/* bytes from src to dst, kind (MOEK_COPY_*) saying where each lives when
 * the plan's tensors are on a device; on the host a plain memmove */
static int cx_copy(const moek_ctx *ctx, comm *c, void *dst, const void *src, int64_t bytes,
                   int kind, char *e, size_t el)
{
    if (bytes <= 0 || dst == src)
        return 0;
    if (cx_mode(c) == CX_HOST) {
        memmove(dst, src, (size_t)bytes);
        return 0;
    }
    if (!c->dev.copy)
        return fail(e, el, "rank %d: the plan's tensors are on the device but the communication "
                    "layer has no device copy service (comm_set_device)", c->rank);
    return c->dev.copy(ctx, dst, src, bytes, kind, e, (int64_t)el) ? -1 : 0;
}

/* device memory for the direct path's scratch (cx_dscratch) */
static void *cx_dalloc(const moek_ctx *ctx, comm *c, int64_t bytes, char *e, size_t el)
{
    if (!c->dev.alloc || !c->dev.free) {
        fail(e, el, "rank %d: the communication layer has no device allocator (comm_set_device)",
             c->rank);
        return NULL;
    }
    return c->dev.alloc(ctx, bytes > 0 ? bytes : 1, e, (int64_t)el);
}

/* Device scratch slot `slot` (an exchange sends from 0 and receives into
 * 1) of at least `bytes`.  The copies into and out of it are queued on the
 * compute stream, and cudaFree may or may not wait for queued work, so a
 * scratch buffer is never freed while a step may still read it: it grows
 * by doubling, an outgrown one is retired, and comm_release_device frees
 * them all once the device is idle.  Shapes are fixed from the first step
 * on, so nothing is allocated inside a captured CUDA graph. */
static void *cx_dscratch(const moek_ctx *ctx, comm *c, int slot, int64_t bytes, char *e, size_t el)
{
    if (bytes <= c->dscr[slot].cap)
        return c->dscr[slot].p;
    if (c->dscr[slot].p && c->nretired == CX_RETIRED_MAX) {
        fail(e, el, "rank %d: the communication scratch on the device grew %d times", c->rank,
             CX_RETIRED_MAX);
        return NULL;
    }
    int64_t cap = c->dscr[slot].cap > 0 ? c->dscr[slot].cap : (int64_t)1 << 16;
    while (cap < bytes)
        cap *= 2;
    void *p = cx_dalloc(ctx, c, cap, e, el);
    if (!p)
        return NULL;
    if (c->dscr[slot].p)
        c->retired[c->nretired++] = c->dscr[slot].p;
    c->dscr[slot].p = p;
    c->dscr[slot].cap = cap;
    return p;
}

/* bytes of plan tensor memory set to zero: on the device, a copy from
 * zeroed device memory (stream-ordered, so a CUDA graph can hold it) */
static int cx_zero(const moek_ctx *ctx, comm *c, void *dst, int64_t bytes, char *e, size_t el)
{
    if (bytes <= 0)
        return 0;
    if (cx_mode(c) == CX_HOST) {
        memset(dst, 0, (size_t)bytes);
        return 0;
    }
    if (cx_mode(c) == CX_DIRECT) {
        const void *zeros = cx_dscratch(ctx, c, 2, bytes, e, el);
        return zeros ? cx_copy(ctx, c, dst, zeros, bytes, MOEK_COPY_D2D, e, el) : -1;
    }
    void *z = calloc(1, (size_t)bytes);
    if (!z)
        return fail(e, el, "rank %d: out of memory zeroing %" PRId64 " bytes", c->rank, bytes);
    int rc = cx_copy(ctx, c, dst, z, bytes, MOEK_COPY_H2D, e, el);
    free(z);
    return rc;
}

void comm_release_device(comm *c, const moek_ctx *ctx)
{
    if (!c || !c->dev.free)
        return;
    for (int i = 0; i < 3; i++)
        if (c->dscr[i].p)
            c->dev.free(ctx, c->dscr[i].p);
    for (int i = 0; i < c->nretired; i++)
        c->dev.free(ctx, c->retired[i]);
    memset(c->dscr, 0, sizeof c->dscr);
    c->nretired = 0;
}

/* a copy between two buffers of the same side: device (D2D) or host */
static int cx_move(const moek_ctx *ctx, comm *c, int dev, void *dst, const void *src,
                   int64_t bytes, char *e, size_t el)
{
    if (dev)
        return cx_copy(ctx, c, dst, src, bytes, MOEK_COPY_D2D, e, el);
    if (bytes > 0)
        memcpy(dst, src, (size_t)bytes);
    return 0;
}

void moec_comm_zero_slice(const moek_ctx *ctx, int64_t group, const void *full, int64_t n,
                          void *slice, int64_t s, int64_t esize)
{
    comm *c = cx_enter(ctx);
    if (*ctx->status)
        return;
    int64_t size, i = comm_group_index(c, (int)group, &size);
    int64_t lo = i * s, k = n - lo < s ? (n - lo > 0 ? n - lo : 0) : s;
    char e[1024];
    if (cx_copy(ctx, c, slice, (const char *)full + lo * esize, k * esize, MOEK_COPY_D2D, e,
                sizeof e) ||
        cx_zero(ctx, c, (char *)slice + k * esize, (s - k) * esize, e, sizeof e))
        collective_failed(ctx, c, e);
}

void moec_comm_zero_allgather(const moek_ctx *ctx, int64_t group, const void *slice, int64_t s,
                              void *full, int64_t n, int64_t esize)
{
    comm *c = cx_enter(ctx);
    if (*ctx->status)
        return;
    int64_t size;
    comm_group_index(c, (int)group, &size);
    char e[1024];
    const char *what = "ZeRO all-gather of parameters";
    int mode = cx_mode(c), rc = 0;
    if (size == 1) {
        if (cx_copy(ctx, c, full, slice, (n < s ? n : s) * esize, MOEK_COPY_D2D, e, sizeof e))
            collective_failed(ctx, c, e);
        return;
    }
    if (!c->zero) {
        zero_missing(c, e, sizeof e);
        collective_failed(ctx, c, e);
        return;
    }
    /* the slices fill size*s elements; the tensor keeps its first n */
    int64_t all = size * s * esize;
    if (mode == CX_DIRECT) {
        void *st = n == size * s ? full : cx_dscratch(ctx, c, 0, all, e, sizeof e);
        rc = !st ||
             c->zero->allgather(c->impl, slice, st, s * esize, (int)group, what, e, sizeof e) ||
             cx_copy(ctx, c, full, st, n * esize, MOEK_COPY_D2D, e, sizeof e) ? -1 : 0;
        if (rc)
            collective_failed(ctx, c, e);
        return;
    }
    /* host: every rank's slices (and, staged, this rank's copied out) */
    char *stage = stage_grow(&c->zstage, &c->zstage_cap, all + (mode == CX_STAGED ? s * esize : 0))
                      ? NULL : (char *)c->zstage;
    if (!stage) {
        snprintf(e, sizeof e, "rank %d: out of memory for a ZeRO all-gather of %" PRId64
                 " bytes", c->rank, all);
        collective_failed(ctx, c, e);
        return;
    }
    const void *mine = slice;
    if (mode == CX_STAGED) {
        mine = stage + all;
        rc = cx_copy(ctx, c, stage + all, slice, s * esize, MOEK_COPY_D2H, e, sizeof e);
    }
    rc = rc || c->zero->allgather(c->impl, mine, stage, s * esize, (int)group, what, e, sizeof e) ||
         cx_copy(ctx, c, full, stage, n * esize, MOEK_COPY_H2D, e, sizeof e) ? -1 : 0;
    if (rc)
        collective_failed(ctx, c, e);
}

/* A half-precision value widened exactly to fp32. */
static float widen_half(uint16_t h, int64_t dtype)
{
    return dtype == PLAN_BF16 ? moek_bf16_to_f32(h) : moek_f16_to_f32(h);
}

/* slice (+)= this rank's slice of the group's fp32 sum of full[0, n) (of
 * dtype: a half gradient is widened on the sender, so the sum is fp32). */
static void zero_reduce_scatter(const moek_ctx *ctx, int64_t group, const void *full, int64_t n,
                                float *slice, int64_t s, int64_t accumulate, int64_t dtype)
{
    comm *c = cx_enter(ctx);
    int64_t size, i = comm_group_index(c, (int)group, &size);
    int mode = cx_mode(c), rc = 0, half = dtype != PLAN_F32;
    /* direct, fp32, no padding: full itself is the group's vector */
    int in_place = mode == CX_DIRECT && !half && n == size * s && size > 1;
    char e[1024];
    const char *what = "ZeRO reduce-scatter of gradients";
    /* host: the padded fp32 vector, this rank's sum, the slice's copy, the half input */
    size_t bytes = (size_t)((size * s + 2 * s) * (int64_t)sizeof(float)) +
                   (half && mode != CX_HOST ? (size_t)n * 2 : 0);
    float *owned = NULL;   /* no comm (a plan run by a tool): a one-off buffer */
    float *stage = c ? (stage_grow(&c->zstage, &c->zstage_cap, (int64_t)bytes + 1) ? NULL
                                : (float *)(void *)c->zstage)
                     : (owned = malloc(bytes + 1));
    if (!stage) {
        snprintf(e, sizeof e, "rank %d: out of memory for a ZeRO reduce-scatter of %" PRId64
                 " floats", c ? c->rank : 0, size * s);
        collective_failed(ctx, c, e);
        return;
    }
    float *mine = stage + size * s, *hs = mine + s;
    if (!in_place) {
        if (!half) {
            rc = cx_copy(ctx, c, stage, full, n * (int64_t)sizeof(float), MOEK_COPY_D2H, e,
                         sizeof e);
        } else {
            const uint16_t *h = full;
            if (mode != CX_HOST) {
                h = (const uint16_t *)(hs + s);
                rc = cx_copy(ctx, c, hs + s, full, n * 2, MOEK_COPY_D2H, e, sizeof e);
            }
            for (int64_t k = 0; !rc && k < n; k++)
                stage[k] = widen_half(h[k], dtype);
        }
        memset(stage + n, 0, (size_t)(size * s - n) * sizeof(float));
    }
    if (rc) {
        /* e says why */
    } else if (size == 1) {
        memcpy(mine, stage + i * s, (size_t)s * sizeof(float));
    } else if (!c->zero) {
        rc = zero_missing(c, e, sizeof e);
    } else if (mode == CX_DIRECT) {
        float *dv = cx_dscratch(ctx, c, 0, (in_place ? s : size * s + s) * (int64_t)sizeof(float), e,
                                sizeof e);
        const float *din = in_place ? full : dv;
        float *dmine = in_place ? dv : dv + size * s;
        rc = !dv || (!in_place && cx_copy(ctx, c, dv, stage, size * s * (int64_t)sizeof(float),
                                          MOEK_COPY_H2D, e, sizeof e)) ||
             c->zero->reduce_scatter_f32(c->impl, din, dmine, s, (int)group, what, e, sizeof e) ||
             cx_copy(ctx, c, mine, dmine, s * (int64_t)sizeof(float), MOEK_COPY_D2H, e, sizeof e)
             ? -1 : 0;
    } else {
        rc = c->zero->reduce_scatter_f32(c->impl, stage, mine, s, (int)group, what, e, sizeof e)
             ? -1 : 0;
    }
    /* the add, in fp32 on the host (a device slice is copied out and back) */
    float *sl = mode == CX_HOST ? slice : hs;
    if (!rc && mode != CX_HOST && accumulate)
        rc = cx_copy(ctx, c, hs, slice, s * (int64_t)sizeof(float), MOEK_COPY_D2H, e, sizeof e);
    if (!rc) {
        for (int64_t k = 0; k < s; k++)
            sl[k] = accumulate ? sl[k] + mine[k] : mine[k];
        if (mode != CX_HOST)
            rc = cx_copy(ctx, c, slice, hs, s * (int64_t)sizeof(float), MOEK_COPY_H2D, e, sizeof e);
    }
    if (rc)
        collective_failed(ctx, c, e);
    free(owned);
}

void moec_comm_zero_reduce_scatter(const moek_ctx *ctx, int64_t group, const float *full,
                                   int64_t n, float *slice, int64_t s, int64_t accumulate)
{
    if (!*ctx->status)
        zero_reduce_scatter(ctx, group, full, n, slice, s, accumulate, PLAN_F32);
}

void moec_comm_zero_reduce_scatter_half(const moek_ctx *ctx, int64_t group, const void *full,
                                        int64_t n, float *slice, int64_t s, int64_t accumulate,
                                        int64_t dtype)
{
    if (*ctx->status)
        return;
    if (dtype != PLAN_BF16 && dtype != PLAN_F16) {
        *ctx->status = MOEK_E_SHAPE;
        return;
    }
    zero_reduce_scatter(ctx, group, full, n, slice, s, accumulate, dtype);
}

/* The collective kernels by name; `host` says why one waits on the host
 * mid-step (so it cannot sit inside a CUDA graph), NULL when it runs on
 * the streams alone. */
typedef struct comm_sym {
    const char *name;
    void (*fn)(void);
    const char *host;
} comm_sym;

static const comm_sym *comm_sym_find(const char *name)
{
    static const char ep_why[] = "the expert all-to-all reads the token counts on the host to size "
                                 "its exchange";
    static const char rs_why[] = "ZeRO's reduce-scatter adds the gradient slices on the host";
    static const comm_sym syms[] = {
        {"moec_comm_allreduce_f32_multi", (void (*)(void))moec_comm_allreduce_f32_multi, NULL},
        {"moec_comm_allreduce_f32", (void (*)(void))moec_comm_allreduce_f32, NULL},
        {"moec_comm_zero_slice", (void (*)(void))moec_comm_zero_slice, NULL},
        {"moec_comm_zero_allgather", (void (*)(void))moec_comm_zero_allgather, NULL},
        {"moec_comm_zero_reduce_scatter", (void (*)(void))moec_comm_zero_reduce_scatter, rs_why},
        {"moec_comm_zero_reduce_scatter_half", (void (*)(void))moec_comm_zero_reduce_scatter_half,
         rs_why},
        {"moec_comm_ep_counts", (void (*)(void))moec_comm_ep_counts, ep_why},
        {"moec_comm_ep_exchange", (void (*)(void))moec_comm_ep_exchange, ep_why},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        if (strcmp(syms[i].name, name) == 0)
            return &syms[i];
    return NULL;
}

void *comm_symbol(const char *name)
{
    const comm_sym *s = comm_sym_find(name);
    void *p = NULL;
    if (s)
        memcpy(&p, &s->fn, sizeof p);
    return p;
}

const char *comm_symbol_host_wait(const char *name)
{
    const comm_sym *s = comm_sym_find(name);
    return s ? s->host : NULL;
}

/* ---- expert parallelism: count exchange and row exchange ---------------- */
int64_t comm_group_size(const comm *c, int group)
{
    comm_group g;
    if (!c || c->world == 1 || comm_group_of(c->rank, c->world, c->expert, group, &g))
        return 1;
    return g.size;
}


int comm_allgather_host(comm *c, const void *mine, void *all, int64_t bytes, int group,
                        const char *what, char *err, size_t errlen)
{
    int64_t P = comm_group_size(c, group);
    if (P == 1) {
        memcpy(all, mine, (size_t)bytes);
        return 0;
    }
    if (!c->ep)
        return fail(err, errlen, "the %s backend has no all-to-all (expert parallelism)",
                    c->be->name);
    /* an all-gather is an all-to-all whose blocks are all the same */
    if (stage_grow(&c->ep_send, &c->ep_send_cap, P * bytes))
        return fail(err, errlen, "out of memory gathering %s", what);
    for (int64_t k = 0; k < P; k++)
        memcpy(c->ep_send + k * bytes, mine, (size_t)bytes);
    if (c->ep->alltoall(c->impl, c->ep_send, all, bytes, group, what, err, errlen)) {
        if (!c->err[0])
            snprintf(c->err, sizeof c->err, "%s", err);
        return -1;
    }
    return 0;
}

/* Checks the plan's P against the group the backend made; 0 when usable. */
static int ep_check(const moek_ctx *ctx, comm *c, int64_t group, int64_t P, const char *what)
{
    char e[256];
    int64_t have = comm_group_size(c, (int)group);
    if (have != P) {
        snprintf(e, sizeof e, "rank %d: %s: the plan's expert-parallel size is %" PRId64 " but "
                 "the %s group has %" PRId64 " ranks; recompile for this layout", comm_rank(c),
                 what, P, comm_group_name((int)group), have);
        collective_failed(ctx, c, e);
        return -1;
    }
    if (P > 1 && !c->ep) {
        snprintf(e, sizeof e, "rank %d: %s: the %s backend has no all-to-all; use --comm mpi",
                 comm_rank(c), what, c->be->name);
        collective_failed(ctx, c, e);
        return -1;
    }
    return 0;
}

void moec_comm_ep_counts(const moek_ctx *ctx, int64_t group, const int32_t *expert_rows,
                         int32_t *counts, int32_t *local_rows, int64_t E, int64_t P)
{
    comm *c = cx_enter(ctx);
    if (*ctx->status)
        return;
    if (P < 1 || E % P) {
        *ctx->status = MOEK_E_SHAPE;
        return;
    }
    int64_t El = E / P;
    int mode = cx_mode(c), rc = 0;
    char e[1024];
    const char *what = "all-to-all of expert token counts";
    /* host images of the three index tensors (on the host: the tensors) */
    int32_t *img = NULL, *cnt = counts, *lr = local_rows;
    const int32_t *er = expert_rows;
    if (mode != CX_HOST) {
        img = malloc((size_t)(6 * E + 2 * El + 1) * sizeof *img);
        if (!img) {
            snprintf(e, sizeof e, "rank %d: out of memory for the expert counts", c->rank);
            collective_failed(ctx, c, e);
            return;
        }
        cnt = img;
        lr = img + 2 * E;
        er = lr + 2 * El;
        rc = cx_copy(ctx, c, (void *)er, expert_rows, 2 * E * (int64_t)sizeof *er, MOEK_COPY_D2H,
                     e, sizeof e);
    }
    for (int64_t x = 0; !rc && x < E; x++)
        cnt[x] = er[2 * x + 1];
    if (rc) {
        /* e says why */
    } else if (P == 1) {
        memcpy(cnt + E, cnt, (size_t)E * sizeof *cnt);
    } else if (!c || ep_check(ctx, c, group, P, what)) {
        free(img);
        return;   /* ep_check reported it */
    } else if (mode == CX_DIRECT) {
        /* the send counts into the device tensor, exchanged there, read back */
        int64_t b = E * (int64_t)sizeof *cnt;
        rc = cx_copy(ctx, c, counts, cnt, b, MOEK_COPY_H2D, e, sizeof e) ||
             c->ep->alltoall(c->impl, counts, counts + E, El * (int64_t)sizeof *counts,
                             (int)group, what, e, sizeof e) ||
             cx_copy(ctx, c, cnt + E, counts + E, b, MOEK_COPY_D2H, e, sizeof e) ? -1 : 0;
    } else {
        rc = c->ep->alltoall(c->impl, cnt, cnt + E, El * (int64_t)sizeof *cnt, (int)group, what, e,
                             sizeof e) ? -1 : 0;
    }
    if (!rc) {
        const int32_t *recv = cnt + E;
        int64_t at = 0;
        for (int64_t j = 0; j < El; j++) {
            int64_t n = 0;
            for (int64_t s = 0; s < P; s++)
                n += recv[s * El + j];
            lr[2 * j] = (int32_t)at;
            lr[2 * j + 1] = (int32_t)n;
            at += n;
        }
        if (mode != CX_HOST)
            rc = cx_copy(ctx, c, counts, cnt, 2 * E * (int64_t)sizeof *cnt, MOEK_COPY_H2D, e,
                         sizeof e) ||
                 cx_copy(ctx, c, local_rows, lr, 2 * El * (int64_t)sizeof *lr, MOEK_COPY_H2D, e,
                         sizeof e) ? -1 : 0;
    }
    if (rc)
        collective_failed(ctx, c, e);
    free(img);
}

void moec_comm_ep_exchange(const moek_ctx *ctx, int64_t group, int64_t dir, const void *src,
                           void *dst, const int32_t *expert_rows, const int32_t *counts,
                           const int32_t *local_rows, int64_t R, int64_t Rr, int64_t D, int64_t E,
                           int64_t P, int64_t esize)
{
    comm *c = cx_enter(ctx);
    if (*ctx->status)
        return;
    if (P < 1 || E % P || P > 4096 || (dir != 0 && dir != 1) || (esize != 2 && esize != 4)) {
        *ctx->status = MOEK_E_SHAPE;
        return;
    }
    if (!c) {
        *ctx->status = MOEK_E_DEVICE;
        return;
    }
    const char *what = dir == 0 ? "all-to-all of tokens to their experts"
                                : "all-to-all of expert outputs back to their tokens";
    if (P > 1 && ep_check(ctx, c, group, P, what))
        return;
    int64_t El = E / P, rowb = D * esize;
    int mode = cx_mode(c), dev = mode == CX_DIRECT, rc = 0;
    char e[1024];
    /* host images of the index tensors (on the host: the tensors) */
    int32_t *ix = NULL;
    if (mode != CX_HOST) {
        ix = malloc((size_t)(4 * E + 2 * El + 1) * sizeof *ix);
        if (!ix || cx_copy(ctx, c, ix, expert_rows, 2 * E * 4, MOEK_COPY_D2H, e, sizeof e) ||
            cx_copy(ctx, c, ix + 2 * E, counts, 2 * E * 4, MOEK_COPY_D2H, e, sizeof e) ||
            cx_copy(ctx, c, ix + 4 * E, local_rows, 2 * El * 4, MOEK_COPY_D2H, e, sizeof e)) {
            if (!ix)
                snprintf(e, sizeof e, "rank %d: out of memory for an expert exchange", c->rank);
            collective_failed(ctx, c, e);
            free(ix);
            return;
        }
        expert_rows = ix;
        counts = ix + 2 * E;
        local_rows = ix + 4 * E;
    }
    const int32_t *sent = counts, *recv = counts + E;
    /* layout A: this rank's tokens by global expert (expert_rows); layout
     * B: rows received for the local experts, expert-major then source */
    int64_t totA = 0, totB = 0;
    for (int64_t x = 0; x < E; x++) {
        if (expert_rows[2 * x] < 0 || expert_rows[2 * x + 1] < 0 ||
            expert_rows[2 * x] + (int64_t)expert_rows[2 * x + 1] > R ||
            sent[x] != expert_rows[2 * x + 1] || recv[x] < 0) {
            *ctx->status = MOEK_E_INDEX;
            free(ix);
            return;
        }
        totA += sent[x];
        totB += recv[x];
    }
    if (totB > Rr) {
        *ctx->status = MOEK_E_INDEX;
        free(ix);
        return;
    }
    int64_t sbytes[4096], rbytes[4096];
    int64_t nsend = dir == 0 ? totA : totB, nrecv = dir == 0 ? totB : totA;
    int64_t srows = dir == 0 ? R : Rr, drows = dir == 0 ? Rr : R;
    /* rows are packed and unpacked in host buffers (staged: images of src
     * and dst copied through the host) or, direct, in device scratch */
    const unsigned char *s8 = src;
    unsigned char *d8 = dst, *img = NULL, *sendb, *recvb;
    if (dev) {
        sendb = cx_dscratch(ctx, c, 0, nsend * rowb + 1, e, sizeof e);
        recvb = sendb ? cx_dscratch(ctx, c, 1, nrecv * rowb + 1, e, sizeof e) : NULL;
        rc = !sendb || !recvb ? -1 : 0;
    } else {
        if (stage_grow(&c->ep_send, &c->ep_send_cap, nsend * rowb + 1) ||
            stage_grow(&c->ep_recv, &c->ep_recv_cap, nrecv * rowb + 1)) {
            *ctx->status = MOEK_E_DEVICE;
            free(ix);
            return;
        }
        sendb = c->ep_send;
        recvb = c->ep_recv;
        if (mode == CX_STAGED) {
            img = malloc((size_t)((srows + drows) * rowb + 1));
            rc = !img ? fail(e, sizeof e, "rank %d: out of memory for an expert exchange", c->rank)
                      : cx_copy(ctx, c, img, src, srows * rowb, MOEK_COPY_D2H, e, sizeof e);
            s8 = img;
            d8 = img + srows * rowb;
        }
    }
    /* pack by destination rank */
    int64_t at = 0;
    for (int64_t d = 0; !rc && d < P; d++) {
        int64_t start = at;
        for (int64_t j = 0; !rc && j < El; j++) {
            int64_t x = d * El + j, first, n;
            if (dir == 0) {
                first = expert_rows[2 * x];
                n = sent[x];
            } else {   /* rows of local expert j that came from rank d */
                first = local_rows[2 * j];
                for (int64_t s = 0; s < d; s++)
                    first += recv[s * El + j];
                n = recv[d * El + j];
            }
            rc = cx_move(ctx, c, dev, sendb + at * rowb, s8 + first * rowb, n * rowb, e, sizeof e);
            at += n;
        }
        sbytes[d] = (at - start) * rowb;
        int64_t in = 0;
        for (int64_t j = 0; j < El; j++)
            in += dir == 0 ? recv[d * El + j] : sent[d * El + j];
        rbytes[d] = in * rowb;
    }
    if (rc) {
        /* e says why */
    } else if (P == 1) {
        rc = cx_move(ctx, c, dev, recvb, sendb, nsend * rowb, e, sizeof e);
    } else {
        rc = c->ep->alltoallv(c->impl, sendb, sbytes, recvb, rbytes, (int)group, what, e, sizeof e)
             ? -1 : 0;
    }
    /* unpack from each source rank into dst's layout; uncovered rows zero */
    if (!rc) {
        if (dev)
            rc = cx_zero(ctx, c, d8, drows * rowb, e, sizeof e);
        else
            memset(d8, 0, (size_t)(drows * rowb));
    }
    at = 0;
    for (int64_t s = 0; !rc && s < P; s++)
        for (int64_t j = 0; !rc && j < El; j++) {
            int64_t x = s * El + j, first, n;
            if (dir == 0) {
                first = local_rows[2 * j];
                for (int64_t q = 0; q < s; q++)
                    first += recv[q * El + j];
                n = recv[s * El + j];
            } else {
                first = expert_rows[2 * x];
                n = sent[x];
            }
            rc = cx_move(ctx, c, dev, d8 + first * rowb, recvb + at * rowb, n * rowb, e, sizeof e);
            at += n;
        }
    if (!rc && mode == CX_STAGED)
        rc = cx_copy(ctx, c, dst, d8, drows * rowb, MOEK_COPY_H2D, e, sizeof e);
    if (rc)
        collective_failed(ctx, c, e);
    free(img);
    free(ix);
}
