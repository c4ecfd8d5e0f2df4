/* standin.h - what the stand-in NCCL (nccl.c) needs of the stand-in CUDA
 * runtime (cudart.c): work queued on a stream.  Test code only. */
#ifndef STANDIN_H
#define STANDIN_H

#include <cuda_runtime.h>

typedef struct standin_task {
    void (*run)(void *arg);
    void *arg;
    void (*drop)(void *arg);   /* frees arg after run; may be NULL */
    struct standin_task *next;
} standin_task;

/* Runs run(arg) in order on the stream's worker thread, or now on the
 * calling thread when s is not a created stream (the host).  0 or -1. */
int standin_enqueue(cudaStream_t s, void (*run)(void *), void *arg, void (*drop)(void *));

#endif
