/* comm.h - communication between ranks (docs/parallel.md).
 *
 * Collectives are ops of the plan like kernels: the compiler's parallel pass
 * emits calls to the moec_comm_* symbols below from the plan library "@comm".
 * The runtime binds "@comm" to these dispatchers (built into run), which
 * forward through ctx->comm to the active backend:
 *   single  built in: one rank, every collective is a no-op
 *   mpi     build/libmoec_comm_mpi.so (mpicc), CPU ranks started by mpirun
 *   nccl    build/libmoec_comm_nccl.so, GPU ranks (bootstrapped through MPI)
 * run never links MPI or NCCL: a backend is dlopened only when asked for.
 *
 * Every collective of a backend has a deadline (--comm-timeout): a dead or
 * stuck rank makes it fail with a message naming the collective and the
 * ranks that did not arrive; the runtime then ends the whole job.
 */
#ifndef MOEC_COMM_H
#define MOEC_COMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../kernels/moek.h"

#define COMM_LIB "@comm"            /* the plan library the collectives come from */
#define COMM_BACKEND_ABI 1
#define COMM_MULTI_MAX 8            /* tensors per bucketed all-reduce op */

/* Process groups, by the id the plan's collective ops carry. */
enum comm_group_id {
    COMM_GROUP_WORLD = 0,
    COMM_GROUP_DP = 1,        /* data-parallel group of the dense parameters */
    COMM_GROUP_EP = 2,        /* expert-parallel group: ranks that split the experts */
    COMM_GROUP_EXPERT_DP = 3, /* data-parallel group of one expert shard */
    COMM_NGROUPS
};

/* Every group is an arithmetic progression of world ranks.  With world N and
 * expert-parallel size E (E divides N): the EP group of rank r is the block
 * of E consecutive ranks holding r; its expert-DP group is the ranks with the
 * same r mod E (they hold the same experts); dense DP is the whole world
 * (no tensor or pipeline parallelism yet).  Shared by moec --explain, run
 * --inspect and the backends, so all three agree. */
typedef struct comm_group {
    int64_t first, stride, size;   /* world ranks first, first+stride, ... */
    int64_t index;                 /* this rank's position in it */
} comm_group;

static inline int comm_group_of(int64_t rank, int64_t world, int64_t ep, int id, comm_group *g)
{
    if (world < 1 || ep < 1 || world % ep || rank < 0 || rank >= world)
        return -1;
    switch (id) {
    case COMM_GROUP_WORLD:
    case COMM_GROUP_DP: g->first = 0; g->stride = 1; g->size = world; break;
    case COMM_GROUP_EP: g->first = rank / ep * ep; g->stride = 1; g->size = ep; break;
    case COMM_GROUP_EXPERT_DP: g->first = rank % ep; g->stride = ep; g->size = world / ep; break;
    default: return -1;
    }
    g->index = (rank - g->first) / g->stride;
    return 0;
}

static inline const char *comm_group_name(int id)
{
    static const char *const n[] = {"world", "dp", "ep", "expert-dp"};
    return id >= 0 && id < COMM_NGROUPS ? n[id] : "?";
}

/* One line per kind of group, each group as {ranks}:
 * "  ep         {0,1} {2,3}".  Inline: moec prints it too. */
static inline void comm_print_layout(int64_t world, int64_t ep, FILE *out)
{
    if (world < 1 || ep < 1 || world % ep) {
        fprintf(out, "  (no valid layout: %lld ranks, expert %lld)\n", (long long)world,
                (long long)ep);
        return;
    }
    for (int id = COMM_GROUP_DP; id < COMM_NGROUPS; id++) {
        fprintf(out, "  %-10s", comm_group_name(id));
        for (int64_t r = 0; r < world; r++) {
            comm_group g;
            comm_group_of(r, world, ep, id, &g);
            if (g.index != 0)
                continue;   /* each group once, from its first rank */
            fputs(" {", out);
            for (int64_t k = 0; k < g.size; k++)
                fprintf(out, "%s%lld", k ? "," : "", (long long)(g.first + k * g.stride));
            fputc('}', out);
        }
        fputc('\n', out);
    }
}

/* ---- the backend ABI: what libmoec_comm_<name>.so exports -------------- */
typedef struct comm_init_args {
    int64_t expert;              /* expert-parallel size (groups are derived from it) */
    double timeout_s;            /* every collective's deadline */
    int device_cuda;             /* buffers live on the GPU (nccl) */
    void *stream;                /* cudaStream_t for nccl */
} comm_init_args;

typedef struct comm_backend {
    int abi;                     /* COMM_BACKEND_ABI */
    const char *name;
    /* Starts the backend; fills rank and world.  0 or -1 with err. */
    int (*init)(void **impl, const comm_init_args *a, int *rank, int *world, char *err,
                size_t errlen);
    /* Sum in place over group.  what names the collective in errors. */
    int (*allreduce_f32)(void *impl, float *const *bufs, const int64_t *ns, int count, int group,
                         const char *what, char *err, size_t errlen);
    int (*allreduce_f64_host)(void *impl, double *buf, int64_t n, int group, const char *what,
                              char *err, size_t errlen);
    void (*abort)(void *impl, int code);   /* ends every rank of the job */
    void (*fini)(void *impl);
} comm_backend;

/* The one symbol a backend library exports. */
typedef const comm_backend *(*comm_backend_fn)(void);
#define COMM_BACKEND_SYMBOL "moec_comm_backend"
/* Optional (nccl): the compute stream (ctx->stream) the next collectives
 * must follow; the "@comm" dispatchers call it before each device collective. */
typedef void (*comm_bind_stream_fn)(void *impl, void *stream);
#define COMM_BIND_STREAM_SYMBOL "moec_comm_bind_stream"

/* Optional: what the backend's ZeRO and EP tables accept, as a bit set
 * (a library without the symbol: 0).  COMM_CAP_DEVICE_BUFFERS: they take
 * device pointers (nccl), so with --device cuda the "@comm" dispatchers hand
 * plan tensors to them directly; without it they stage every buffer through
 * host memory with the device copy service (comm_set_device). */
enum comm_caps { COMM_CAP_DEVICE_BUFFERS = 1 };
typedef int64_t (*comm_caps_fn)(void);
#define COMM_CAPS_SYMBOL "moec_comm_caps"

/* ---- the runtime's side --------------------------------------------------- */
typedef struct comm comm;

typedef struct comm_opts {
    const char *backend;         /* "single", "mpi", "nccl" or NULL/"auto" */
    const char *exe_dir;         /* backends are searched like the kernel libraries */
    int64_t expert;              /* plan's parallel { expert } */
    double timeout_s;            /* <= 0: 300 */
    int device_cuda;
} comm_opts;

/* "auto" picks mpi when started by mpirun (OMPI_/PMI_ environment), else single. */
comm *comm_open(const comm_opts *o, char *err, size_t errlen);
int comm_rank(const comm *c);
int comm_world(const comm *c);
const char *comm_backend_name(const comm *c);
/* The first collective failure ("" if none): names the rank and collective. */
const char *comm_error(const comm *c);
/* Host-side sum over a group (loss, metrics). */
int comm_allreduce_host(comm *c, double *buf, int64_t n, int group, const char *what, char *err,
                        size_t errlen);
/* Ends every rank (after an error on this one); returns only on one rank. */
void comm_abort(comm *c, int code);
void comm_close(comm *c);
/* The device services of the loaded kernel library (kernels/moek.h
 * moek_device_copy / _alloc / _free), which the dispatchers use when plan
 * tensors live on a device (comm_opts.device_cuda).  run registers them
 * right after loading the kernel library; on the CPU they are never used
 * (MOEC_TEST_COMM_DEVICE=staged|direct forces either device path on CPU
 * ranks, for the tests). */
typedef struct comm_device {
    int (*copy)(const moek_ctx *, void *, const void *, int64_t, int64_t, char *, int64_t);
    void *(*alloc)(const moek_ctx *, int64_t, char *, int64_t);
    void (*free)(const moek_ctx *, void *);
} comm_device;
void comm_set_device(comm *c, const comm_device *d);
/* Frees the device scratch the communication layer kept for the direct
 * path; call when the device is idle, before the kernel library closes. */
void comm_release_device(comm *c, const moek_ctx *ctx);
/* How the ZeRO and EP dispatchers reach plan tensors: "host" (memcpy),
 * "staged" (through host memory with the copy service) or "direct" (device
 * pointers to the backend). */
const char *comm_buffer_mode(const comm *c);
/* Resolves a "@comm" kernel symbol (NULL if unknown). */
void *comm_symbol(const char *name);
/* Why that collective waits on the host mid-step (then a CUDA graph cannot
 * hold it), or NULL when it runs on the streams alone. */
const char *comm_symbol_host_wait(const char *name);

/* ---- the collective kernels the plan calls (ctx->comm: a comm *) -------- */
/* Sums count (<= COMM_MULTI_MAX) fp32 tensors over group as one bucket;
 * unused slots have n = 0.  bucket only names the op in errors. */
void moec_comm_allreduce_f32_multi(const moek_ctx *ctx, int64_t group, int64_t bucket,
                                   int64_t count, float *t0, int64_t n0, float *t1, int64_t n1,
                                   float *t2, int64_t n2, float *t3, int64_t n3, float *t4,
                                   int64_t n4, float *t5, int64_t n5, float *t6, int64_t n6,
                                   float *t7, int64_t n7);
void moec_comm_allreduce_f32(const moek_ctx *ctx, float *buf, int64_t n, int64_t group);

/* ---- expert parallelism (compiler/parallel_ep.c, docs/parallel.md) ------
 * A backend that can run expert parallelism also exports COMM_EP_SYMBOL, a
 * second table (kept apart from comm_backend so its ABI stays put).  Both
 * exchanges move raw bytes, so one entry serves every dtype; blocks are in
 * group-rank order and a zero-size block is fine (every rank still joins). */
typedef struct comm_ep_backend {
    int abi;                     /* COMM_BACKEND_ABI */
    /* bytes_per_peer bytes from send + k*bytes_per_peer to group rank k */
    int (*alltoall)(void *impl, const void *send, void *recv, int64_t bytes_per_peer, int group,
                    const char *what, char *err, size_t errlen);
    /* send_bytes[k] bytes to group rank k, recv_bytes[k] from it; blocks
     * packed back to back in k order on both sides */
    int (*alltoallv)(void *impl, const void *send, const int64_t *send_bytes, void *recv,
                     const int64_t *recv_bytes, int group, const char *what, char *err,
                     size_t errlen);
} comm_ep_backend;
typedef const comm_ep_backend *(*comm_ep_backend_fn)(void);
#define COMM_EP_SYMBOL "moec_comm_backend_ep"

/* Size of group id for this rank (1 when the backend is single). */
int64_t comm_group_size(const comm *c, int group);
/* Host-side all-gather over group: every rank's `bytes` from mine, in
 * group-rank order, into all (size x bytes).  Checkpoints of expert shards. */
int comm_allgather_host(comm *c, const void *mine, void *all, int64_t bytes, int group,
                        const char *what, char *err, size_t errlen);

/* The dispatch counts: expert_rows[E,2] is this rank's dispatch (first row,
 * rows) per global expert; the P ranks of group (the expert-parallel group,
 * P = its size) hold El = E/P experts each, rank k the ids [k*El, (k+1)*El).
 * counts[2*P*El] = rows this rank sends to (rank d, local expert j) at
 * d*El + j, then rows it receives from (rank s, local expert j) at
 * P*El + s*El + j, exchanged as one all-to-all; local_rows[El,2] = (first
 * row, rows) of each local expert in the received buffer: expert-major,
 * source rank within, packed back to back. */
void moec_comm_ep_counts(const moek_ctx *ctx, int64_t group, const int32_t *expert_rows,
                         int32_t *counts, int32_t *local_rows, int64_t E, int64_t P);
/* dir 0 (dispatch): src = xs[R,D] laid out by expert_rows, dst = xr[Rr,D]
 * laid out by local_rows; dir 1 (combine, and dispatch's backward): the
 * reverse, src[Rr,D] -> dst[R,D].  esize bytes per element (4 fp32, 2
 * bf16/fp16).  Rows of dst no block covers are zeroed.  Two collectives
 * are never skipped: a rank with nothing to send sends zero bytes. */
void moec_comm_ep_exchange(const moek_ctx *ctx, int64_t group, int64_t dir, const void *src,
                           void *dst, const int32_t *expert_rows, const int32_t *counts,
                           const int32_t *local_rows, int64_t R, int64_t Rr, int64_t D, int64_t E,
                           int64_t P, int64_t esize);

/* ---- ZeRO (docs/parallel.md "ZeRO"): slices of a tensor over a group ----
 * A backend that supports ZeRO also exports COMM_ZERO_SYMBOL, a second table
 * (kept apart from comm_backend so other extensions never collide with it).
 * Rank i of the group owns elements [i*S, (i+1)*S) of a tensor of n
 * elements, S = plan_zero_shard_numel(n, size) (runtime/plan.h). */
typedef struct comm_zero_backend {
    int abi;                     /* COMM_BACKEND_ABI */
    /* full[k*bytes .. (k+1)*bytes) <- slice of group rank k (full holds size*bytes) */
    int (*allgather)(void *impl, const void *slice, void *full, int64_t bytes, int group,
                     const char *what, char *err, size_t errlen);
    /* slice <- sum over the group of full[index*s .. (index+1)*s) (full holds size*s) */
    int (*reduce_scatter_f32)(void *impl, const float *full, float *slice, int64_t s, int group,
                              const char *what, char *err, size_t errlen);
} comm_zero_backend;
typedef const comm_zero_backend *(*comm_zero_fn)(void);
#define COMM_ZERO_SYMBOL "moec_comm_zero_backend"

/* This rank's position in group and the group's size (0 and 1 for one rank). */
int comm_group_index(const comm *c, int group, int64_t *size);
/* (checkpoints gather slices with comm_allgather_host above) */

/* The plan ops (no outputs: each updates its tensor arguments in place).
 * esize: bytes per element (4 fp32, 2 bf16).  slice: S elements. */
/* slice <- this rank's slice of full[0, n), zero past n (a local copy) */
void moec_comm_zero_slice(const moek_ctx *ctx, int64_t group, const void *full, int64_t n,
                          void *slice, int64_t s, int64_t esize);
/* full[0, n) <- every rank's slice, in rank order */
void moec_comm_zero_allgather(const moek_ctx *ctx, int64_t group, const void *slice, int64_t s,
                              void *full, int64_t n, int64_t esize);
/* slice (+)= the group's sum of this rank's slice of full[0, n) (fp32) */
void moec_comm_zero_reduce_scatter(const moek_ctx *ctx, int64_t group, const float *full,
                                   int64_t n, float *slice, int64_t s, int64_t accumulate);
/* The same for half-precision gradients (precision = bf16 / fp16): full[0,
 * n) holds dtype (PLAN_BF16 or PLAN_F16) elements, widened exactly to fp32
 * before the sum, so the sum and the slice are fp32 (docs/parallel.md
 * "ZeRO with bf16 or fp16") */
void moec_comm_zero_reduce_scatter_half(const moek_ctx *ctx, int64_t group, const void *full,
                                        int64_t n, float *slice, int64_t s, int64_t accumulate,
                                        int64_t dtype);

#endif
