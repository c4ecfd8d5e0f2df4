/* standin.h - what the other stand-ins need of the stand-in CUDA runtime
 * (cudart.c): work queued on a stream (NCCL, cuBLAS, the CUDA-language
 * emulator), the last and sticky errors, and kernel attributes.  Test code
 * only. */
#ifndef STANDIN_H
#define STANDIN_H

#include <stddef.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct standin_task {
    void (*run)(void *arg);
    void *arg;
    void (*drop)(void *arg);   /* frees arg after run; may be NULL */
    struct standin_task *next;
} standin_task;

/* Runs run(arg) in order on the stream's worker thread, or now on the
 * calling thread when s is not a created stream (the host).  While s is
 * being captured, the task goes into the graph instead, and runs at each
 * launch of it.  0 or -1. */
int standin_enqueue(cudaStream_t s, void (*run)(void *), void *arg, void (*drop)(void *));

/* Records e as the calling thread's last error (what cudaGetLastError
 * returns next) and returns it. */
cudaError_t standin_set_error(cudaError_t e);

/* A fault while running queued work (a kernel that deadlocked): sticky,
 * returned by every later synchronising call, as on a GPU. */
void standin_device_fault(cudaError_t e);

/* The dynamic shared memory fn may use (cudaFuncSetAttribute), 0 if unset. */
size_t standin_func_shared_limit(const void *fn);

#ifdef __cplusplus
}
#endif

#endif
