/* exec.h - the executor: load the kernel libraries a plan needs, allocate
 * its pools on the device, and prepare every op's libffi call once so a step
 * is a walk over a flat array of calls. */
#ifndef MOEC_EXEC_H
#define MOEC_EXEC_H

#include <ffi.h>
#include <limits.h>
#include <stdio.h>

#include "../kernels/moek.h"
#include "plan_load.h"

typedef struct exec_opts {
    const char *device;           /* "cpu", "cuda" or NULL (cuda when usable, else cpu) */
    const char *plan_path;        /* user libraries may load from its directory */
    const char *exe_dir;          /* directory of the run binary ("" = none) */
    const char *const *allow_dirs;/* --allow-lib directories */
    int nallow;
    int64_t workspace_bytes;      /* at least this much; -1 = the device default (exec.c) */
    FILE *log;                    /* "loaded ..." lines; NULL = silent */
} exec_opts;

/* The device services every kernel library exports (kernels/moek.h). */
typedef struct exec_dev {
    int (*count)(void);
    int (*half_native)(void);   /* which of the plan's workspace figures it needs */
    int (*init)(moek_ctx *, int64_t, int64_t, char *, int64_t);
    void (*fini)(moek_ctx *);
    void *(*alloc)(const moek_ctx *, int64_t, char *, int64_t);
    void (*free)(const moek_ctx *, void *);
    int (*copy)(const moek_ctx *, void *, const void *, int64_t, int64_t, char *, int64_t);
    int (*sync)(const moek_ctx *, char *, int64_t);
    /* CUDA graphs; NULL when the library lacks them */
    int (*graph_begin)(const moek_ctx *, char *, int64_t);
    int (*graph_end)(const moek_ctx *, void **, char *, int64_t);
    int (*graph_launch)(const moek_ctx *, void *, char *, int64_t);
    void (*graph_free)(void *);
} exec_dev;

/* One captured range of phases (first..last) and how often it has run. */
typedef struct exec_graph {
    void *graph;                  /* instantiated graph; NULL until captured */
    int64_t runs;
    int eager;                    /* an op in the range waits on the host: never captured */
} exec_graph;

/* One prepared kernel call: everything ffi_call needs, bound at load. */
typedef struct exec_call {
    ffi_cif *cif;
    void (*fn)(void);
    void **avalues;
    uint32_t op;                  /* index into the plan's ops, for error messages */
} exec_call;

typedef union exec_slot { void *p; int64_t i; float f; double d; } exec_slot;

typedef struct exec_state {
    const plan_file *pf;
    char device[8];
    char kernel_dir[PATH_MAX];    /* where the device library was found */
    void *devlib;
    void **libs;                  /* per plan lib; libs[i] == devlib for "" */
    exec_dev dev;
    int dev_ready;
    moek_ctx ctx;
    const moek_ctx *ctxp;         /* what every call's first argument points at */
    int status;
    void **arena;                 /* per pool */
    ffi_cif *cifs;                /* per kernel */
    ffi_type **types;             /* per kernel, 1 + PLAN_MAX_KERNEL_ARGS */
    exec_call *calls;             /* ops grouped by phase, program order kept */
    uint64_t phase_begin[4];
    void **avalues;
    exec_slot *slots;
    int graphs_on;                /* cuda, not --no-graph, no capture has failed */
    FILE *warn, *log;
    exec_graph graphs[3][3];      /* [first phase][last phase] */
} exec_state;

int exec_open(exec_state *ex, const plan_file *pf, const exec_opts *o, char *err, size_t errlen);
/* Runs every op of one phase; a kernel error names the op and its .moe line. */
int exec_phase(exec_state *ex, uint32_t phase, char *err, size_t errlen);
/* CUDA graphs are on by default on cuda; on = 0 (--no-graph) turns them off.
 * warn gets the one "capture failed" line (default: opts.log). */
void exec_set_graphs(exec_state *ex, int on, FILE *warn);
/* Runs phases first..last (FORWARD..BACKWARD is one micro-step). On CUDA
 * the first run of a range is eager (the warm-up: lazy module loading,
 * cuBLAS's choices), the second captures the range as one CUDA graph and
 * launches it, later runs only launch it.  Inputs (tokens, targets, hyper,
 * loss_seed) are written with exec_write before the call, outside the graph:
 * the graph reads them at their fixed addresses.  A failed capture prints one
 * line on opts.warn and the run continues eagerly. */
int exec_run(exec_state *ex, uint32_t first, uint32_t last, char *err, size_t errlen);
/* Waits for the device and reports asynchronous errors and data errors the
 * kernels flagged (moek_device_sync), as "<what>: ...".  A data error is
 * traced to its op by re-running first..last eagerly, syncing after each op. */
int exec_check(exec_state *ex, const char *what, uint32_t first, uint32_t last, char *err,
               size_t errlen);
/* Host <-> tensor copies (bytes [off, off+n) of tensor t). */
int exec_read(exec_state *ex, uint64_t t, uint64_t off, void *host, uint64_t n, char *err,
              size_t errlen);
int exec_write(exec_state *ex, uint64_t t, uint64_t off, const void *host, uint64_t n, char *err,
               size_t errlen);
void exec_close(exec_state *ex);

/* "op 12 (rmsnorm (backward), model.moe:7:9)" for messages. */
void exec_describe_op(const plan_file *pf, uint64_t op, char *buf, size_t n);

#endif
