/* comm.c - the communication interface: backend loading, the built-in
 * single-rank backend and the "@comm" collective kernels (see comm.h). */
#include "comm.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct comm {
    const comm_backend *be;
    void *impl;
    void *dl;                 /* dlopen handle of the backend library, NULL for single */
    int rank, world;
    int aborted;
    const comm_zero_backend *zero;   /* ZeRO collectives, NULL if the backend lacks them */
    comm_bind_stream_fn bind;        /* nccl: follows ctx->stream; NULL for the others */
    char err[1024];           /* first collective failure */
    /* expert parallelism (comm_ep.c part below) */
    const comm_ep_backend *ep;   /* NULL: the backend has no all-to-all */
    int64_t expert;              /* expert-parallel size the groups were made with */
    unsigned char *ep_send, *ep_recv;   /* staging, grown on first use */
    int64_t ep_send_cap, ep_recv_cap;
};

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
    free(c);
}

/* ---- the collective kernels ---------------------------------------------- */
static void collective_failed(const moek_ctx *ctx, comm *c, const char *e)
{
    if (c && !c->err[0])
        snprintf(c->err, sizeof c->err, "%s", e);
    if (*ctx->status == 0)
        *ctx->status = MOEK_E_DEVICE;
}

void moec_comm_allreduce_f32_multi(const moek_ctx *ctx, int64_t group, int64_t bucket,
                                   int64_t count, float *t0, int64_t n0, float *t1, int64_t n1,
                                   float *t2, int64_t n2, float *t3, int64_t n3, float *t4,
                                   int64_t n4, float *t5, int64_t n5, float *t6, int64_t n6,
                                   float *t7, int64_t n7)
{
    comm *c = ctx->comm;
    if (!c || c->world == 1 || *ctx->status)
        return;
    if (count < 1 || count > COMM_MULTI_MAX) {
        *ctx->status = *ctx->status ? *ctx->status : MOEK_E_SHAPE;
        return;
    }
    if (c->bind)
        c->bind(c->impl, ctx->stream);
    float *const bufs[COMM_MULTI_MAX] = {t0, t1, t2, t3, t4, t5, t6, t7};
    const int64_t ns[COMM_MULTI_MAX] = {n0, n1, n2, n3, n4, n5, n6, n7};
    char what[96], e[1024];
    if (bucket < 0)   /* not gradients: the expert load of a router bias update */
        snprintf(what, sizeof what, "all-reduce of an expert load (router bias update)");
    else
        snprintf(what, sizeof what, "all-reduce of gradient bucket %" PRId64, bucket);
    if (c->be->allreduce_f32(c->impl, bufs, ns, (int)count, (int)group, what, e, sizeof e))
        collective_failed(ctx, c, e);
}

void moec_comm_allreduce_f32(const moek_ctx *ctx, float *buf, int64_t n, int64_t group)
{
    comm *c = ctx->comm;
    if (!c || c->world == 1 || *ctx->status)
        return;
    char e[1024];
    if (c->bind)
        c->bind(c->impl, ctx->stream);
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

void moec_comm_zero_slice(const moek_ctx *ctx, int64_t group, const void *full, int64_t n,
                          void *slice, int64_t s, int64_t esize)
{
    if (*ctx->status)
        return;
    int64_t size, i = comm_group_index(ctx->comm, (int)group, &size);
    int64_t lo = i * s, k = n - lo < s ? (n - lo > 0 ? n - lo : 0) : s;
    if (k)
        memcpy(slice, (const char *)full + lo * esize, (size_t)(k * esize));
    memset((char *)slice + k * esize, 0, (size_t)((s - k) * esize));
}

void moec_comm_zero_allgather(const moek_ctx *ctx, int64_t group, const void *slice, int64_t s,
                              void *full, int64_t n, int64_t esize)
{
    comm *c = ctx->comm;
    if (*ctx->status)
        return;
    int64_t size;
    comm_group_index(c, (int)group, &size);
    if (size == 1) {
        memmove(full, slice, (size_t)((n < s ? n : s) * esize));
        return;
    }
    /* the slices fill size*s elements; the tensor keeps its first n */
    char *stage = malloc((size_t)(size * s * esize));
    char e[1024];
    if (!stage) {
        snprintf(e, sizeof e, "rank %d: out of memory for a ZeRO all-gather of %" PRId64
                 " bytes", c->rank, size * s * esize);
        collective_failed(ctx, c, e);
        return;
    }
    if (!c->zero)
        zero_missing(c, e, sizeof e), collective_failed(ctx, c, e);
    else if (c->zero->allgather(c->impl, slice, stage, s * esize, (int)group,
                                "ZeRO all-gather of parameters", e, sizeof e))
        collective_failed(ctx, c, e);
    else
        memcpy(full, stage, (size_t)(n * esize));
    free(stage);
}

void moec_comm_zero_reduce_scatter(const moek_ctx *ctx, int64_t group, const float *full,
                                   int64_t n, float *slice, int64_t s, int64_t accumulate)
{
    comm *c = ctx->comm;
    if (*ctx->status)
        return;
    int64_t size, i = comm_group_index(c, (int)group, &size);
    float *stage = malloc((size_t)((size * s + s) * (int64_t)sizeof(float)));
    char e[1024];
    if (!stage) {
        snprintf(e, sizeof e, "rank %d: out of memory for a ZeRO reduce-scatter of %" PRId64
                 " floats", c ? c->rank : 0, size * s);
        collective_failed(ctx, c, e);
        return;
    }
    float *mine = stage + size * s;   /* padded copy of full, then this rank's sum */
    memcpy(stage, full, (size_t)n * sizeof(float));
    memset(stage + n, 0, (size_t)(size * s - n) * sizeof(float));
    if (size == 1)
        memcpy(mine, stage + i * s, (size_t)s * sizeof(float));
    else if (!c->zero)
        zero_missing(c, e, sizeof e), collective_failed(ctx, c, e);
    else if (c->zero->reduce_scatter_f32(c->impl, stage, mine, s, (int)group,
                                         "ZeRO reduce-scatter of gradients", e, sizeof e))
        collective_failed(ctx, c, e);
    if (!*ctx->status)
        for (int64_t k = 0; k < s; k++)
            slice[k] = accumulate ? slice[k] + mine[k] : mine[k];
    free(stage);
}

void *comm_symbol(const char *name)
{
    static const struct { const char *name; void (*fn)(void); } syms[] = {
        {"moec_comm_allreduce_f32_multi", (void (*)(void))moec_comm_allreduce_f32_multi},
        {"moec_comm_allreduce_f32", (void (*)(void))moec_comm_allreduce_f32},
        {"moec_comm_zero_slice", (void (*)(void))moec_comm_zero_slice},
        {"moec_comm_zero_allgather", (void (*)(void))moec_comm_zero_allgather},
        {"moec_comm_zero_reduce_scatter", (void (*)(void))moec_comm_zero_reduce_scatter},
        {"moec_comm_ep_counts", (void (*)(void))moec_comm_ep_counts},
        {"moec_comm_ep_exchange", (void (*)(void))moec_comm_ep_exchange},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        if (strcmp(syms[i].name, name) == 0) {
            void *p;
            memcpy(&p, &syms[i].fn, sizeof p);
            return p;
        }
    return NULL;
}

/* ---- expert parallelism: count exchange and row exchange ---------------- */
int64_t comm_group_size(const comm *c, int group)
{
    comm_group g;
    if (!c || c->world == 1 || comm_group_of(c->rank, c->world, c->expert, group, &g))
        return 1;
    return g.size;
}

static int ep_grow(unsigned char **p, int64_t *cap, int64_t want)
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
    if (ep_grow(&c->ep_send, &c->ep_send_cap, P * bytes))
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
    comm *c = ctx->comm;
    if (*ctx->status)
        return;
    if (P < 1 || E % P) {
        *ctx->status = MOEK_E_SHAPE;
        return;
    }
    int64_t El = E / P;
    for (int64_t e = 0; e < E; e++)
        counts[e] = expert_rows[2 * e + 1];
    if (P == 1) {
        memcpy(counts + E, counts, (size_t)E * sizeof *counts);
    } else {
        char e[1024];
        if (!c || ep_check(ctx, c, group, P, "all-to-all of expert token counts"))
            return;
        if (c->ep->alltoall(c->impl, counts, counts + E, El * (int64_t)sizeof *counts,
                            (int)group, "all-to-all of expert token counts", e, sizeof e)) {
            collective_failed(ctx, c, e);
            return;
        }
    }
    const int32_t *recv = counts + E;
    int64_t at = 0;
    for (int64_t j = 0; j < El; j++) {
        int64_t n = 0;
        for (int64_t s = 0; s < P; s++)
            n += recv[s * El + j];
        local_rows[2 * j] = (int32_t)at;
        local_rows[2 * j + 1] = (int32_t)n;
        at += n;
    }
}

void moec_comm_ep_exchange(const moek_ctx *ctx, int64_t group, int64_t dir, const void *src,
                           void *dst, const int32_t *expert_rows, const int32_t *counts,
                           const int32_t *local_rows, int64_t R, int64_t Rr, int64_t D, int64_t E,
                           int64_t P, int64_t esize)
{
    comm *c = ctx->comm;
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
    if (P > 1 && (!c || ep_check(ctx, c, group, P, what)))
        return;
    int64_t El = E / P, rowb = D * esize;
    const int32_t *sent = counts, *recv = counts + E;
    /* layout A: this rank's tokens by global expert (expert_rows); layout
     * B: rows received for the local experts, expert-major then source */
    int64_t totA = 0, totB = 0;
    for (int64_t e = 0; e < E; e++) {
        if (expert_rows[2 * e] < 0 || expert_rows[2 * e + 1] < 0 ||
            expert_rows[2 * e] + (int64_t)expert_rows[2 * e + 1] > R || sent[e] != expert_rows[2 * e + 1]) {
            *ctx->status = MOEK_E_INDEX;
            return;
        }
        totA += sent[e];
        if (recv[e] < 0) {
            *ctx->status = MOEK_E_INDEX;
            return;
        }
        totB += recv[e];
    }
    if (totB > Rr) {
        *ctx->status = MOEK_E_INDEX;
        return;
    }
    int64_t sbytes[4096], rbytes[4096];
    const unsigned char *s8 = src;
    unsigned char *d8 = dst;
    int64_t nsend = dir == 0 ? totA : totB, nrecv = dir == 0 ? totB : totA;
    if (ep_grow(&c->ep_send, &c->ep_send_cap, nsend * rowb + 1) ||
        ep_grow(&c->ep_recv, &c->ep_recv_cap, nrecv * rowb + 1)) {
        *ctx->status = MOEK_E_DEVICE;
        return;
    }
    /* pack by destination rank */
    int64_t at = 0;
    for (int64_t d = 0; d < P; d++) {
        int64_t start = at;
        for (int64_t j = 0; j < El; j++) {
            int64_t e = d * El + j, first, n;
            if (dir == 0) {
                first = expert_rows[2 * e];
                n = sent[e];
            } else {   /* rows of local expert j that came from rank d */
                first = local_rows[2 * j];
                for (int64_t s = 0; s < d; s++)
                    first += recv[s * El + j];
                n = recv[d * El + j];
            }
            memcpy(c->ep_send + at * rowb, s8 + first * rowb, (size_t)(n * rowb));
            at += n;
        }
        sbytes[d] = (at - start) * rowb;
        int64_t in = 0;
        for (int64_t j = 0; j < El; j++)
            in += dir == 0 ? recv[d * El + j] : sent[d * El + j];
        rbytes[d] = in * rowb;
    }
    if (P == 1) {
        memcpy(c->ep_recv, c->ep_send, (size_t)(nsend * rowb));
    } else {
        char e[1024];
        if (c->ep->alltoallv(c->impl, c->ep_send, sbytes, c->ep_recv, rbytes, (int)group, what, e,
                             sizeof e)) {
            collective_failed(ctx, c, e);
            return;
        }
    }
    /* unpack from each source rank into dst's layout; uncovered rows zero */
    memset(d8, 0, (size_t)((dir == 0 ? Rr : R) * rowb));
    at = 0;
    for (int64_t s = 0; s < P; s++)
        for (int64_t j = 0; j < El; j++) {
            int64_t e = s * El + j, first, n;
            if (dir == 0) {
                first = local_rows[2 * j];
                for (int64_t q = 0; q < s; q++)
                    first += recv[q * El + j];
                n = recv[s * El + j];
            } else {
                first = expert_rows[2 * e];
                n = sent[e];
            }
            memcpy(d8 + first * rowb, c->ep_recv + at * rowb, (size_t)(n * rowb));
            at += n;
        }
}
