/* nccl.c - the NCCL communication backend, built into libmoec_comm_nccl.so
 * (linked against libnccl and libcudart, never MPI) and dlopened by run for
 * --comm nccl (docs/launching.md, docs/parallel.md "NCCL").
 *
 * Start-up: every rank learns its rank, world and local rank from mpirun or
 * srun (MPI is then dlopened only to broadcast NCCL's unique id) or, without
 * MPI, from RANK / WORLD_SIZE / LOCAL_RANK, with the id handed out by the TCP
 * rendezvous of rendezvous.h.  Before CUDA starts, CUDA_VISIBLE_DEVICES is
 * narrowed to the local rank's GPU, so the kernel library's device 0 is it.
 *
 * Streams: collectives run on a stream of their own.  Each one waits for an
 * event recorded on the compute stream (ctx->stream, handed over through
 * moec_comm_bind_stream) and the compute stream waits for its end, so the
 * order is the plan's while independent compute may overlap; the same event
 * pattern is legal inside a CUDA graph capture.
 *
 * Deadlines: each collective run eagerly is queued to a watchdog thread
 * that polls its end event and NCCL's asynchronous error.  Past
 * --comm-timeout it aborts every communicator (ncclCommAbort ends the hung
 * kernels) and keeps a message naming the collective; the next call on this
 * rank returns it.  Collectives inside a captured graph cannot be watched one
 * by one: the next eager one (the loss all-reduce of every step) is ordered
 * after the graph, so its deadline covers them.
 *
 * Buffers may live on the device (the plan's tensors) or on the host (the
 * runtime's host all-reduce and all-gathers); host ones are staged through a
 * device scratch buffer, and such a call returns only when the result is back.
 *
 * Test hook, as in mpi.c: MOEC_TEST_STALL_RANK=r makes rank r sleep before
 * its MOEC_TEST_STALL_AT-th collective (default 3).
 */
#include <cuda_runtime.h>
#include <nccl.h>

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../comm.h"
#include "rendezvous.h"

#define NC_RING 64                 /* eager collectives in flight before a call waits */

typedef struct nc_pending {
    int64_t seq;
    int group;
    double t0;
    char what[96];
} nc_pending;

/* MPI reached through dlopen: Open MPI's handles are addresses of globals,
 * MPICH's are integer constants; both fit in a pointer-sized argument. */
typedef struct nc_mpi {
    void *dl;
    int we_init;
    int (*bcast)(void *, int, void *, int, void *);
    int (*abort_fn)(void *, int);
    int (*finalize)(void);
    void *world, *byte;
} nc_mpi;

typedef struct nc_impl {
    int rank, world, local_rank;
    double timeout_s;
    ncclComm_t comm[COMM_NGROUPS];   /* NULL for a one-rank group */
    int owns[COMM_NGROUPS];          /* made by ncclCommSplit (else the world's) */
    int gsize[COMM_NGROUPS];
    cudaStream_t cs;                 /* the communication stream */
    cudaStream_t compute;            /* last bound ctx->stream (NULL: none yet) */
    cudaEvent_t ready, join;         /* compute -> cs, cs -> compute under capture */
    cudaEvent_t ev[NC_RING];         /* one per queued eager collective */
    unsigned char *scratch;          /* device staging of host buffers */
    size_t scratch_cap;
    float *hpack;                    /* host packing of a host-side bucket */
    size_t hpack_cap;
    int64_t seq, stall_at;
    /* watchdog: ring of eager collectives, oldest at head */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t dog;
    int dog_on, stop, failed, aborted;
    nc_pending ring[NC_RING];
    int head, count;
    int64_t done_seq;                /* every collective up to it has ended */
    char err[1024];
    nc_mpi mpi;
} nc_impl;

__attribute__((format(printf, 3, 4)))
static int nc_fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static double nc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define NC_CUDA(call, what)                                                                  \
    do {                                                                                     \
        cudaError_t e_ = (call);                                                             \
        if (e_ != cudaSuccess)                                                               \
            return nc_fail(err, errlen, "rank %d: %s: %s failed: %s", m->rank, (what), #call, \
                           cudaGetErrorString(e_));                                          \
    } while (0)

#define NC_NCCL(call, what)                                                                  \
    do {                                                                                     \
        ncclResult_t r_ = (call);                                                            \
        if (r_ != ncclSuccess)                                                               \
            return nc_fail(err, errlen, "rank %d: %s: %s failed: %s", m->rank, (what), #call, \
                           ncclGetErrorString(r_));                                          \
    } while (0)

/* ---- start-up -------------------------------------------------------------- */
static const char *nc_env_any(const char *const *names, int n)
{
    for (int i = 0; i < n; i++) {
        const char *v = getenv(names[i]);
        if (v && *v)
            return v;
    }
    return NULL;
}

static int nc_launched_by_mpi(void)
{
    static const char *const v[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                    "MPI_LOCALNRANKS"};
    return nc_env_any(v, 4) != NULL;
}

/* The GPU of this rank, by its index on the node: CUDA_VISIBLE_DEVICES
 * becomes that one entry (of the list given, or of all GPUs), before any
 * CUDA call, so that every later cudaSetDevice(0) means this GPU. */
static int nc_pick_gpu(nc_impl *m, char *err, size_t errlen)
{
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    char one[64];
    if (cvd && *cvd) {
        const char *p = cvd;
        for (int k = 0; k < m->local_rank && p; k++) {
            p = strchr(p, ',');
            if (p)
                p++;
        }
        if (!p || !*p)
            return nc_fail(err, errlen, "rank %d: local rank %d has no GPU: "
                           "CUDA_VISIBLE_DEVICES=%s lists fewer", m->rank, m->local_rank, cvd);
        size_t l = strcspn(p, ",");
        snprintf(one, sizeof one, "%.*s", (int)(l < 60 ? l : 60), p);
    } else {
        snprintf(one, sizeof one, "%d", m->local_rank);
    }
    if (setenv("CUDA_VISIBLE_DEVICES", one, 1))
        return nc_fail(err, errlen, "rank %d: cannot set CUDA_VISIBLE_DEVICES", m->rank);
    return 0;
}

static int nc_mpi_open(nc_impl *m, char *err, size_t errlen)
{
    static const char *const libs[] = {"libmpi.so.40", "libmpi.so.12", "libmpi.so"};
    nc_mpi *x = &m->mpi;
    for (size_t i = 0; i < sizeof libs / sizeof libs[0] && !x->dl; i++)
        x->dl = dlopen(libs[i], RTLD_NOW | RTLD_GLOBAL);   /* GLOBAL: Open MPI's plugins */
    if (!x->dl)
        return nc_fail(err, errlen, "started by mpirun, but no MPI library (libmpi.so.40 or "
                       ".12) can be loaded to share NCCL's id; install the MPI runtime, or start "
                       "the ranks without mpirun (RANK, WORLD_SIZE, MASTER_ADDR: docs/launching.md)");
    int (*initialized)(int *) = (int (*)(int *))dlsym(x->dl, "MPI_Initialized");
    int (*init)(int *, char ***) = (int (*)(int *, char ***))dlsym(x->dl, "MPI_Init");
    int (*crank)(void *, int *) = (int (*)(void *, int *))dlsym(x->dl, "MPI_Comm_rank");
    int (*csize)(void *, int *) = (int (*)(void *, int *))dlsym(x->dl, "MPI_Comm_size");
    x->bcast = (int (*)(void *, int, void *, int, void *))dlsym(x->dl, "MPI_Bcast");
    x->abort_fn = (int (*)(void *, int))dlsym(x->dl, "MPI_Abort");
    x->finalize = (int (*)(void))dlsym(x->dl, "MPI_Finalize");
    if (dlsym(x->dl, "ompi_mpi_comm_world")) {   /* Open MPI */
        x->world = dlsym(x->dl, "ompi_mpi_comm_world");
        x->byte = dlsym(x->dl, "ompi_mpi_byte");
    } else {                                     /* the MPICH ABI */
        x->world = (void *)(uintptr_t)0x44000000;
        x->byte = (void *)(uintptr_t)0x4c00010d;
    }
    if (!initialized || !init || !crank || !csize || !x->bcast || !x->abort_fn || !x->finalize ||
        !x->byte)
        return nc_fail(err, errlen, "the MPI library lacks MPI_Init/MPI_Bcast; it is not a "
                       "usable MPI");
    int done = 0;
    initialized(&done);
    if (!done) {
        if (init(NULL, NULL))
            return nc_fail(err, errlen, "MPI_Init failed");
        x->we_init = 1;
    }
    if (crank(x->world, &m->rank) || csize(x->world, &m->world))
        return nc_fail(err, errlen, "MPI_Comm_rank/size failed");
    return 0;
}

/* Fills rank, world, local_rank and (for several ranks) the unique id. */
static int nc_bootstrap(nc_impl *m, ncclUniqueId *id, double timeout_s, char *err,
                        size_t errlen)
{
    static const char *const lr[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                                     "SLURM_LOCALID", "LOCAL_RANK"};
    rdv_env env;
    int via_mpi = nc_launched_by_mpi(), via_tcp = !via_mpi && (getenv("RANK") ||
                                                               getenv("WORLD_SIZE"));
    if (via_tcp) {
        if (rdv_env_read(&env, err, errlen))
            return -1;
        m->rank = env.rank;
        m->world = env.world;
        m->local_rank = env.local_rank;
    } else if (via_mpi) {
        const char *v = nc_env_any(lr, 4);
        m->local_rank = v ? atoi(v) : 0;
    }
    if ((via_tcp || via_mpi) && nc_pick_gpu(m, err, errlen))
        return -1;
    int ngpu = 0;
    cudaError_t ce = cudaGetDeviceCount(&ngpu);
    if (ce != cudaSuccess || ngpu < 1) {
        const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
        char who[48] = "";
        if (via_tcp || via_mpi)   /* under MPI the rank is not known yet: MPI starts later */
            snprintf(who, sizeof who, "local rank %d: ", m->local_rank);
        return nc_fail(err, errlen, "%sno usable GPU (cudaGetDeviceCount: %s%s%s); the nccl "
                       "backend needs one GPU per rank; use --comm mpi for CPU ranks", who,
                       ce != cudaSuccess ? cudaGetErrorString(ce) : "0 devices",
                       cvd ? ", CUDA_VISIBLE_DEVICES=" : "", cvd ? cvd : "");
    }
    if (via_mpi && nc_mpi_open(m, err, errlen))
        return -1;
    if (m->world > 1 && m->rank == 0 && ncclGetUniqueId(id) != ncclSuccess)
        return nc_fail(err, errlen, "rank 0: ncclGetUniqueId failed: %s",
                       ncclGetLastError(NULL));
    if (m->world > 1 && via_mpi && m->mpi.bcast(id, (int)sizeof *id, m->mpi.byte, 0, m->mpi.world))
        return nc_fail(err, errlen, "rank %d: MPI_Bcast of the NCCL id failed", m->rank);
    if (m->world > 1 && via_tcp && rdv_exchange(&env, id, sizeof *id, timeout_s, err, errlen))
        return -1;
    return 0;
}

static void *nc_watch(void *arg);

static void nc_release(nc_impl *m)
{
    if (m->dog_on) {
        pthread_mutex_lock(&m->mu);
        m->stop = 1;
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        pthread_join(m->dog, NULL);
    }
    if (m->cs && !m->failed)
        cudaStreamSynchronize(m->cs);
    for (int g = COMM_NGROUPS - 1; g >= 0; g--)
        if (m->comm[g] && (m->owns[g] || g == COMM_GROUP_WORLD)) {
            if (m->failed || m->aborted)
                ncclCommAbort(m->comm[g]);
            else
                ncclCommDestroy(m->comm[g]);
        }
    for (int i = 0; i < NC_RING; i++)
        if (m->ev[i])
            cudaEventDestroy(m->ev[i]);
    if (m->ready)
        cudaEventDestroy(m->ready);
    if (m->join)
        cudaEventDestroy(m->join);
    if (m->cs)
        cudaStreamDestroy(m->cs);
    if (m->scratch)
        cudaFree(m->scratch);
    free(m->hpack);
    if (m->mpi.we_init)
        m->mpi.finalize();
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->cv);
    free(m);
}

static int nc_start(nc_impl *m, const comm_init_args *a, char *err, size_t errlen)
{
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (nc_bootstrap(m, &id, a->timeout_s, err, errlen))
        return -1;
    if (a->expert < 1 || m->world % a->expert)
        return nc_fail(err, errlen, "expert-parallel size %" PRId64 " does not divide the %d "
                       "ranks started", a->expert, m->world);
    NC_CUDA(cudaSetDevice(0), "start-up");
    NC_CUDA(cudaStreamCreateWithFlags(&m->cs, cudaStreamNonBlocking), "start-up");
    NC_CUDA(cudaEventCreateWithFlags(&m->ready, cudaEventDisableTiming), "start-up");
    NC_CUDA(cudaEventCreateWithFlags(&m->join, cudaEventDisableTiming), "start-up");
    for (int i = 0; i < NC_RING; i++)
        NC_CUDA(cudaEventCreateWithFlags(&m->ev[i], cudaEventDisableTiming), "start-up");
    for (int g = 0; g < COMM_NGROUPS; g++) {
        comm_group cg;
        if (comm_group_of(m->rank, m->world, a->expert, g, &cg))
            return nc_fail(err, errlen, "rank %d: cannot form the %s group", m->rank,
                           comm_group_name(g));
        m->gsize[g] = (int)cg.size;
    }
    if (m->world == 1)
        return 0;   /* every group has one rank: every collective is local */
    NC_NCCL(ncclCommInitRank(&m->comm[COMM_GROUP_WORLD], m->world, id, m->rank), "start-up");
    /* every rank makes the same splits in the same order (group sizes depend
     * only on world and expert), as ncclCommSplit requires */
    for (int g = 1; g < COMM_NGROUPS; g++) {
        comm_group cg = {0, 1, 1, 0};
        comm_group_of(m->rank, m->world, a->expert, g, &cg);   /* checked above */
        if (cg.size == m->world) {
            m->comm[g] = m->comm[COMM_GROUP_WORLD];
        } else if (cg.size > 1) {
            NC_NCCL(ncclCommSplit(m->comm[COMM_GROUP_WORLD], (int)cg.first, (int)cg.index,
                                  &m->comm[g], NULL), comm_group_name(g));
            m->owns[g] = 1;
        }
    }
    if (pthread_create(&m->dog, NULL, nc_watch, m))
        return nc_fail(err, errlen, "rank %d: cannot start the collective watchdog thread",
                       m->rank);
    m->dog_on = 1;
    return 0;
}

static int nc_init(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                   size_t errlen)
{
    nc_impl *m = calloc(1, sizeof *m);
    if (!m)
        return nc_fail(err, errlen, "out of memory");
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->world = 1;
    m->timeout_s = a->timeout_s;
    m->stall_at = -1;
    if (nc_start(m, a, err, errlen)) {
        m->failed = 1;
        nc_release(m);
        return -1;
    }
    const char *sr = getenv("MOEC_TEST_STALL_RANK"), *sa = getenv("MOEC_TEST_STALL_AT");
    if (sr && atoi(sr) == m->rank)
        m->stall_at = sa ? atoll(sa) : 3;
    *rank = m->rank;
    *world = m->world;
    *impl = m;
    return 0;
}

/* ---- the watchdog -------------------------------------------------------- */
/* Aborts every communicator; the caller holds mu. */
static void nc_abort_locked(nc_impl *m)
{
    if (m->aborted)
        return;
    m->aborted = 1;
    for (int g = COMM_NGROUPS - 1; g >= 0; g--)
        if (m->comm[g] && (m->owns[g] || g == COMM_GROUP_WORLD))
            ncclCommAbort(m->comm[g]);
    for (int g = 0; g < COMM_NGROUPS; g++)
        m->comm[g] = NULL;
}

static void *nc_watch(void *arg)
{
    nc_impl *m = arg;
    cudaSetDevice(0);   /* events belong to this rank's GPU */
    pthread_mutex_lock(&m->mu);
    while (!m->stop) {
        if (m->count == 0 || m->failed) {
            pthread_cond_wait(&m->cv, &m->mu);
            continue;
        }
        nc_pending p = m->ring[m->head];
        cudaEvent_t ev = m->ev[m->head];
        ncclComm_t c = m->comm[p.group];
        pthread_mutex_unlock(&m->mu);
        cudaError_t q = cudaEventQuery(ev);
        ncclResult_t ar = ncclSuccess;
        if (c)
            ncclCommGetAsyncError(c, &ar);
        pthread_mutex_lock(&m->mu);
        if (q == cudaSuccess) {
            m->head = (m->head + 1) % NC_RING;
            m->count--;
            m->done_seq = p.seq;
            pthread_cond_broadcast(&m->cv);
            continue;
        }
        int late = nc_now() - p.t0 > m->timeout_s;
        if (q != cudaErrorNotReady || (ar != ncclSuccess && ar != ncclInProgress) || late) {
            if (q != cudaErrorNotReady)
                snprintf(m->err, sizeof m->err, "rank %d: collective #%" PRId64 " (%s, group %s) "
                         "failed on the GPU: %s; ending the job", m->rank, p.seq, p.what,
                         comm_group_name(p.group), cudaGetErrorString(q));
            else if (!late)
                snprintf(m->err, sizeof m->err, "rank %d: collective #%" PRId64 " (%s, group %s) "
                         "failed in NCCL: %s (%s); ending the job", m->rank, p.seq, p.what,
                         comm_group_name(p.group), ncclGetErrorString(ar),
                         c ? ncclGetLastError(c) : "");
            else
                snprintf(m->err, sizeof m->err, "rank %d: collective #%" PRId64 " (%s, group %s) "
                         "timed out after %g s: a rank of the group is stuck or dead (NCCL cannot "
                         "say which; the rank that reports no timeout is the one); aborted the "
                         "NCCL communicators, ending the job", m->rank, p.seq, p.what,
                         comm_group_name(p.group), m->timeout_s);
            m->failed = 1;
            nc_abort_locked(m);
            m->count = 0;
            pthread_cond_broadcast(&m->cv);
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 500 * 1000;   /* 0.5 ms: collectives are short; the GPU does the work */
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&m->cv, &m->mu, &ts);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

/* ---- one collective --------------------------------------------------------- */
typedef ncclResult_t (*nc_post_fn)(void *arg, ncclComm_t c, cudaStream_t s, const void *in,
                                   void *out);

static int nc_on_device(const void *p)
{
    struct cudaPointerAttributes a;
    if (!p)
        return 1;   /* a zero-size block: nothing to stage */
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();   /* not a CUDA pointer: clear the sticky-free error */
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

static int nc_scratch(nc_impl *m, size_t bytes, const char *what, char *err, size_t errlen)
{
    if (bytes <= m->scratch_cap)
        return 0;
    if (m->scratch)
        cudaFree(m->scratch);
    m->scratch = NULL;
    m->scratch_cap = 0;
    NC_CUDA(cudaMalloc((void **)&m->scratch, bytes), what);
    m->scratch_cap = bytes;
    return 0;
}

/* Runs post on the communication stream after the compute stream's work.
 * in/out: the caller's buffers; host ones are staged (inb bytes in, outb
 * out) and the call then waits for the result. */
static int nc_collective(nc_impl *m, int group, const char *what, const void *in, size_t inb,
                         void *out, size_t outb, nc_post_fn post, void *arg, char *err,
                         size_t errlen)
{
    if (group < 0 || group >= COMM_NGROUPS)
        return nc_fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    int64_t seq = ++m->seq;
    if (seq == m->stall_at)
        sleep((unsigned)(m->timeout_s * 10 + 30));   /* test hook: a rank stuck in a kernel */
    pthread_mutex_lock(&m->mu);
    int rc = 0;
    cudaEvent_t end = NULL;   /* the eager collective's end event, once queued */
    if (m->failed) {
        rc = nc_fail(err, errlen, "%s", m->err);
        goto out;
    }
    while (m->count == NC_RING && !m->failed)   /* the ring is full: wait for the oldest */
        pthread_cond_wait(&m->cv, &m->mu);
    enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (m->compute && cudaStreamIsCapturing(m->compute, &cap) != cudaSuccess)
        cap = cudaStreamCaptureStatusNone;
    int capturing = cap != cudaStreamCaptureStatusNone;
    int staged = (inb && !nc_on_device(in)) || (outb && !nc_on_device(out));
    if (staged && capturing) {
        rc = nc_fail(err, errlen, "rank %d: %s: host buffers cannot be staged inside a CUDA "
                     "graph capture", m->rank, what);
        goto out;
    }
    const char *w = what;
#define CK(call)                                                                              \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            rc = nc_fail(err, errlen, "rank %d: %s: %s failed: %s", m->rank, w, #call,        \
                         cudaGetErrorString(e_));                                             \
            goto out;                                                                         \
        }                                                                                     \
    } while (0)
    size_t inoff = (inb + 255) / 256 * 256;
    if (staged && nc_scratch(m, inoff + outb, what, err, errlen)) {
        rc = -1;
        goto out;
    }
    if (m->compute) {
        CK(cudaEventRecord(m->ready, m->compute));
        CK(cudaStreamWaitEvent(m->cs, m->ready, 0));
    }
    const void *din = in;
    void *dout = out;
    if (staged) {
        din = m->scratch;
        dout = m->scratch + inoff;
        if (inb)
            CK(cudaMemcpyAsync(m->scratch, in, inb, cudaMemcpyHostToDevice, m->cs));
    }
    ncclResult_t r = post(arg, m->comm[group], m->cs, din, dout);
    if (r != ncclSuccess) {
        rc = nc_fail(err, errlen, "rank %d: collective #%" PRId64 " (%s, group %s): NCCL refused "
                     "it: %s (%s)", m->rank, seq, what, comm_group_name(group),
                     ncclGetErrorString(r), ncclGetLastError(m->comm[group]));
        goto out;
    }
    if (staged && outb)
        CK(cudaMemcpyAsync(out, dout, outb, cudaMemcpyDeviceToHost, m->cs));
    if (capturing) {
        CK(cudaEventRecord(m->join, m->cs));
        CK(cudaStreamWaitEvent(m->compute, m->join, 0));
        goto out;
    }
    int slot = (m->head + m->count) % NC_RING;
    CK(cudaEventRecord(m->ev[slot], m->cs));
    end = m->ev[slot];
    nc_pending *p = &m->ring[slot];
    p->seq = seq;
    p->group = group;
    p->t0 = nc_now();
    snprintf(p->what, sizeof p->what, "%s", what);
    m->count++;
    pthread_cond_broadcast(&m->cv);
    if (staged)   /* the caller reads the host result next */
        while (!m->failed && m->done_seq < seq)
            pthread_cond_wait(&m->cv, &m->mu);
    if (m->failed)
        rc = nc_fail(err, errlen, "%s", m->err);
#undef CK
out:
    pthread_mutex_unlock(&m->mu);
    /* The compute stream waits for the end, outside the lock: a runtime that
     * waits on the host here (tests/standin/cudart.c does, its kernels run on
     * the host) must not keep the watchdog from aborting a hung collective.
     * The slot's event is not recorded again before this returns: only this
     * thread records. */
    if (rc == 0 && end && m->compute) {
        cudaError_t e = cudaStreamWaitEvent(m->compute, end, 0);
        if (e != cudaSuccess)
            return nc_fail(err, errlen, "rank %d: %s: cudaStreamWaitEvent(compute, end) failed: "
                           "%s", m->rank, what, cudaGetErrorString(e));
        pthread_mutex_lock(&m->mu);
        if (m->failed)
            rc = nc_fail(err, errlen, "%s", m->err);
        pthread_mutex_unlock(&m->mu);
    }
    return rc;
}

/* A collective over a group of one rank is a local copy of bytes from src
 * to dst (none for 0 bytes): done here, 1.  0: the group has several ranks
 * and the caller runs the collective.  -1: an unknown group or a failed copy. */
static int nc_local(nc_impl *m, int group, void *dst, const void *src, size_t bytes,
                    const char *what, char *err, size_t errlen)
{
    if (group < 0 || group >= COMM_NGROUPS)
        return nc_fail(err, errlen, "rank %d: collective names unknown group %d", m->rank, group);
    if (m->gsize[group] > 1)
        return 0;
    if (bytes)
        NC_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), what);
    return 1;
}

/* ---- all-reduce ---------------------------------------------------------- */
typedef struct nc_ar { float *const *bufs; const int64_t *ns; int count; size_t n;
                       ncclDataType_t type; } nc_ar;

static ncclResult_t nc_post_allreduce(void *arg, ncclComm_t c, cudaStream_t s, const void *in,
                                      void *out)
{
    nc_ar *a = arg;
    if (in)   /* one staged or single buffer */
        return ncclAllReduce(in, out, a->n, a->type, ncclSum, c, s);
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; i < a->count && r == ncclSuccess; i++)
        if (a->ns[i] > 0)
            r = ncclAllReduce(a->bufs[i], a->bufs[i], (size_t)a->ns[i], ncclFloat, ncclSum, c, s);
    ncclResult_t r2 = ncclGroupEnd();
    return r != ncclSuccess ? r : r2;
}

static int nc_allreduce_f32(void *impl, float *const *bufs, const int64_t *ns, int count,
                            int group, const char *what, char *err, size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, NULL, NULL, 0, what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    int host = 0;
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        total += (size_t)ns[i];
        host |= ns[i] > 0 && !nc_on_device(bufs[i]);
    }
    nc_ar a = {bufs, ns, count, total, ncclFloat};
    if (!host)   /* the plan's tensors: one grouped call, in place on the device */
        return nc_collective(m, group, what, NULL, 0, NULL, 0, nc_post_allreduce, &a, err,
                             errlen);
    if (total > m->hpack_cap) {   /* host tensors: pack, stage, unpack */
        float *p = realloc(m->hpack, total * sizeof *p);
        if (!p)
            return nc_fail(err, errlen, "rank %d: out of memory for %s", m->rank, what);
        m->hpack = p;
        m->hpack_cap = total;
    }
    for (int i = 0, at = 0; i < count; at += (int)ns[i], i++)
        memcpy(m->hpack + at, bufs[i], (size_t)ns[i] * sizeof(float));
    size_t b = total * sizeof(float);
    if (nc_collective(m, group, what, m->hpack, b, m->hpack, b, nc_post_allreduce, &a, err,
                      errlen))
        return -1;
    for (int i = 0, at = 0; i < count; at += (int)ns[i], i++)
        memcpy(bufs[i], m->hpack + at, (size_t)ns[i] * sizeof(float));
    return 0;
}

static int nc_allreduce_host(void *impl, double *buf, int64_t n, int group, const char *what,
                             char *err, size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, NULL, NULL, 0, what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    nc_ar a = {NULL, NULL, 0, (size_t)n, ncclDouble};
    size_t b = (size_t)n * sizeof(double);
    return nc_collective(m, group, what, buf, b, buf, b, nc_post_allreduce, &a, err, errlen);
}

static void nc_abort(void *impl, int code)
{
    nc_impl *m = impl;
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    nc_abort_locked(m);
    m->failed = 1;
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    /* under mpirun the launcher can end every rank; under the TCP rendezvous
     * the peers see their next collective fail or time out */
    if (m->mpi.abort_fn)
        m->mpi.abort_fn(m->mpi.world, code);
}

static void nc_fini(void *impl)
{
    if (impl)
        nc_release(impl);
}

static const comm_backend nc_backend = {
    COMM_BACKEND_ABI, "nccl", nc_init, nc_allreduce_f32, nc_allreduce_host, nc_abort, nc_fini,
};

const comm_backend *moec_comm_backend(void);
const comm_backend *moec_comm_backend(void)
{
    return &nc_backend;
}

/* The compute stream the next collectives follow (comm.c calls this with
 * ctx->stream before each collective op). */
void moec_comm_bind_stream(void *impl, void *stream);
void moec_comm_bind_stream(void *impl, void *stream)
{
    nc_impl *m = impl;
    if (m)
        m->compute = (cudaStream_t)stream;
}

/* ---- expert parallelism: all-to-all as grouped send/receive -------------- */
typedef struct nc_a2a { const int64_t *sb, *rb; int64_t fixed; int P; } nc_a2a;

static ncclResult_t nc_post_alltoall(void *arg, ncclComm_t c, cudaStream_t s, const void *in,
                                     void *out)
{
    nc_a2a *a = arg;
    const unsigned char *send = in;
    unsigned char *recv = out;
    int64_t so = 0, ro = 0;
    ncclResult_t r = ncclGroupStart();
    for (int k = 0; k < a->P && r == ncclSuccess; k++) {
        int64_t sn = a->sb ? a->sb[k] : a->fixed, rn = a->rb ? a->rb[k] : a->fixed;
        if (sn > 0)   /* both sides agree on every size, so skipping zeros is safe */
            r = ncclSend(send + so, (size_t)sn, ncclUint8, k, c, s);
        if (rn > 0 && r == ncclSuccess)
            r = ncclRecv(recv + ro, (size_t)rn, ncclUint8, k, c, s);
        so += sn;
        ro += rn;
    }
    ncclResult_t r2 = ncclGroupEnd();
    return r != ncclSuccess ? r : r2;
}

static int nc_alltoall(void *impl, const void *send, void *recv, int64_t bytes_per_peer,
                       int group, const char *what, char *err, size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, recv, send, (size_t)bytes_per_peer, what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    nc_a2a a = {NULL, NULL, bytes_per_peer, m->gsize[group]};
    size_t b = (size_t)(bytes_per_peer * a.P);
    return nc_collective(m, group, what, send, b, recv, b, nc_post_alltoall, &a, err, errlen);
}

static int nc_alltoallv(void *impl, const void *send, const int64_t *send_bytes, void *recv,
                        const int64_t *recv_bytes, int group, const char *what, char *err,
                        size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, recv, send, send_bytes[0] > 0 ? (size_t)send_bytes[0] : 0, what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    nc_a2a a = {send_bytes, recv_bytes, 0, m->gsize[group]};
    int64_t sb = 0, rb = 0;
    for (int k = 0; k < a.P; k++) {
        if (send_bytes[k] < 0 || recv_bytes[k] < 0)
            return nc_fail(err, errlen, "rank %d: %s: a negative block size", m->rank, what);
        sb += send_bytes[k];
        rb += recv_bytes[k];
    }
    return nc_collective(m, group, what, sb ? send : NULL, (size_t)sb, rb ? recv : NULL,
                         (size_t)rb, nc_post_alltoall, &a, err, errlen);
}

static const comm_ep_backend nc_ep = {COMM_BACKEND_ABI, nc_alltoall, nc_alltoallv};

const comm_ep_backend *moec_comm_backend_ep(void);
const comm_ep_backend *moec_comm_backend_ep(void)
{
    return &nc_ep;
}

/* ---- ZeRO: all-gather and reduce-scatter ------------------------------- */
typedef struct nc_zs { size_t n; } nc_zs;

static ncclResult_t nc_post_allgather(void *arg, ncclComm_t c, cudaStream_t s, const void *in,
                                      void *out)
{
    return ncclAllGather(in, out, ((nc_zs *)arg)->n, ncclUint8, c, s);
}

static ncclResult_t nc_post_reduce_scatter(void *arg, ncclComm_t c, cudaStream_t s,
                                           const void *in, void *out)
{
    return ncclReduceScatter(in, out, ((nc_zs *)arg)->n, ncclFloat, ncclSum, c, s);
}

static int nc_allgather(void *impl, const void *slice, void *full, int64_t bytes, int group,
                        const char *what, char *err, size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, full, slice, (size_t)bytes, what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    nc_zs a = {(size_t)bytes};
    return nc_collective(m, group, what, slice, (size_t)bytes, full,
                         (size_t)bytes * (size_t)m->gsize[group], nc_post_allgather, &a, err,
                         errlen);
}

static int nc_reduce_scatter(void *impl, const float *full, float *slice, int64_t s, int group,
                             const char *what, char *err, size_t errlen)
{
    nc_impl *m = impl;
    int one = nc_local(m, group, slice, full, (size_t)s * sizeof(float), what, err, errlen);
    if (one)
        return one < 0 ? -1 : 0;
    nc_zs a = {(size_t)s};
    return nc_collective(m, group, what, full, (size_t)s * sizeof(float) * (size_t)m->gsize[group],
                         slice, (size_t)s * sizeof(float), nc_post_reduce_scatter, &a, err,
                         errlen);
}

static const comm_zero_backend nc_zero = {COMM_BACKEND_ABI, nc_allgather, nc_reduce_scatter};

const comm_zero_backend *moec_comm_zero_backend(void);
const comm_zero_backend *moec_comm_zero_backend(void)
{
    return &nc_zero;
}

/* Its ZeRO and EP tables take device pointers (every collective runs on
 * GPU buffers), so comm.c passes plan tensors straight through. */
int64_t moec_comm_caps(void);
int64_t moec_comm_caps(void)
{
    return COMM_CAP_DEVICE_BUFFERS;
}
