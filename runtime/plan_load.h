/* plan_load.h - map a plan.bin and validate every byte of it before use.
 *
 * After plan_load()/plan_parse() returns 0 every index, offset, count and
 * string in the plan is known to be in range, so the rest of the runtime
 * reads the records directly without further checks.  Errors are one line,
 * "<what is wrong>; <what to do>", for the caller to prefix with
 * "run: <path>: ". */
#ifndef MOEC_PLAN_LOAD_H
#define MOEC_PLAN_LOAD_H

#include <stddef.h>
#include <stdint.h>

#include "plan.h"

typedef struct plan_file {
    void *map;                 /* owned mapping (plan_load), NULL for plan_parse */
    size_t map_bytes;
    const uint8_t *base;
    uint64_t size;
    const plan_header *hdr;
    const plan_train *train;
    const char *str;        uint64_t nstr;
    const plan_pool *pools;     uint64_t npools;
    const plan_tensor *tensors; uint64_t ntensors;
    const plan_lib *libs;       uint64_t nlibs;
    const plan_kernel *kernels; uint64_t nkernels;
    const plan_op *ops;         uint64_t nops;
    const plan_arg *args;       uint64_t nargs;
    const plan_param *params;   uint64_t nparams;
} plan_file;

/* Validates buf (n bytes, 8-byte aligned, kept alive by the caller). */
int plan_parse(const void *buf, uint64_t n, plan_file *pf, char *err, size_t errlen);
/* Maps path read-only and validates it; plan_close() unmaps. */
int plan_load(const char *path, plan_file *pf, char *err, size_t errlen);
void plan_close(plan_file *pf);

/* A validated string offset -> C string. */
const char *plan_str(const plan_file *pf, uint32_t off);
/* First tensor with this role, or -1. */
int64_t plan_find_role(const plan_file *pf, uint32_t role);
uint64_t plan_tensor_numel(const plan_tensor *t);

const char *plan_dtype_name(uint32_t dt);
const char *plan_storage_name(uint32_t st);
const char *plan_role_name(uint32_t role);
const char *plan_phase_name(uint32_t phase);
const char *plan_arg_kind_name(uint32_t kind);

#endif
