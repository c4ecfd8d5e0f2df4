/* cudart.c - a host-memory stand-in for the CUDA runtime, enough of it for
 * runtime/comm_backends/nccl.c, tests/standin/moek_cuda.c and the CUDA
 * kernels run by the emulator (cuemu.h), so that the NCCL backend's own
 * logic (streams, events, staging, the watchdog) and the kernel library
 * run on a machine without a GPU (tests/cli/test_nccl_standin.sh,
 * tests/cli/test_cuda_emulated.sh).
 *
 * What it keeps of CUDA's semantics, because the backend relies on them:
 * - a created stream is a worker thread running its queue in order, so a
 *   collective really is asynchronous to the host and an event on it
 *   completes only when the worker reaches it;
 * - any other stream handle (cudaStreamPerThread, which the stand-in kernel
 *   library hands out) is "the host": the CPU kernels have finished when
 *   the call returns, so a record on it completes at once and a wait on it
 *   blocks the calling thread until the event completes;
 * - cudaMalloc memory is known to cudaPointerGetAttributes (device), any
 *   other address is unregistered host memory, as on CUDA 11 and later;
 * - the last error is per thread and cleared by cudaGetLastError; a fault
 *   in queued work (standin_device_fault) is sticky and process-wide;
 * - stream capture (relaxed): work queued on a capturing stream is
 *   recorded, not run, and a launched graph runs it again, in order, on
 *   the launch stream.  An event recorded inside a capture belongs to it;
 *   a stream that waits on such an event joins the capture (CUDA's fork),
 *   and its work goes into the same graph.  The graph keeps the order the
 *   work was issued in, one valid order of CUDA's graph.  The capture
 *   ends, for every stream in it, when its first stream ends it.  A wait
 *   inside a capture on an event from outside it is refused
 *   (cudaErrorStreamCaptureIsolation), so is a capture of the host.
 * Memory from cudaMalloc is zeroed (the kernel library's alloc promises it).
 * Like the real runtime it has process-wide state (streams, allocations).
 *
 * Built by the test with -Wl,-soname set to the name libmoec_comm_nccl.so
 * needs (libcudart.so.N) and a version node of that name. */
#include <cuda_runtime.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "standin.h"

struct CUstream_st {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    standin_task *head, *tail;
    int busy, stop;
    struct capture *cap;        /* the capture this stream is in, or NULL */
    struct CUstream_st *next;   /* the registry of created streams */
};

/* One capture: the work of its streams in issue order. */
typedef struct capture {
    pthread_mutex_t mu;
    uint64_t id;                /* events name their capture by id */
    struct CUstream_st *origin;
    standin_task *head, *tail;
    int invalid;                /* a forbidden call happened: EndCapture fails */
} capture;

/* A captured graph; an instantiated one shares its task list. */
struct CUgraph_st {
    pthread_mutex_t mu;
    int refs;
    standin_task *head;
};

struct CUgraphExec_st {
    struct CUgraph_st *g;
};

typedef struct func_attr {
    const void *fn;
    size_t max_shared;
    struct func_attr *next;
} func_attr;

struct CUevent_st {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t recorded, done;   /* records issued / the latest one reached */
    uint64_t capture;          /* recorded last inside this capture; 0 = outside */
};

typedef struct alloc_range {
    uintptr_t lo, hi;
    struct alloc_range *next;
} alloc_range;

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct CUstream_st *streams;
static alloc_range *allocs;
static func_attr *func_attrs;
static __thread cudaError_t last_error = cudaSuccess;
static cudaError_t sticky = cudaSuccess;   /* under reg_mu */
static uint64_t captures;                   /* ids handed out, under reg_mu */

static cudaError_t ret(cudaError_t e)
{
    if (e != cudaSuccess)
        last_error = e;
    return e;
}

cudaError_t standin_set_error(cudaError_t e)
{
    return ret(e);
}

void standin_device_fault(cudaError_t e)
{
    pthread_mutex_lock(&reg_mu);
    if (sticky == cudaSuccess)
        sticky = e;
    pthread_mutex_unlock(&reg_mu);
}

static cudaError_t sticky_error(void)
{
    pthread_mutex_lock(&reg_mu);
    cudaError_t e = sticky;
    pthread_mutex_unlock(&reg_mu);
    return e;
}

size_t standin_func_shared_limit(const void *fn)
{
    pthread_mutex_lock(&reg_mu);
    const func_attr *a = func_attrs;
    while (a && a->fn != fn)
        a = a->next;
    size_t n = a ? a->max_shared : 0;
    pthread_mutex_unlock(&reg_mu);
    return n;
}

static int is_worker(cudaStream_t s)
{
    pthread_mutex_lock(&reg_mu);
    struct CUstream_st *w = streams;
    while (w && w != s)
        w = w->next;
    pthread_mutex_unlock(&reg_mu);
    return w != NULL;
}

static void *worker_main(void *arg)
{
    struct CUstream_st *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        if (!s->head)
            break;   /* stopped and drained */
        standin_task *t = s->head;
        s->head = t->next;
        if (!s->head)
            s->tail = NULL;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        t->run(t->arg);
        if (t->drop)
            t->drop(t->arg);
        free(t);
        pthread_mutex_lock(&s->mu);
        s->busy = 0;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void task_append(standin_task **head, standin_task **tail, standin_task *t)
{
    if (*tail)
        (*tail)->next = t;
    else
        *head = t;
    *tail = t;
}

static void invalidate(capture *c)
{
    pthread_mutex_lock(&c->mu);
    c->invalid = 1;
    pthread_mutex_unlock(&c->mu);
}

int standin_enqueue(cudaStream_t s, void (*run)(void *), void *arg, void (*drop)(void *))
{
    if (!s || !is_worker(s)) {   /* the host stream: the work happens now */
        run(arg);
        if (drop)
            drop(arg);
        return 0;
    }
    standin_task *t = calloc(1, sizeof *t);
    if (!t)
        return -1;
    t->run = run;
    t->arg = arg;
    t->drop = drop;
    pthread_mutex_lock(&s->mu);
    capture *c = s->cap;
    if (c) {   /* recorded for the graph, or dropped if the capture failed */
        pthread_mutex_unlock(&s->mu);
        pthread_mutex_lock(&c->mu);
        int invalid = c->invalid;
        if (!invalid)
            task_append(&c->head, &c->tail, t);
        pthread_mutex_unlock(&c->mu);
        if (invalid) {
            if (drop)
                drop(arg);
            free(t);
        }
        return 0;
    }
    task_append(&s->head, &s->tail, t);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* ---- devices and errors ------------------------------------------------ */
cudaError_t cudaGetDeviceCount(int *count)
{
    const char *v = getenv("STANDIN_GPUS");
    *count = v ? atoi(v) : 1;
    return *count > 0 ? cudaSuccess : ret(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int device)
{
    int n = 0;
    cudaGetDeviceCount(&n);
    return device >= 0 && device < n ? cudaSuccess : ret(cudaErrorInvalidDevice);
}

cudaError_t cudaGetDevice(int *device)
{
    *device = 0;
    return cudaSuccess;
}

/* an H100's figures, for what the kernel library asks */
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device)
{
    if (device != 0)
        return ret(cudaErrorInvalidDevice);
    switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return ret(cudaErrorInvalidValue);
    }
}

cudaError_t cudaDeviceSynchronize(void)
{
    pthread_mutex_lock(&reg_mu);
    struct CUstream_st *w = streams;
    pthread_mutex_unlock(&reg_mu);
    for (; w; w = w->next)
        cudaStreamSynchronize(w);
    return ret(sticky_error());
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e != cudaSuccess ? e : sticky_error();
}

cudaError_t cudaPeekAtLastError(void)
{
    return last_error != cudaSuccess ? last_error : sticky_error();
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error (stand-in)";
    case cudaErrorNotReady: return "device not ready (stand-in)";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (stand-in)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (stand-in)";
    case cudaErrorMemoryAllocation: return "out of memory (stand-in)";
    case cudaErrorInvalidValue: return "invalid argument (stand-in)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (stand-in)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (stand-in)";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch (stand-in)";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing (stand-in)";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture (stand-in)";
    case cudaErrorStreamCaptureIsolation: return "dependency created on uncaptured work in another stream (stand-in)";
    default: return "error (stand-in)";
    }
}

const char *cudaGetErrorName(cudaError_t e)
{
    return cudaGetErrorString(e);
}

/* ---- memory --------------------------------------------------------------- */
cudaError_t cudaMalloc(void **p, size_t bytes)
{
    *p = NULL;
    alloc_range *r = malloc(sizeof *r);
    void *m = NULL;
    if (!r || posix_memalign(&m, 256, bytes ? bytes : 1)) {
        free(r);
        return ret(cudaErrorMemoryAllocation);
    }
    memset(m, 0, bytes);
    r->lo = (uintptr_t)m;
    r->hi = r->lo + (bytes ? bytes : 1);
    pthread_mutex_lock(&reg_mu);
    r->next = allocs;
    allocs = r;
    pthread_mutex_unlock(&reg_mu);
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p)
{
    if (!p)
        return cudaSuccess;
    pthread_mutex_lock(&reg_mu);
    alloc_range **at = &allocs;
    while (*at && (*at)->lo != (uintptr_t)p)
        at = &(*at)->next;
    alloc_range *r = *at;
    if (r)
        *at = r->next;
    pthread_mutex_unlock(&reg_mu);
    if (!r)
        return ret(cudaErrorInvalidValue);
    free(r);
    free(p);
    return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *p)
{
    memset(a, 0, sizeof *a);
    uintptr_t u = (uintptr_t)p;
    pthread_mutex_lock(&reg_mu);
    const alloc_range *r = allocs;
    while (r && !(u >= r->lo && u < r->hi))
        r = r->next;
    pthread_mutex_unlock(&reg_mu);
    a->type = r ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
    a->device = 0;
    a->devicePointer = r ? (void *)p : NULL;
    a->hostPointer = r ? NULL : (void *)p;
    return cudaSuccess;
}

/* Synchronous calls wait for the created streams, as the legacy default
 * stream does for blocking streams; the kernel library's streams are
 * non-blocking, but its callers synchronise first anyway. */
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
    (void)kind;
    cudaError_t e = sticky_error();
    if (e != cudaSuccess)
        return ret(e);
    memmove(dst, src, bytes);
    return cudaSuccess;
}

typedef struct copy_job {
    void *dst;
    const void *src;
    size_t n;
} copy_job;

static void run_copy(void *arg)
{
    copy_job *j = arg;
    memmove(j->dst, j->src, j->n);
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                            cudaStream_t s)
{
    (void)kind;
    copy_job *j = malloc(sizeof *j);
    if (!j)
        return ret(cudaErrorMemoryAllocation);
    *j = (copy_job){dst, src, bytes};
    return standin_enqueue(s, run_copy, j, free) ? ret(cudaErrorMemoryAllocation) : cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t bytes)
{
    memset(p, v, bytes);
    return cudaSuccess;
}

typedef struct set_job {
    void *p;
    int v;
    size_t n;
} set_job;

static void run_set(void *arg)
{
    set_job *j = arg;
    memset(j->p, j->v, j->n);
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s)
{
    set_job *j = malloc(sizeof *j);
    if (!j)
        return ret(cudaErrorMemoryAllocation);
    *j = (set_job){p, v, bytes};
    return standin_enqueue(s, run_set, j, free) ? ret(cudaErrorMemoryAllocation) : cudaSuccess;
}

/* ---- streams ------------------------------------------------------------ */
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *out, unsigned int flags)
{
    (void)flags;
    struct CUstream_st *s = calloc(1, sizeof *s);
    if (!s)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->th, NULL, worker_main, s)) {
        free(s);
        return ret(cudaErrorMemoryAllocation);
    }
    pthread_mutex_lock(&reg_mu);
    s->next = streams;
    streams = s;
    pthread_mutex_unlock(&reg_mu);
    *out = s;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *out)
{
    return cudaStreamCreateWithFlags(out, 0);
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    if (!is_worker(s))
        return ret(sticky_error());
    pthread_mutex_lock(&s->mu);
    if (s->cap) {   /* not permitted while capturing; the capture is lost */
        capture *c = s->cap;
        pthread_mutex_unlock(&s->mu);
        invalidate(c);
        return ret(cudaErrorStreamCaptureUnsupported);
    }
    while (s->head || s->busy)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return ret(sticky_error());
}

/* Like CUDA, returns at once; the worker finishes the queue, then ends. */
cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    pthread_mutex_lock(&reg_mu);
    struct CUstream_st **at = &streams;
    while (*at && *at != s)
        at = &(*at)->next;
    if (*at)
        *at = s->next;
    pthread_mutex_unlock(&reg_mu);
    if (!s)
        return ret(cudaErrorInvalidValue);
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
    return cudaSuccess;
}

/* ---- capture and graphs ------------------------------------------------------ */
static capture *stream_capture(cudaStream_t s)
{
    if (!is_worker(s))
        return NULL;
    pthread_mutex_lock(&s->mu);
    capture *c = s->cap;
    pthread_mutex_unlock(&s->mu);
    return c;
}

/* 1 capturing, -1 in a capture that failed, 0 not capturing */
static int capturing(cudaStream_t s)
{
    capture *c = stream_capture(s);
    if (!c)
        return 0;
    pthread_mutex_lock(&c->mu);
    int bad = c->invalid;
    pthread_mutex_unlock(&c->mu);
    return bad ? -1 : 1;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status)
{
    int c = capturing(s);
    *status = c > 0 ? cudaStreamCaptureStatusActive
              : c < 0 ? cudaStreamCaptureStatusInvalidated
                      : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode)
{
    (void)mode;
    if (!is_worker(s))
        return ret(cudaErrorStreamCaptureUnsupported);
    capture *c = calloc(1, sizeof *c);
    if (!c)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_init(&c->mu, NULL);
    c->origin = s;
    pthread_mutex_lock(&reg_mu);
    c->id = ++captures;
    pthread_mutex_unlock(&reg_mu);
    pthread_mutex_lock(&s->mu);
    int busy = s->cap != NULL;
    if (!busy)
        s->cap = c;
    pthread_mutex_unlock(&s->mu);
    if (busy) {
        pthread_mutex_destroy(&c->mu);
        free(c);
        return ret(cudaErrorIllegalState);
    }
    return cudaSuccess;
}

/* the live capture with this id (a stream is in it), or NULL */
static capture *capture_by_id(uint64_t id)
{
    capture *found = NULL;
    pthread_mutex_lock(&reg_mu);
    for (struct CUstream_st *w = streams; w && !found; w = w->next) {
        pthread_mutex_lock(&w->mu);
        if (w->cap && w->cap->id == id)
            found = w->cap;
        pthread_mutex_unlock(&w->mu);
    }
    pthread_mutex_unlock(&reg_mu);
    return found;
}

static void free_tasks(standin_task *t)
{
    while (t) {
        standin_task *next = t->next;
        if (t->drop)
            t->drop(t->arg);
        free(t);
        t = next;
    }
}

static void graph_unref(struct CUgraph_st *g)
{
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (!last)
        return;
    free_tasks(g->head);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph)
{
    *graph = NULL;
    capture *c = stream_capture(s);
    if (!c || c->origin != s)
        return ret(cudaErrorIllegalState);
    /* every stream in the capture leaves it */
    pthread_mutex_lock(&reg_mu);
    for (struct CUstream_st *w = streams; w; w = w->next) {
        pthread_mutex_lock(&w->mu);
        if (w->cap == c)
            w->cap = NULL;
        pthread_mutex_unlock(&w->mu);
    }
    pthread_mutex_unlock(&reg_mu);
    standin_task *head = c->head;
    int invalid = c->invalid;
    pthread_mutex_destroy(&c->mu);
    free(c);
    if (invalid) {
        free_tasks(head);
        return ret(cudaErrorStreamCaptureInvalidated);
    }
    struct CUgraph_st *g = calloc(1, sizeof *g);
    if (!g) {
        free_tasks(head);
        return ret(cudaErrorMemoryAllocation);
    }
    pthread_mutex_init(&g->mu, NULL);
    g->refs = 1;
    g->head = head;
    *graph = g;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g)
{
    if (!g)
        return ret(cudaErrorInvalidValue);
    graph_unref(g);
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *out, cudaGraph_t g, unsigned long long flags)
{
    (void)flags;
    *out = NULL;
    if (!g)
        return ret(cudaErrorInvalidValue);
    struct CUgraphExec_st *x = calloc(1, sizeof *x);
    if (!x)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_lock(&g->mu);
    g->refs++;
    pthread_mutex_unlock(&g->mu);
    x->g = g;
    *out = x;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t x)
{
    if (!x)
        return ret(cudaErrorInvalidValue);
    graph_unref(x->g);
    free(x);
    return cudaSuccess;
}

static void run_graph(void *arg)
{
    for (const standin_task *t = ((struct CUgraph_st *)arg)->head; t; t = t->next)
        t->run(t->arg);
}

static void drop_graph(void *arg)
{
    graph_unref(arg);
}

/* The launch holds the graph, so the exec may be destroyed while it runs. */
cudaError_t cudaGraphLaunch(cudaGraphExec_t x, cudaStream_t s)
{
    if (!x)
        return ret(cudaErrorInvalidValue);
    if (capturing(s))
        return ret(cudaErrorStreamCaptureUnsupported);
    pthread_mutex_lock(&x->g->mu);
    x->g->refs++;
    pthread_mutex_unlock(&x->g->mu);
    if (standin_enqueue(s, run_graph, x->g, drop_graph)) {
        graph_unref(x->g);
        return ret(cudaErrorMemoryAllocation);
    }
    return cudaSuccess;
}

/* ---- kernel attributes ------------------------------------------------------ */
cudaError_t cudaFuncSetAttribute(const void *fn, enum cudaFuncAttribute attr, int value)
{
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
        return cudaSuccess;
    if (!fn || value < 0 || value > 227 * 1024)
        return ret(cudaErrorInvalidValue);
    pthread_mutex_lock(&reg_mu);
    func_attr *a = func_attrs;
    while (a && a->fn != fn)
        a = a->next;
    if (!a && (a = calloc(1, sizeof *a)) != NULL) {
        a->fn = fn;
        a->next = func_attrs;
        func_attrs = a;
    }
    if (a)
        a->max_shared = (size_t)value;
    pthread_mutex_unlock(&reg_mu);
    return a ? cudaSuccess : ret(cudaErrorMemoryAllocation);
}

/* ---- events --------------------------------------------------------------- */
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *out, unsigned int flags)
{
    (void)flags;
    struct CUevent_st *e = calloc(1, sizeof *e);
    if (!e)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    *out = e;
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *out)
{
    return cudaEventCreateWithFlags(out, 0);
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    if (!e)
        return ret(cudaErrorInvalidValue);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
    return cudaSuccess;
}

typedef struct event_mark {
    cudaEvent_t e;
    uint64_t n;
} event_mark;

static void run_complete(void *arg)
{
    event_mark *k = arg;
    pthread_mutex_lock(&k->e->mu);
    if (k->n > k->e->done)
        k->e->done = k->n;
    pthread_cond_broadcast(&k->e->cv);
    pthread_mutex_unlock(&k->e->mu);
}

static void run_wait(void *arg)
{
    event_mark *k = arg;
    pthread_mutex_lock(&k->e->mu);
    while (k->e->done < k->n)
        pthread_cond_wait(&k->e->cv, &k->e->mu);
    pthread_mutex_unlock(&k->e->mu);
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    capture *c = stream_capture(s);
    if (c) {   /* a node of the graph: the streams that wait on it join the capture */
        pthread_mutex_lock(&e->mu);
        e->capture = c->id;
        pthread_mutex_unlock(&e->mu);
        return cudaSuccess;
    }
    event_mark *k = malloc(sizeof *k);
    if (!k)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_lock(&e->mu);
    e->capture = 0;
    k->e = e;
    k->n = ++e->recorded;
    pthread_mutex_unlock(&e->mu);
    return standin_enqueue(s, run_complete, k, free) ? ret(cudaErrorMemoryAllocation)
                                                     : cudaSuccess;
}

/* The stream waits for the event's latest record as of this call. */
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&e->mu);
    uint64_t from = e->capture;
    pthread_mutex_unlock(&e->mu);
    capture *mine = stream_capture(s);
    if (from) {   /* an event of a capture: join it (issue order keeps the dependency) */
        capture *c = capture_by_id(from);
        if (!c || (mine && mine != c)) {
            if (mine)
                invalidate(mine);
            return ret(cudaErrorStreamCaptureIsolation);
        }
        if (!mine && is_worker(s)) {
            pthread_mutex_lock(&s->mu);
            s->cap = c;
            pthread_mutex_unlock(&s->mu);
        }
        return is_worker(s) ? cudaSuccess : ret(cudaErrorStreamCaptureUnsupported);
    }
    if (mine) {   /* a dependency on work outside the capture */
        invalidate(mine);
        return ret(cudaErrorStreamCaptureIsolation);
    }
    event_mark *k = malloc(sizeof *k);
    if (!k)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_lock(&e->mu);
    k->e = e;
    k->n = e->recorded;
    pthread_mutex_unlock(&e->mu);
    return standin_enqueue(s, run_wait, k, free) ? ret(cudaErrorMemoryAllocation) : cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e)
{
    pthread_mutex_lock(&e->mu);
    int done = e->done >= e->recorded;
    pthread_mutex_unlock(&e->mu);
    return done ? cudaSuccess : cudaErrorNotReady;   /* NotReady is not sticky */
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    event_mark k = {e, 0};
    pthread_mutex_lock(&e->mu);
    k.n = e->recorded;
    pthread_mutex_unlock(&e->mu);
    run_wait(&k);
    return cudaSuccess;
}
