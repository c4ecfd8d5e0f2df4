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
    char err[1024];           /* first collective failure */
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
    free(c);
}

/* ---- the collective kernels ---------------------------------------------- */
static void collective_failed(const moek_ctx *ctx, comm *c, const char *e)
{
    if (!c->err[0])
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
    float *const bufs[COMM_MULTI_MAX] = {t0, t1, t2, t3, t4, t5, t6, t7};
    const int64_t ns[COMM_MULTI_MAX] = {n0, n1, n2, n3, n4, n5, n6, n7};
    char what[96], e[1024];
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
    if (c->be->allreduce_f32(c->impl, &buf, &n, 1, (int)group, "all-reduce", e, sizeof e))
        collective_failed(ctx, c, e);
}

void *comm_symbol(const char *name)
{
    static const struct { const char *name; void (*fn)(void); } syms[] = {
        {"moec_comm_allreduce_f32_multi", (void (*)(void))moec_comm_allreduce_f32_multi},
        {"moec_comm_allreduce_f32", (void (*)(void))moec_comm_allreduce_f32},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++)
        if (strcmp(syms[i].name, name) == 0) {
            void *p;
            memcpy(&p, &syms[i].fn, sizeof p);
            return p;
        }
    return NULL;
}
