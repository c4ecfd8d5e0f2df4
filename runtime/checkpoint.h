/* checkpoint.h - safetensors checkpoints of every param, buffer and
 * optimizer-state tensor (by plan name) plus string metadata (step, RNG
 * state); written atomically, loaded strictly. */
#ifndef MOEC_CHECKPOINT_H
#define MOEC_CHECKPOINT_H

#include "exec.h"

typedef struct ckpt_meta { char key[32]; char val[128]; } ckpt_meta;

enum { CKPT_FULL = 0,      /* params, buffers and optimizer state: exact resume */
       CKPT_WEIGHTS = 1 }; /* params and buffers only (--init-from, sampling) */

/* Refuses (error) to write a non-finite f32 tensor. */
int ckpt_save(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta, char *err,
              size_t errlen);
/* Every param's accumulated gradient, under the param's name (run --trace). */
int ckpt_save_grads(exec_state *ex, const char *path, const ckpt_meta *meta, int nmeta,
                    char *err, size_t errlen);
/* Loads every tensor the mode needs; a missing, extra, mis-shaped or
 * mis-typed tensor is an error naming it.  meta receives up to maxmeta
 * entries of __metadata__. */
int ckpt_load(exec_state *ex, const char *path, int mode, ckpt_meta *meta, int maxmeta,
              int *nmeta, char *err, size_t errlen);
const char *ckpt_meta_get(const ckpt_meta *meta, int nmeta, const char *key);

/* precision = bf16: a bf16 param is checkpointed as its fp32 master copy
 * (plan_param.master), under the param's name, so a checkpoint is the same
 * for fp32 and bf16 plans of one model; loading sets the master and then
 * the param to bf16(master), rounded to nearest even. */

/* Writes n fp32 values into tensor t, rounding to bf16 if t is bf16. */
int ckpt_write_f32(exec_state *ex, uint64_t t, const float *h, uint64_t n, char *err,
                   size_t errlen);
/* Sets param row i from fp32 values: its master (if any) and its tensor. */
int ckpt_set_param(exec_state *ex, uint64_t i, const float *h, char *err, size_t errlen);
/* Elements of param i as a whole tensor (of this rank's experts): at ZeRO
 * stage 3 the param tensor itself holds only this rank's slice. */
uint64_t ckpt_param_numel(const plan_file *pf, uint64_t i);

#endif
