/* nccl.c - a stand-in for NCCL between processes on one machine, over a
 * shared file per communicator, for tests/cli/test_nccl_standin.sh: the NCCL
 * backend (runtime/comm_backends/nccl.c) then runs its rendezvous, splits,
 * grouped calls, staging and watchdog for real, with every rank a CPU
 * process and "device" memory from the stand-in CUDA runtime (cudart.c).
 *
 * Semantics kept from NCCL: a collective is queued on its stream and runs
 * when the stream's worker reaches it (asynchronous to the caller); calls
 * between ncclGroupStart and ncclGroupEnd run as one unit; ncclCommSplit
 * orders members by key; a stuck peer hangs a collective until
 * ncclCommAbort (or, as a last resort so a test never hangs,
 * STANDIN_NCCL_HANG_S seconds, default 600); ncclCommGetAsyncError reports
 * a failed one.  Reductions sum ranks in rank order, so every rank gets the
 * same bits (NCCL's order differs, but is also the same on every rank).
 *
 * Protocol of one operation on a communicator of n ranks: each rank posts
 * the bytes it needs; barrier; all grow the shared file to the largest
 * need; each copies its contribution into its slot; barrier; each reads
 * what it needs from the others' slots; barrier.  The unique id is the
 * file's path (rank 0 unlinks it once everyone has opened it). */
#include <nccl.h>

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "standin.h"

#define HDR_BYTES 4096
#define MAX_RANKS 64

typedef struct shm_hdr {
    _Atomic int64_t joined;
    _Atomic int64_t bar_count, bar_gen;
    _Atomic int64_t need[MAX_RANKS];
} shm_hdr;

struct ncclComm {
    char path[NCCL_UNIQUE_ID_BYTES];
    int fd, n, rank, nsplit;
    shm_hdr *h;
    unsigned char *data;   /* n slots of slot_cap bytes */
    size_t slot_cap;
    _Atomic int aborted;
    _Atomic int async;     /* ncclResult_t of the first failed operation */
    char msg[256];
    double hang_s;
    struct ncclComm *next_aborted;
};

enum { OP_ALLREDUCE, OP_ALLGATHER, OP_REDUCE_SCATTER, OP_SEND, OP_RECV };

typedef struct op {
    int kind;
    const void *in;
    void *out;
    size_t count;
    ncclDataType_t type;
    int peer;
} op;

typedef struct group {
    struct ncclComm *c;
    cudaStream_t stream;
    int n, cap;
    op *ops;
} group;

static __thread int group_depth;
static __thread group pending;
static __thread char last_msg[256];
static pthread_mutex_t aborted_mu = PTHREAD_MUTEX_INITIALIZER;
static struct ncclComm *aborted_comms;   /* kept: a worker may still be inside one */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

__attribute__((format(printf, 3, 4)))
static ncclResult_t fail(struct ncclComm *c, ncclResult_t r, const char *fmt, ...)
{
    static const char who[] = "stand-in NCCL: ";
    char m[256];
    memcpy(m, who, sizeof who);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m + sizeof who - 1, sizeof m - sizeof who + 1, fmt, ap);
    va_end(ap);
    memcpy(last_msg, m, sizeof m);
    if (c) {
        int none = ncclSuccess;
        if (atomic_compare_exchange_strong(&c->async, &none, (int)r))
            memcpy(c->msg, m, sizeof m);
    }
    return r;
}

static size_t type_bytes(ncclDataType_t t)
{
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

static int type_sums(ncclDataType_t t)
{
    return t == ncclFloat32 || t == ncclFloat64 || t == ncclInt32 || t == ncclInt64;
}

/* ---- barrier and slots ---------------------------------------------------- */
static ncclResult_t barrier(struct ncclComm *c)
{
    if (c->n == 1)
        return ncclSuccess;
    int64_t g = atomic_load(&c->h->bar_gen);   /* cannot move before this rank arrives */
    if (atomic_fetch_add(&c->h->bar_count, 1) == c->n - 1) {
        atomic_store(&c->h->bar_count, 0);
        atomic_fetch_add(&c->h->bar_gen, 1);
        return ncclSuccess;
    }
    double t0 = now_s();
    for (long spin = 0; atomic_load(&c->h->bar_gen) == g; spin++) {
        if (atomic_load(&c->aborted))
            return fail(c, ncclSystemError, "rank %d: communicator aborted", c->rank);
        if (spin < 200) {
            sched_yield();
            continue;
        }
        struct timespec ts = {0, 50000L};
        nanosleep(&ts, NULL);
        if (now_s() - t0 > c->hang_s)
            return fail(c, ncclRemoteError, "rank %d: no peer arrived for %g s (STANDIN_NCCL_HANG_S)",
                        c->rank, c->hang_s);
    }
    return ncclSuccess;
}

/* Every rank posts its need; all grow the slots to the same size. */
static ncclResult_t agree_slots(struct ncclComm *c, size_t need)
{
    atomic_store(&c->h->need[c->rank], (int64_t)need);
    ncclResult_t r = barrier(c);
    if (r != ncclSuccess)
        return r;
    size_t most = 0;
    for (int q = 0; q < c->n; q++)
        if ((size_t)atomic_load(&c->h->need[q]) > most)
            most = (size_t)atomic_load(&c->h->need[q]);
    if (most <= c->slot_cap)
        return ncclSuccess;
    size_t cap = c->slot_cap * 2 > most ? c->slot_cap * 2 : most;   /* same on every rank */
    cap = (cap + 4095) / 4096 * 4096;
    if (c->data)
        munmap(c->data, c->slot_cap * (size_t)c->n);
    c->data = NULL;
    c->slot_cap = 0;
    if (ftruncate(c->fd, (off_t)(HDR_BYTES + cap * (size_t)c->n)))
        return fail(c, ncclSystemError, "rank %d: cannot grow %s", c->rank, c->path);
    void *p = mmap(NULL, cap * (size_t)c->n, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, HDR_BYTES);
    if (p == MAP_FAILED)
        return fail(c, ncclSystemError, "rank %d: cannot map %s", c->rank, c->path);
    c->data = p;
    c->slot_cap = cap;
    return ncclSuccess;
}

static unsigned char *slot(struct ncclComm *c, int q)
{
    return c->data + (size_t)q * c->slot_cap;
}

/* out[i] = sum over ranks q (in order) of the slot of q at element first + i */
static void sum_slots(struct ncclComm *c, ncclDataType_t t, size_t first, size_t count, void *out)
{
#define SUM_AS(T)                                                                      \
    for (size_t i = 0; i < count; i++) {                                               \
        T s = ((const T *)slot(c, 0))[first + i];                                      \
        for (int q = 1; q < c->n; q++)                                                 \
            s += ((const T *)slot(c, q))[first + i];                                   \
        ((T *)out)[i] = s;                                                             \
    }
    switch (t) {
    case ncclFloat32: SUM_AS(float) break;
    case ncclFloat64: SUM_AS(double) break;
    case ncclInt32: SUM_AS(int32_t) break;
    default: SUM_AS(int64_t) break;
    }
#undef SUM_AS
}

/* ---- running a group on the stream's worker ------------------------------- */
static ncclResult_t run_collective(struct ncclComm *c, const op *o)
{
    size_t eb = type_bytes(o->type), b = o->count * eb;
    size_t in_b = o->kind == OP_REDUCE_SCATTER ? b * (size_t)c->n : b;
    ncclResult_t r = agree_slots(c, in_b);
    if (r != ncclSuccess)
        return r;
    if (in_b)
        memcpy(slot(c, c->rank), o->in, in_b);
    if ((r = barrier(c)) != ncclSuccess)
        return r;
    if (o->kind == OP_ALLREDUCE)
        sum_slots(c, o->type, 0, o->count, o->out);
    else if (o->kind == OP_REDUCE_SCATTER)
        sum_slots(c, o->type, (size_t)c->rank * o->count, o->count, o->out);
    else
        for (int q = 0; q < c->n; q++)
            memcpy((unsigned char *)o->out + (size_t)q * b, slot(c, q), b);
    return barrier(c);
}

/* All sends and receives of a group as one exchange: a slot is a table
 * (offset, bytes) per destination, then the data. */
static ncclResult_t run_p2p(struct ncclComm *c, const op *ops, int n)
{
    size_t table = 2 * sizeof(int64_t) * (size_t)c->n, need = table;
    for (int i = 0; i < n; i++)
        if (ops[i].kind == OP_SEND)
            need += ops[i].count * type_bytes(ops[i].type);
    ncclResult_t r = agree_slots(c, need);
    if (r != ncclSuccess)
        return r;
    int64_t *tab = (int64_t *)slot(c, c->rank);
    memset(tab, 0, table);
    size_t at = table;
    for (int i = 0; i < n; i++) {
        if (ops[i].kind != OP_SEND)
            continue;
        size_t b = ops[i].count * type_bytes(ops[i].type);
        if (tab[2 * ops[i].peer + 1])
            return fail(c, ncclInvalidUsage, "rank %d: two sends to rank %d in one group (the "
                        "stand-in takes one)", c->rank, ops[i].peer);
        tab[2 * (int64_t)ops[i].peer] = (int64_t)at;
        tab[2 * ops[i].peer + 1] = (int64_t)b;
        memcpy(slot(c, c->rank) + at, ops[i].in, b);
        at += b;
    }
    if ((r = barrier(c)) != ncclSuccess)
        return r;
    for (int i = 0; i < n; i++) {
        if (ops[i].kind != OP_RECV)
            continue;
        const int64_t *theirs = (const int64_t *)slot(c, ops[i].peer);
        size_t b = ops[i].count * type_bytes(ops[i].type);
        if ((size_t)theirs[2 * c->rank + 1] != b)
            return fail(c, ncclInvalidUsage, "rank %d expects %zu bytes from rank %d, which sends "
                        "%lld", c->rank, b, ops[i].peer, (long long)theirs[2 * c->rank + 1]);
        memcpy(ops[i].out, slot(c, ops[i].peer) + theirs[2 * (int64_t)c->rank], b);
    }
    return barrier(c);
}

static void run_group(void *arg)
{
    group *g = arg;
    struct ncclComm *c = g->c;
    if (getenv("STANDIN_NCCL_TRACE"))   /* one line per operation, for debugging a test */
        for (int i = 0; i < g->n; i++)
            fprintf(stderr, "stand-in NCCL: comm %s rank %d/%d: group %p op %d count %zu type %d "
                    "peer %d in %p out %p\n", c->path, c->rank, c->n, arg, g->ops[i].kind, g->ops[i].count,
                    (int)g->ops[i].type, g->ops[i].peer, g->ops[i].in, g->ops[i].out);
    if (atomic_load(&c->async) != ncclSuccess || atomic_load(&c->aborted))
        return;   /* a failed communicator runs nothing more */
    int p2p = 0;
    for (int i = 0; i < g->n; i++) {
        if (g->ops[i].kind == OP_SEND || g->ops[i].kind == OP_RECV)
            p2p = 1;
        else if (run_collective(c, &g->ops[i]) != ncclSuccess)
            return;
    }
    if (p2p)
        run_p2p(c, g->ops, g->n);
}

static void drop_group(void *arg)
{
    group *g = arg;
    free(g->ops);
    free(g);
}

static ncclResult_t add_op(const op *o, struct ncclComm *c, cudaStream_t s)
{
    if (!c)
        return fail(NULL, ncclInvalidArgument, "NULL communicator");
    if (atomic_load(&c->aborted))
        return fail(c, ncclInvalidUsage, "rank %d: communicator was aborted", c->rank);
    if (!type_bytes(o->type))
        return fail(c, ncclInvalidArgument, "data type %d is not supported", (int)o->type);
    if ((o->kind == OP_SEND || o->kind == OP_RECV) && (o->peer < 0 || o->peer >= c->n))
        return fail(c, ncclInvalidArgument, "peer %d out of range (%d ranks)", o->peer, c->n);
    group *g = &pending;
    if (g->n && (g->c != c || g->stream != s))
        return fail(c, ncclInvalidUsage, "one communicator and stream per group in the stand-in");
    if (g->n == g->cap) {
        int cap = g->cap ? 2 * g->cap : 16;
        op *p = realloc(g->ops, (size_t)cap * sizeof *p);
        if (!p)
            return fail(c, ncclSystemError, "out of memory");
        g->ops = p;
        g->cap = cap;
    }
    g->c = c;
    g->stream = s;
    g->ops[g->n++] = *o;
    return group_depth ? ncclSuccess : ncclGroupEnd();
}

ncclResult_t ncclGroupStart(void)
{
    group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void)
{
    if (group_depth > 0)
        group_depth--;
    if (group_depth > 0 || pending.n == 0)
        return ncclSuccess;
    group *g = malloc(sizeof *g);
    if (!g)
        return fail(pending.c, ncclSystemError, "out of memory");
    *g = pending;
    memset(&pending, 0, sizeof pending);
    if (standin_enqueue(g->stream, run_group, g, drop_group))
        return fail(g->c, ncclSystemError, "cannot queue on the stream");
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *in, void *out, size_t count, ncclDataType_t type,
                           ncclRedOp_t red, ncclComm_t c, cudaStream_t s)
{
    if (red != ncclSum || !type_sums(type))
        return fail(c, ncclInvalidArgument, "only sums of float, double, int32, int64");
    op o = {OP_ALLREDUCE, in, out, count, type, 0};
    return add_op(&o, c, s);
}

ncclResult_t ncclReduceScatter(const void *in, void *out, size_t count, ncclDataType_t type,
                               ncclRedOp_t red, ncclComm_t c, cudaStream_t s)
{
    if (red != ncclSum || !type_sums(type))
        return fail(c, ncclInvalidArgument, "only sums of float, double, int32, int64");
    op o = {OP_REDUCE_SCATTER, in, out, count, type, 0};
    return add_op(&o, c, s);
}

ncclResult_t ncclAllGather(const void *in, void *out, size_t count, ncclDataType_t type,
                           ncclComm_t c, cudaStream_t s)
{
    op o = {OP_ALLGATHER, in, out, count, type, 0};
    return add_op(&o, c, s);
}

ncclResult_t ncclSend(const void *in, size_t count, ncclDataType_t type, int peer, ncclComm_t c,
                      cudaStream_t s)
{
    op o = {OP_SEND, in, NULL, count, type, peer};
    return add_op(&o, c, s);
}

ncclResult_t ncclRecv(void *out, size_t count, ncclDataType_t type, int peer, ncclComm_t c,
                      cudaStream_t s)
{
    op o = {OP_RECV, NULL, out, count, type, peer};
    return add_op(&o, c, s);
}

/* ---- communicators ------------------------------------------------------ */
ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    static _Atomic int made;
    const char *dir = getenv("STANDIN_NCCL_DIR");
    if (!dir || !*dir)
        dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    memset(id, 0, sizeof *id);
    int n = snprintf(id->internal, sizeof id->internal, "%s/standin-nccl-%d-%d-%ld", dir,
                     (int)getpid(), atomic_fetch_add(&made, 1), (long)(now_s() * 1e3) % 1000000);
    if (n < 0 || n > 80)
        return fail(NULL, ncclInvalidArgument, "STANDIN_NCCL_DIR is too long: %s", dir);
    return ncclSuccess;
}

static ncclResult_t open_comm(ncclComm_t *out, int n, const char *path, int rank)
{
    *out = NULL;
    if (n < 1 || n > MAX_RANKS || rank < 0 || rank >= n)
        return fail(NULL, ncclInvalidArgument, "rank %d of %d ranks (the stand-in takes up to %d)",
                    rank, n, MAX_RANKS);
    if (path[0] != '/' || !memchr(path, 0, NCCL_UNIQUE_ID_BYTES))
        return fail(NULL, ncclInvalidArgument, "not a stand-in unique id");
    struct ncclComm *c = calloc(1, sizeof *c);
    if (!c)
        return fail(NULL, ncclSystemError, "out of memory");
    snprintf(c->path, sizeof c->path, "%s", path);
    c->n = n;
    c->rank = rank;
    const char *h = getenv("STANDIN_NCCL_HANG_S");
    c->hang_s = h && atof(h) > 0 ? atof(h) : 600.0;
    c->fd = open(path, O_RDWR | O_CREAT, 0600);
    struct stat st;
    if (c->fd < 0 || fstat(c->fd, &st) ||
        (st.st_size < HDR_BYTES && ftruncate(c->fd, HDR_BYTES))) {
        if (c->fd >= 0)
            close(c->fd);
        free(c);
        return fail(NULL, ncclSystemError, "cannot open %s", path);
    }
    void *p = mmap(NULL, HDR_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
    if (p == MAP_FAILED) {
        close(c->fd);
        free(c);
        return fail(NULL, ncclSystemError, "cannot map %s", path);
    }
    c->h = p;
    atomic_fetch_add(&c->h->joined, 1);
    double t0 = now_s();
    while (atomic_load(&c->h->joined) < n) {
        struct timespec ts = {0, 200000L};
        nanosleep(&ts, NULL);
        if (now_s() - t0 > c->hang_s) {
            munmap(c->h, HDR_BYTES);
            close(c->fd);
            free(c);
            return fail(NULL, ncclRemoteError, "rank %d: not every rank joined %s", rank, path);
        }
    }
    if (rank == 0)
        unlink(path);   /* everyone has it open */
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *out, int n, ncclUniqueId id, int rank)
{
    return open_comm(out, n, id.internal, rank);
}

/* Collective over the parent, run on the calling thread (as at start-up,
 * when the parent's stream is idle). */
ncclResult_t ncclCommSplit(ncclComm_t c, int color, int key, ncclComm_t *out,
                           ncclConfig_t *config)
{
    (void)config;
    *out = NULL;
    if (!c)
        return fail(NULL, ncclInvalidArgument, "NULL communicator");
    ncclResult_t r = agree_slots(c, 2 * sizeof(int));
    if (r != ncclSuccess)
        return r;
    int *mine = (int *)slot(c, c->rank);
    mine[0] = color;
    mine[1] = key;
    if ((r = barrier(c)) != ncclSuccess)
        return r;
    int size = 0, index = 0;
    for (int q = 0; q < c->n; q++) {
        const int *t = (const int *)slot(c, q);
        if (color == NCCL_SPLIT_NOCOLOR || t[0] != color)
            continue;
        size++;
        if (t[1] < key || (t[1] == key && q < c->rank))
            index++;
    }
    if ((r = barrier(c)) != ncclSuccess)
        return r;
    int split = c->nsplit++;
    if (color == NCCL_SPLIT_NOCOLOR)
        return ncclSuccess;
    char path[NCCL_UNIQUE_ID_BYTES];
    snprintf(path, sizeof path, "%.80s.s%d.c%d", c->path, split, color);
    return open_comm(out, size, path, index);
}

ncclResult_t ncclCommAbort(ncclComm_t c)
{
    if (!c)
        return ncclSuccess;
    atomic_store(&c->aborted, 1);
    pthread_mutex_lock(&aborted_mu);
    c->next_aborted = aborted_comms;
    aborted_comms = c;
    pthread_mutex_unlock(&aborted_mu);
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c)
{
    if (!c)
        return ncclSuccess;
    if (c->data)
        munmap(c->data, c->slot_cap * (size_t)c->n);
    munmap(c->h, HDR_BYTES);
    close(c->fd);
    free(c);
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *r)
{
    *r = c ? (ncclResult_t)atomic_load(&c->async) : ncclInvalidArgument;
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t c, int *count)
{
    *count = c->n;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t c, int *rank)
{
    *rank = c->rank;
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "unhandled system error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t c)
{
    return c && c->msg[0] ? c->msg : last_msg;
}
