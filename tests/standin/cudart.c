/* cudart.c - a host-memory stand-in for the CUDA runtime, enough of it for
 * runtime/comm_backends/nccl.c and tests/standin/moek_cuda.c, so that the
 * NCCL backend's own logic (streams, events, staging, the watchdog) runs on
 * a machine without a GPU (tests/cli/test_nccl_standin.sh).
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
 * - the last error is per thread and cleared by cudaGetLastError.
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
    struct CUstream_st *next;   /* the registry of created streams */
};

struct CUevent_st {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t recorded, done;   /* records issued / the latest one reached */
};

typedef struct alloc_range {
    uintptr_t lo, hi;
    struct alloc_range *next;
} alloc_range;

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct CUstream_st *streams;
static alloc_range *allocs;
static __thread cudaError_t last_error = cudaSuccess;

static cudaError_t ret(cudaError_t e)
{
    if (e != cudaSuccess)
        last_error = e;
    return e;
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
    if (s->tail)
        s->tail->next = t;
    else
        s->head = t;
    s->tail = t;
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

cudaError_t cudaDeviceSynchronize(void)
{
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void)
{
    return last_error;
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

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
    (void)kind;
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
        return cudaSuccess;
    pthread_mutex_lock(&s->mu);
    while (s->head || s->busy)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return cudaSuccess;
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

cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status)
{
    (void)s;
    *status = cudaStreamCaptureStatusNone;   /* the stand-in kernel library never captures */
    return cudaSuccess;
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
    event_mark *k = malloc(sizeof *k);
    if (!k)
        return ret(cudaErrorMemoryAllocation);
    pthread_mutex_lock(&e->mu);
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
