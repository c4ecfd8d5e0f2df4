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
/* Loads every tensor the mode needs; a missing, extra, mis-shaped or
 * mis-typed tensor is an error naming it.  meta receives up to maxmeta
 * entries of __metadata__. */
int ckpt_load(exec_state *ex, const char *path, int mode, ckpt_meta *meta, int maxmeta,
              int *nmeta, char *err, size_t errlen);
const char *ckpt_meta_get(const ckpt_meta *meta, int nmeta, const char *key);

#endif
