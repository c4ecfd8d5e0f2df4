/* train.h - the training loop around the executor: parameter init, data,
 * the learning-rate schedule, metrics, validation, checkpoints, sampling.
 * Nothing here knows what model the plan holds. */
#ifndef MOEC_TRAIN_H
#define MOEC_TRAIN_H

#include <signal.h>
#include <stdio.h>

#include "exec.h"

typedef struct train_opts {
    int64_t steps;                 /* -1: the plan's */
    const char *data_path;         /* NULL: the plan's, "" there = default corpus */
    const char *exe_dir;           /* for the default corpus */
    const char *metrics_path;      /* JSONL, NULL = none */
    const char *ckpt_path;         /* NULL = none */
    const char *resume_path;       /* full state */
    const char *init_from;         /* weights only */
    volatile sig_atomic_t *stop;   /* set by SIGINT: finish the step, save, exit 0 */
    FILE *out;                     /* per-step lines; NULL = silent */
} train_opts;

typedef struct sample_opts {
    const char *ckpt_path;
    const char *prompt;
    int64_t tokens;
    double temperature;            /* 0 = greedy */
    int64_t top_k;                 /* 0 = all */
    uint64_t seed;
} sample_opts;

/* lr at 1-based step: warmup (linear from lr/warmup), then the schedule to
 * min_lr over the plan's steps; a pure function of the step so a resumed
 * run gets the same values. */
double train_lr(const plan_train *t, int64_t step);
/* Fills param/buffer tensors from the plan's init specs; deterministic from
 * the seed and each tensor's name. */
int train_init_params(exec_state *ex, char *err, size_t errlen);
/* Finds the data file: the option, else the plan's, else the default corpus. */
int train_data_path(const plan_file *pf, const char *opt, const char *exe_dir, char *out,
                    size_t n, char *err, size_t errlen);
int train_run(exec_state *ex, const train_opts *o, char *err, size_t errlen);
/* train_run that also writes a replay trace into trace_dir (created if
 * missing; NULL = none): trace.jsonl, batches.bin, init.safetensors,
 * grads.safetensors (docs/runtime.md, "--trace"). */
int train_run_trace(exec_state *ex, const train_opts *o, const char *trace_dir, char *err,
                    size_t errlen);
int train_sample(exec_state *ex, const sample_opts *o, FILE *out, char *err, size_t errlen);
/* --routing-stats: one forward pass on a training batch (initial weights, or
 * o->resume_path / o->init_from), then each MoE layer's per-expert counts. */
int train_routing_stats(exec_state *ex, const train_opts *o, FILE *out, char *err, size_t errlen);
/* --eval-logits PATH: one forward pass on the first validation batch (weights
 * as train_routing_stats), every rank on its block of rows; rank 0 writes the
 * logits of all ranks as raw fp32 [ranks x batch x seq, vocab] (docs/parallel.md). */
int train_eval_logits(exec_state *ex, const train_opts *o, const char *out_path, char *err,
                      size_t errlen);

#endif
