/* moek.h - the kernel ABI: the one contract between the runtime and every
 * kernel library (kernels/cpu, kernels/cuda, a user's own libmyops.so).
 *
 * Every kernel is   void moek_<name>(const moek_ctx *ctx, ...);
 * and its remaining arguments are only pointers, int64_t, float or double, so
 * the runtime can call any of them through libffi from a plan without knowing
 * what they compute.  The CPU and CUDA libraries export the same symbols; a
 * plan names kernels by string and runs on either.
 *
 * Conventions shared by every kernel:
 *  - tensors are dense, row-major; "N" is a row count (tokens), dims follow
 *    the order of the shape; element types are stated per argument.
 *  - kernels OVERWRITE their outputs (gradients too); nothing accumulates
 *    unless the name says so (moek_accumulate, moek_sumsq_accum).  The
 *    compiler sums fan-out gradients with explicit ops.
 *  - kernels never allocate, never print and never exit; bad data (a token id
 *    out of range, say) sets *ctx->status to a MOEK_E_* code and the runtime
 *    reports it with the op's .moe source line.
 *  - fp32 storage, fp32 accumulation (the CPU reference); ties in top-k break
 *    towards the lower expert index.
 */
#ifndef MOEK_H
#define MOEK_H

#include <stdint.h>
#include <string.h>

#define MOEK_ABI_VERSION 1

enum moek_status {
    MOEK_OK = 0,
    MOEK_E_INDEX = 1,    /* an index read from data is out of range */
    MOEK_E_SHAPE = 2,    /* a size argument is inconsistent */
    MOEK_E_DEVICE = 3,   /* a CUDA / cuBLAS call failed */
};

typedef struct moek_ctx {
    void *stream;              /* cudaStream_t on CUDA; NULL on CPU */
    void *blas;                /* cublasLtHandle_t / cublasHandle_t; NULL on CPU */
    void *workspace;           /* scratch owned by the runtime, device memory on CUDA */
    int64_t workspace_bytes;
    int *status;               /* first error wins: kernels set it only if it is 0 */
    int num_threads;           /* CPU: OpenMP threads to use (0 = default) */
    void *comm;                /* the communication backend's handle (collective ops only) */
} moek_ctx;

/* Optimizer hyper-parameters, written by the runtime once per step into a
 * plan tensor of MOEK_HYPER_COUNT floats (device memory on CUDA), so the
 * prepared calls never change between steps. */
enum moek_hyper {
    MOEK_HYPER_LR = 0,
    MOEK_HYPER_BETA1,
    MOEK_HYPER_BETA2,
    MOEK_HYPER_EPS,
    MOEK_HYPER_BC1,        /* 1 - beta1^t */
    MOEK_HYPER_BC2,        /* 1 - beta2^t */
    MOEK_HYPER_MAX_NORM,   /* global-norm clip threshold; <= 0 disables clipping */
    MOEK_HYPER_MOMENTUM,   /* SGD momentum */
    MOEK_HYPER_STEP,       /* optimizer step number (router jitter's counter) */
    MOEK_HYPER_LOSS_SCALE, /* dynamic loss scale S (precision = fp16); 0 = no loss scaling */
    MOEK_HYPER_COUNT
};

/* ---- elementwise ------------------------------------------------------ */
void moek_fill(const moek_ctx *ctx, float *x, int64_t n, float value);
void moek_copy(const moek_ctx *ctx, const float *x, float *y, int64_t n);
void moek_add_fwd(const moek_ctx *ctx, const float *a, const float *b, float *y, int64_t n);
void moek_accumulate(const moek_ctx *ctx, float *dst, const float *src, int64_t n); /* dst += src */
void moek_scale_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float s);
void moek_scale_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float s);
void moek_gelu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n);          /* tanh approximation */
void moek_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n);
void moek_swiglu_fwd(const moek_ctx *ctx, const float *gate, const float *up, float *y, int64_t n);
void moek_swiglu_bwd(const moek_ctx *ctx, const float *dy, const float *gate, const float *up,
                     float *dgate, float *dup, int64_t n);

/* ---- embedding: out[N,D] = table[ids[N], :] --------------------------- */
void moek_embedding_fwd(const moek_ctx *ctx, const int32_t *ids, const float *table, float *out,
                        int64_t N, int64_t V, int64_t D);
void moek_embedding_bwd(const moek_ctx *ctx, const float *dout, const int32_t *ids, float *dtable,
                        int64_t N, int64_t V, int64_t D);

/* ---- matmul: y[N,M] = x[N,K] . w[M,K]^T   (w stored [out, in]) --------- */
void moek_matmul_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y,
                     int64_t N, int64_t K, int64_t M);
void moek_matmul_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                     float *dx, float *dw, int64_t N, int64_t K, int64_t M);

/* ---- rmsnorm: y = x * rstd * w,  rstd[N] = 1/sqrt(mean(x^2) + eps) ------- */
void moek_rmsnorm_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y, float *rstd,
                      int64_t N, int64_t D, float eps);
void moek_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                      const float *rstd, float *dx, float *dw, int64_t N, int64_t D);

/* ---- rotary embedding on x[B*T, H*Dh] (pairs (2i, 2i+1) rotated) -------- */
void moek_rope_fwd(const moek_ctx *ctx, const float *x, float *y,
                   int64_t B, int64_t T, int64_t H, int64_t Dh, float theta);
void moek_rope_bwd(const moek_ctx *ctx, const float *dy, float *dx,
                   int64_t B, int64_t T, int64_t H, int64_t Dh, float theta);

/* ---- causal self-attention, q/k/v/o [B*T, H*Dh], lse[B,H,T] ------------
 * scale 1/sqrt(Dh); lse keeps the row log-sum-exp so backward recomputes the
 * probabilities instead of storing a T x T matrix.  The backward may keep
 * B*H*T floats (lse's size) in ctx->workspace; a library that finds less
 * there still computes the gradients (the CUDA library's bf16 tensor-core
 * kernels need it; the plan's gpu_workspace_bytes counts it). */
void moek_attention_fwd(const moek_ctx *ctx, const float *q, const float *k, const float *v,
                        float *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh);
void moek_attention_bwd(const moek_ctx *ctx, const float *dout, const float *q, const float *k,
                        const float *v, const float *o, const float *lse,
                        float *dq, float *dk, float *dv, int64_t B, int64_t T, int64_t H, int64_t Dh);

/* ---- cross entropy, mean over N rows; lse[N] saved for backward ---------
 * targets outside [0, V) set MOEK_E_INDEX.  dloss is a 1-element tensor (the
 * seed of backprop, 1/grad_accum or a loss coefficient). */
void moek_cross_entropy_fwd(const moek_ctx *ctx, const float *logits, const int32_t *targets,
                            float *loss, float *lse, int64_t N, int64_t V);
void moek_cross_entropy_bwd(const moek_ctx *ctx, const float *dloss, const float *logits,
                            const int32_t *targets, const float *lse, float *dlogits,
                            int64_t N, int64_t V);

/* ---- routing (fp32 always) -------------------------------------------- */
/* probs[N,E] = softmax(logits) over E */
void moek_softmax_fwd(const moek_ctx *ctx, const float *logits, float *probs, int64_t N, int64_t E);
void moek_softmax_bwd(const moek_ctx *ctx, const float *dprobs, const float *probs, float *dlogits,
                      int64_t N, int64_t E);
/* idx[N,k] = top-k experts of scores (ties -> lower index, descending score);
 * gates[N,k] = their scores, divided by their sum when renorm != 0. */
void moek_topk_fwd(const moek_ctx *ctx, const float *scores, int32_t *idx, float *gates,
                   int64_t N, int64_t E, int64_t k, int64_t renorm);
void moek_topk_bwd(const moek_ctx *ctx, const float *dgates, const float *scores, const int32_t *idx,
                   float *dscores, int64_t N, int64_t E, int64_t k, int64_t renorm);
/* Switch/GShard balance loss: E * sum_i f_i P_i, f_i = share of the N*k
 * routed slots sent to i (a constant for the gradient), P_i = mean prob. */
void moek_balance_loss_fwd(const moek_ctx *ctx, const float *probs, const int32_t *idx, float *loss,
                           int64_t N, int64_t E, int64_t k);
void moek_balance_loss_bwd(const moek_ctx *ctx, const float *dloss, const float *probs,
                           const int32_t *idx, float *dprobs, int64_t N, int64_t E, int64_t k);
/* router z-loss: mean over rows of logsumexp(logits)^2 */
void moek_zloss_fwd(const moek_ctx *ctx, const float *logits, float *loss, int64_t N, int64_t E);
void moek_zloss_bwd(const moek_ctx *ctx, const float *dloss, const float *logits, float *dlogits,
                    int64_t N, int64_t E);

/* ---- dispatch / experts / combine ----------------------------------------
 * R rows of expert input xs[R,D].  capacity C > 0: expert e owns rows
 * [e*C, e*C + C), R = E*C, and slots beyond C are dropped in token order
 * (lower token index first).  C == 0: dropless, R = N*k, expert blocks are
 * packed back to back.  Tokens are stably sorted by expert.
 * slot_row[N,k] = row of xs holding (token, choice), -1 when dropped.
 * expert_rows[E,2] = (first row, row count) of each expert's block.
 * Rows of xs no slot uses are zero. */
void moek_dispatch_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx, float *xs,
                       int32_t *slot_row, int32_t *expert_rows,
                       int64_t N, int64_t D, int64_t E, int64_t k, int64_t C);
void moek_dispatch_bwd(const moek_ctx *ctx, const float *dxs, const int32_t *slot_row, float *dx,
                       int64_t N, int64_t D, int64_t k, int64_t R);
/* ys[rows of e] = xs[rows of e] . w[e]^T,  w[E,M,K]; rows outside every block -> 0 */
void moek_grouped_matmul_fwd(const moek_ctx *ctx, const float *xs, const float *w,
                             const int32_t *expert_rows, float *ys,
                             int64_t R, int64_t K, int64_t M, int64_t E);
void moek_grouped_matmul_bwd(const moek_ctx *ctx, const float *dys, const float *xs, const float *w,
                             const int32_t *expert_rows, float *dxs, float *dw,
                             int64_t R, int64_t K, int64_t M, int64_t E);
/* out[t] = sum_j gates[t,j] * ys[slot_row[t,j]]  (dropped slots contribute 0) */
void moek_combine_fwd(const moek_ctx *ctx, const float *ys, const int32_t *slot_row,
                      const float *gates, float *out, int64_t N, int64_t D, int64_t k, int64_t R);
void moek_combine_bwd(const moek_ctx *ctx, const float *dout, const float *ys,
                      const int32_t *slot_row, const float *gates, float *dys, float *dgates,
                      int64_t N, int64_t D, int64_t k, int64_t R);

/* ---- optimizer ---------------------------------------------------------- */
/* *acc += sum(x^2) (fp32 value, accumulated in double on the CPU) */
void moek_sumsq_accum(const moek_ctx *ctx, const float *x, float *acc, int64_t n);
/* AdamW with decoupled decay; the gradient is multiplied by
 * min(1, max_norm / (sqrt(*norm_sq) + 1e-6)) when max_norm > 0 (as torch's
 * clip_grad_norm_).
 * Loss scaling: with S = hyper[MOEK_HYPER_LOSS_SCALE] > 0 the gradients and
 * the norm are those of the loss times S, so the update uses g / S and
 * *norm_sq / S^2.  When *norm_sq is not finite (an overflow somewhere in
 * the step) the update is skipped: p, m, v and buf are left untouched, in
 * every param alike because all read the same norm.  Both rules hold for
 * the _bf16 and _f16 variants too. */
void moek_adamw(const moek_ctx *ctx, float *p, const float *g, float *m, float *v, int64_t n,
                const float *hyper, const float *norm_sq, float weight_decay);
void moek_sgd(const moek_ctx *ctx, float *p, const float *g, float *buf, int64_t n,
              const float *hyper, const float *norm_sq, float weight_decay);


/* ---- bf16 storage (precision = bf16) ---------------------------------------
 * Mixed precision: activations, parameters' working copies and their
 * backward products are stored as bf16 (moek_bf16: the top 16 bits of an
 * fp32, rounded to nearest even, NaN kept NaN); every kernel accumulates in
 * fp32.  Each variant below is the fp32 kernel of the same name with the
 * arguments typed moek_bf16 stored as bf16; its maths is defined as: widen
 * the bf16 inputs to fp32 exactly, run the fp32 kernel, round each bf16
 * output once (RNE).  Arguments still typed float stay fp32 - norm
 * statistics (rstd, lse), losses and their seeds, router probabilities,
 * gates and everything after them, gradients accumulated across micro-steps
 * (fp32, pinned), the fp32 master weights and Adam moments.
 * The CPU library implements these by widening into ctx->workspace (see
 * moek_bf16_workspace_bytes), so its bf16 results are the reference the CUDA
 * variants are compared with. */
typedef uint16_t moek_bf16;

/* The format's two conversions, shared by every library and the runtime
 * (checkpoints, collectives).  fp32 -> bf16, round to nearest even: adding 0x7FFF plus the lowest kept
 * bit carries into bit 16 exactly when the dropped half is above one half,
 * or equal to it with an odd kept part.  The carry may run into the
 * exponent (correct: the next binade) and turn the largest finite values
 * into Inf (correct under RNE).  A NaN would carry the same way into Inf or
 * lose its payload to zero, so it is truncated and quieted instead. */
static inline moek_bf16 moek_bf16_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (moek_bf16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (moek_bf16)(u >> 16);
}

/* bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32. */
static inline float moek_bf16_to_f32(moek_bf16 h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Workspace the CPU bf16 variants need for one call whose float tensor
 * arguments total `elems` elements: the compiler records the maximum in the
 * plan and the runtime allocates it. */
#define MOEK_BF16_WORKSPACE_BYTES(elems) ((int64_t)(elems) * 4 + (int64_t)64 * 16)

void moek_cast_f32_bf16(const moek_ctx *ctx, const float *x, moek_bf16 *y, int64_t n);
void moek_cast_bf16_f32(const moek_ctx *ctx, const moek_bf16 *x, float *y, int64_t n);

void moek_fill_bf16(const moek_ctx *ctx, moek_bf16 *x, int64_t n, float value);
void moek_copy_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n);
void moek_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b, moek_bf16 *y, int64_t n);
/* fp32 dst += widened bf16 src: a bf16 gradient into its fp32 accumulator */
void moek_accumulate_bf16(const moek_ctx *ctx, float *dst, const moek_bf16 *src, int64_t n);
void moek_scale_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n, float s);
void moek_scale_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t n, float s);
void moek_gelu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n);
void moek_gelu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, moek_bf16 *dx, int64_t n);
void moek_swiglu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *gate, const moek_bf16 *up, moek_bf16 *y, int64_t n);
void moek_swiglu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *gate, const moek_bf16 *up,
                          moek_bf16 *dgate, moek_bf16 *dup, int64_t n);
void moek_embedding_fwd_bf16(const moek_ctx *ctx, const int32_t *ids, const moek_bf16 *table, moek_bf16 *out,
                             int64_t N, int64_t V, int64_t D);
void moek_embedding_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const int32_t *ids, moek_bf16 *dtable,
                             int64_t N, int64_t V, int64_t D);
void moek_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, moek_bf16 *y,
                          int64_t N, int64_t K, int64_t M);
void moek_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, const moek_bf16 *w,
                          moek_bf16 *dx, moek_bf16 *dw, int64_t N, int64_t K, int64_t M);
void moek_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, moek_bf16 *y, float *rstd,
                           int64_t N, int64_t D, float eps);
void moek_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, const moek_bf16 *w,
                           const float *rstd, moek_bf16 *dx, moek_bf16 *dw, int64_t N, int64_t D);
void moek_rope_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta);
void moek_rope_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx,
                        int64_t B, int64_t T, int64_t H, int64_t Dh, float theta);
void moek_attention_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *q, const moek_bf16 *k, const moek_bf16 *v,
                             moek_bf16 *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh);
void moek_attention_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *q, const moek_bf16 *k,
                             const moek_bf16 *v, const moek_bf16 *o, const float *lse,
                             moek_bf16 *dq, moek_bf16 *dk, moek_bf16 *dv,
                             int64_t B, int64_t T, int64_t H, int64_t Dh);
void moek_cross_entropy_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, const int32_t *targets,
                                 float *loss, float *lse, int64_t N, int64_t V);
void moek_cross_entropy_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits,
                                 const int32_t *targets, const float *lse, moek_bf16 *dlogits,
                                 int64_t N, int64_t V);
/* router: bf16 logits in, fp32 probabilities out; the rest of routing is fp32 */
void moek_softmax_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *probs, int64_t N, int64_t E);
void moek_softmax_bwd_bf16(const moek_ctx *ctx, const float *dprobs, const float *probs, moek_bf16 *dlogits,
                           int64_t N, int64_t E);
void moek_zloss_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *loss, int64_t N, int64_t E);
void moek_zloss_bwd_bf16(const moek_ctx *ctx, const float *dloss, const moek_bf16 *logits, moek_bf16 *dlogits,
                         int64_t N, int64_t E);
void moek_dispatch_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const int32_t *idx, moek_bf16 *xs,
                            int32_t *slot_row, int32_t *expert_rows,
                            int64_t N, int64_t D, int64_t E, int64_t k, int64_t C);
void moek_dispatch_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dxs, const int32_t *slot_row, moek_bf16 *dx,
                            int64_t N, int64_t D, int64_t k, int64_t R);
void moek_grouped_matmul_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *xs, const moek_bf16 *w,
                                  const int32_t *expert_rows, moek_bf16 *ys,
                                  int64_t R, int64_t K, int64_t M, int64_t E);
void moek_grouped_matmul_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dys, const moek_bf16 *xs,
                                  const moek_bf16 *w, const int32_t *expert_rows,
                                  moek_bf16 *dxs, moek_bf16 *dw, int64_t R, int64_t K, int64_t M, int64_t E);
/* gates stay fp32: out[t] = bf16(sum_j gates[t,j] * ys[row]) */
void moek_combine_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *ys, const int32_t *slot_row,
                           const float *gates, moek_bf16 *out, int64_t N, int64_t D, int64_t k, int64_t R);
void moek_combine_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dout, const moek_bf16 *ys,
                           const int32_t *slot_row, const float *gates, moek_bf16 *dys, float *dgates,
                           int64_t N, int64_t D, int64_t k, int64_t R);
/* AdamW / SGD on the fp32 master copy, then p = bf16(master).  g is the fp32
 * accumulated gradient. */
void moek_adamw_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *m, float *v,
                     int64_t n, const float *hyper, const float *norm_sq, float weight_decay);
void moek_sgd_bf16(const moek_ctx *ctx, moek_bf16 *p, float *master, const float *g, float *buf, int64_t n,
                   const float *hyper, const float *norm_sq, float weight_decay);

/* ---- device services ------------------------------------------------------
 * Every kernel library for a device (libmoek_cpu.so, libmoek_cuda.so) also
 * exports these, so the runtime allocates, copies and synchronises without
 * linking any device library itself.  Return 0 on success; on failure, -1
 * with a message in err (errlen bytes). */
enum moek_copy_kind { MOEK_COPY_H2D = 0, MOEK_COPY_D2H = 1, MOEK_COPY_D2D = 2 };
int moek_device_count(void);   /* usable devices (the CPU library: 1); never fails */
/* How the library runs half-precision kernels, which decides the workspace
 * the runtime gives it (runtime/plan.h plan_train): 0, it widens half tensors
 * to fp32 in ctx->workspace (the CPU library: workspace_bytes); 1, it
 * computes in their own precision and keeps only fused ops' and attention's
 * scratch there (the CUDA library: gpu_workspace_bytes). */
int moek_device_half_native(void);
int moek_device_init(moek_ctx *ctx, int64_t device_index, int64_t workspace_bytes,
                     char *err, int64_t errlen);   /* fills stream, blas, workspace */
void moek_device_fini(moek_ctx *ctx);
void *moek_device_alloc(const moek_ctx *ctx, int64_t bytes, char *err, int64_t errlen); /* zeroed */
void moek_device_free(const moek_ctx *ctx, void *p);
int moek_device_copy(const moek_ctx *ctx, void *dst, const void *src, int64_t bytes, int64_t kind,
                     char *err, int64_t errlen);
/* waits for all queued work; reports the first asynchronous error */
int moek_device_sync(const moek_ctx *ctx, char *err, int64_t errlen);
/* Whole-step capture (CUDA graphs); the CPU library returns -1 ("not supported")
 * and the runtime then simply calls the ops. */
int moek_graph_begin(const moek_ctx *ctx, char *err, int64_t errlen);
int moek_graph_end(const moek_ctx *ctx, void **graph, char *err, int64_t errlen);
int moek_graph_launch(const moek_ctx *ctx, void *graph, char *err, int64_t errlen);
void moek_graph_free(void *graph);

/* ---- routing, issue 4 (fp32 always; kernels/cpu/routing.c) ----------------
 * Selection order everywhere: key descending, expert index ascending, NaN
 * below everything.  Kernels needing a per-row or per-sequence table keep it
 * on the stack and accept at most MOEK_ROUTE_MAX_E experts (else
 * MOEK_E_SHAPE). */
#define MOEK_ROUTE_MAX_E 256

/* scores[N,E] = sigmoid(logits) (DeepSeek-V3); dlogits = ds * s * (1 - s) */
void moek_sigmoid_fwd(const moek_ctx *ctx, const float *logits, float *scores, int64_t N, int64_t E);
void moek_sigmoid_bwd(const moek_ctx *ctx, const float *dscores, const float *scores, float *dlogits,
                      int64_t N, int64_t E);
/* Aux-loss-free selection: idx = top-k of scores + bias[E] (bias may be
 * NULL); gates = the UNBIASED scores of the chosen experts, divided by their
 * sum when renorm != 0, times scale.  k > E: MOEK_E_SHAPE. */
void moek_topk_biased_fwd(const moek_ctx *ctx, const float *scores, const float *bias, int32_t *idx,
                          float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm, float scale);
/* backward of topk_biased and topk_grouped (the bias gets no gradient):
 * dscores zero outside the chosen experts; scale * dg without renorm, else
 * scale * (dg_i - sum_j dg_j s_j / S) / S */
void moek_topk_biased_bwd(const moek_ctx *ctx, const float *dgates, const float *scores,
                          const int32_t *idx, float *dscores, int64_t N, int64_t E, int64_t k,
                          int64_t renorm, float scale);
/* Group-limited routing: E experts in `groups` equal groups; a group's
 * score is the sum of its top-2 biased scores (its max when a group has one
 * expert); the best topk_groups groups are kept, then top-k among their
 * experts as topk_biased.  Backward: moek_topk_biased_bwd.  MOEK_E_SHAPE
 * when groups does not divide E, topk_groups is not in [1, groups],
 * k > topk_groups * E / groups, or E > MOEK_ROUTE_MAX_E. */
void moek_topk_grouped_fwd(const moek_ctx *ctx, const float *scores, const float *bias, int32_t *idx,
                           float *gates, int64_t N, int64_t E, int64_t k, int64_t groups,
                           int64_t topk_groups, int64_t renorm, float scale);
/* Top-k of the logits, then gates = softmax over the k chosen logits;
 * dlogits zero outside the chosen, g_j (dg_j - sum_i dg_i g_i) on them. */
void moek_topk_softmax_fwd(const moek_ctx *ctx, const float *logits, int32_t *idx, float *gates,
                           int64_t N, int64_t E, int64_t k);
void moek_topk_softmax_bwd(const moek_ctx *ctx, const float *dgates, const float *gates,
                           const int32_t *idx, float *dlogits, int64_t N, int64_t E, int64_t k);
/* Router jitter: y = x * u, u ~ U(1-eps, 1+eps) from a counter-based hash of
 * (seed, step = hyper[MOEK_HYPER_STEP], element index): no state, the same
 * bits on CPU and CUDA, recomputed by the backward (dx = dy * u). */
void moek_jitter_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n, float eps,
                     const float *hyper, int64_t seed);
void moek_jitter_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t n, float eps,
                     const float *hyper, int64_t seed);
/* Sequence-wise balance loss (DeepSeek-V3): tokens are B sequences of T;
 * loss = mean over sequences of E sum_i f_i P_i, f_i = share of the
 * sequence's T k slots routed to i (constant for the gradient), P_i = mean
 * of probs[., i] over its T tokens.  E > MOEK_ROUTE_MAX_E: MOEK_E_SHAPE. */
void moek_seq_balance_loss_fwd(const moek_ctx *ctx, const float *probs, const int32_t *idx,
                               float *loss, int64_t B, int64_t T, int64_t E, int64_t k);
void moek_seq_balance_loss_bwd(const moek_ctx *ctx, const float *dloss, const float *probs,
                               const int32_t *idx, float *dprobs, int64_t B, int64_t T, int64_t E,
                               int64_t k);
/* Expert load (no gradient): load[e] = slots routed to e before capacity,
 * load[E] = slots dropped (slot_row == -1; slot_row may be NULL: 0). */
void moek_expert_load(const moek_ctx *ctx, const int32_t *idx, const int32_t *slot_row, float *load,
                      int64_t N, int64_t E, int64_t k);
/* Aux-loss-free bias step (optimizer phase, no gradient):
 * bias[e] += rate * sign(mean_e load[e] - load[e]); load from moek_expert_load. */
void moek_router_bias_update(const moek_ctx *ctx, float *bias, const float *load, int64_t E,
                             float rate);
/* Capacity drop by score: moek_dispatch_fwd with C > 0 (C <= 0:
 * MOEK_E_SHAPE), except that an expert over capacity keeps its C slots with
 * the highest gate (ties: lower slot index, i.e. token then choice); kept
 * rows stay in slot order inside the block.  Backward: moek_dispatch_bwd. */
void moek_dispatch_by_score_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx,
                                const float *gates, float *xs, int32_t *slot_row,
                                int32_t *expert_rows, int64_t N, int64_t D, int64_t E, int64_t k,
                                int64_t C);

/* ---- issue 2 stdlib ops (kernels/cpu/layer_ops.c, kernels/cuda/layer_ops.cu)
 * LayerNorm with bias, SiLU, the grouped-query head expansion and a row
 * bias; each with its _bf16 variant (same arguments, moek_bf16 storage for
 * the arguments so typed, fp32 maths; mean and rstd stay fp32). */
/* y = (x - mean) * rstd * w + b over the last dim D; mean[N], rstd[N] =
 * 1/sqrt(var + eps) (biased variance) saved for backward.  Backward, with
 * xh = (x - mean) rstd and g = dy w:  dx = rstd (g - mean(g) - xh mean(g xh)),
 * dw = sum_n dy xh, db = sum_n dy (dx, dw or db may be NULL). */
void moek_layernorm_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *y,
                        float *mean, float *rstd, int64_t N, int64_t D, float eps);
void moek_layernorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                        const float *mean, const float *rstd, float *dx, float *dw, float *db,
                        int64_t N, int64_t D);
/* y = x sigmoid(x);  dx = dy s (1 + x (1 - s)) */
void moek_silu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n);
void moek_silu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n);
/* Grouped-query attention: x[N, Hkv*Dh] -> y[N, H*Dh], query head h reads
 * kv head h / (H / Hkv) (consecutive groups, as repeat_interleave); the
 * backward sums each group's H / Hkv gradients in head order.  Hkv <= 0 or
 * H % Hkv != 0: MOEK_E_SHAPE. */
void moek_repeat_kv_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh);
void moek_repeat_kv_bwd(const moek_ctx *ctx, const float *dy, float *dx, int64_t N, int64_t Hkv,
                        int64_t H, int64_t Dh);
/* y[N,D] = x + b[D] (a linear layer's bias); dx = dy, db = column sums of dy
 * (dx or db may be NULL) */
void moek_bias_add_fwd(const moek_ctx *ctx, const float *x, const float *b, float *y, int64_t N,
                       int64_t D);
void moek_bias_add_bwd(const moek_ctx *ctx, const float *dy, float *dx, float *db, int64_t N,
                       int64_t D);

void moek_layernorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                             const moek_bf16 *b, moek_bf16 *y, float *mean, float *rstd, int64_t N,
                             int64_t D, float eps);
void moek_layernorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                             const moek_bf16 *w, const float *mean, const float *rstd,
                             moek_bf16 *dx, moek_bf16 *dw, moek_bf16 *db, int64_t N, int64_t D);
void moek_silu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t n);
void moek_silu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x, moek_bf16 *dx,
                        int64_t n);
void moek_repeat_kv_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, moek_bf16 *y, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh);
void moek_repeat_kv_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, int64_t N,
                             int64_t Hkv, int64_t H, int64_t Dh);
void moek_bias_add_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *b,
                            moek_bf16 *y, int64_t N, int64_t D);
void moek_bias_add_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, moek_bf16 *dx, moek_bf16 *db,
                            int64_t N, int64_t D);

/* ---- fp16 storage (precision = fp16) ----------------------------------------
 * The bf16 section above, with moek_f16 (IEEE 754 binary16: 1 sign, 5
 * exponent, 10 mantissa bits) as the storage type: every _f16 kernel below
 * is its _bf16 twin's contract word for word - widen exactly, the fp32
 * kernel, round each output once to nearest even (values past the largest
 * half, 65504, round to Inf from 65520 on; subnormals down to 2^-24; NaN
 * stays NaN).  fp16 keeps 3 more mantissa bits than bf16 but tops out at
 * 65504, so the runtime scales the loss seed by a dynamic loss scale
 * (hyper[MOEK_HYPER_LOSS_SCALE]) and the optimizers divide it back out and
 * skip a step whose gradient norm overflowed.  Workspace: the bf16 macro. */
typedef uint16_t moek_f16;

/* fp32 -> half, round to nearest even.  Three ranges:
 *  - from 65520 up (the midpoint between 65504, the largest half with an odd
 *    mantissa, and 2^16): Inf, as RNE says; Inf stays Inf;
 *  - normal halves (>= 2^-14): rebias the exponent (127 -> 15) and round the
 *    13 dropped mantissa bits as moek_bf16_from_f32 does its 16 (a carry
 *    into the exponent is the next binade, correct);
 *  - below 2^-14: a subnormal count of 2^-24 units, rounded by hand.
 * NaN is quieted and keeps the top of its payload (never becomes Inf). */
static inline moek_f16 moek_f16_from_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (moek_f16)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u)
        return (moek_f16)(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (moek_f16)(sign | (r >> 13));
    }
    uint32_t e = a >> 23;
    uint32_t shift = 126u - e;                  /* >= 14 here */
    if (shift > 24u)
        return (moek_f16)sign;                  /* below a quarter unit: 0 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t k = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (k & 1u)))
        k++;                                    /* may reach 0x400: the smallest normal */
    return (moek_f16)(sign | k);
}

/* half -> fp32 is exact (every half is an fp32). */
static inline float moek_f16_to_f32(moek_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1fu) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        u = sign | ((e + 112u) << 23) | (m << 13);
    } else {
        float v = (float)m * 5.9604644775390625e-8f;   /* m * 2^-24, exact */
        memcpy(&u, &v, sizeof u);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

void moek_cast_f32_f16(const moek_ctx *ctx, const float *x, moek_f16 *y, int64_t n);
void moek_cast_f16_f32(const moek_ctx *ctx, const moek_f16 *x, float *y, int64_t n);

void moek_fill_f16(const moek_ctx *ctx, moek_f16 *x, int64_t n, float value);
void moek_copy_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n);
void moek_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b, moek_f16 *y,
    int64_t n);
void moek_accumulate_f16(const moek_ctx *ctx, float *dst, const moek_f16 *src, int64_t n);
void moek_scale_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n, float s);
void moek_scale_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t n, float s);
void moek_gelu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n);
void moek_gelu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
    int64_t n);
void moek_swiglu_fwd_f16(const moek_ctx *ctx, const moek_f16 *gate, const moek_f16 *up, moek_f16 *y,
    int64_t n);
void moek_swiglu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *gate,
    const moek_f16 *up, moek_f16 *dgate, moek_f16 *dup, int64_t n);
void moek_embedding_fwd_f16(const moek_ctx *ctx, const int32_t *ids, const moek_f16 *table,
    moek_f16 *out, int64_t N, int64_t V, int64_t D);
void moek_embedding_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const int32_t *ids,
    moek_f16 *dtable, int64_t N, int64_t V, int64_t D);
void moek_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, moek_f16 *y,
    int64_t N, int64_t K, int64_t M);
void moek_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
    const moek_f16 *w, moek_f16 *dx, moek_f16 *dw, int64_t N, int64_t K, int64_t M);
void moek_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, moek_f16 *y,
    float *rstd, int64_t N, int64_t D, float eps);
void moek_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
    const moek_f16 *w, const float *rstd, moek_f16 *dx, moek_f16 *dw, int64_t N, int64_t D);
void moek_rope_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t B, int64_t T,
    int64_t H, int64_t Dh, float theta);
void moek_rope_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t B, int64_t T,
    int64_t H, int64_t Dh, float theta);
void moek_attention_fwd_f16(const moek_ctx *ctx, const moek_f16 *q, const moek_f16 *k,
    const moek_f16 *v, moek_f16 *o, float *lse, int64_t B, int64_t T, int64_t H, int64_t Dh);
void moek_attention_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *q,
    const moek_f16 *k, const moek_f16 *v, const moek_f16 *o, const float *lse, moek_f16 *dq,
    moek_f16 *dk, moek_f16 *dv, int64_t B, int64_t T, int64_t H, int64_t Dh);
void moek_cross_entropy_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, const int32_t *targets,
    float *loss, float *lse, int64_t N, int64_t V);
void moek_cross_entropy_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
    const int32_t *targets, const float *lse, moek_f16 *dlogits, int64_t N, int64_t V);
void moek_softmax_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *probs, int64_t N,
    int64_t E);
void moek_softmax_bwd_f16(const moek_ctx *ctx, const float *dprobs, const float *probs,
    moek_f16 *dlogits, int64_t N, int64_t E);
void moek_zloss_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *loss, int64_t N,
    int64_t E);
void moek_zloss_bwd_f16(const moek_ctx *ctx, const float *dloss, const moek_f16 *logits,
    moek_f16 *dlogits, int64_t N, int64_t E);
void moek_dispatch_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const int32_t *idx, moek_f16 *xs,
    int32_t *slot_row, int32_t *expert_rows, int64_t N, int64_t D, int64_t E, int64_t k, int64_t C);
void moek_dispatch_bwd_f16(const moek_ctx *ctx, const moek_f16 *dxs, const int32_t *slot_row,
    moek_f16 *dx, int64_t N, int64_t D, int64_t k, int64_t R);
void moek_grouped_matmul_fwd_f16(const moek_ctx *ctx, const moek_f16 *xs, const moek_f16 *w,
    const int32_t *expert_rows, moek_f16 *ys, int64_t R, int64_t K, int64_t M, int64_t E);
void moek_grouped_matmul_bwd_f16(const moek_ctx *ctx, const moek_f16 *dys, const moek_f16 *xs,
    const moek_f16 *w, const int32_t *expert_rows, moek_f16 *dxs, moek_f16 *dw, int64_t R,
    int64_t K, int64_t M, int64_t E);
void moek_combine_fwd_f16(const moek_ctx *ctx, const moek_f16 *ys, const int32_t *slot_row,
    const float *gates, moek_f16 *out, int64_t N, int64_t D, int64_t k, int64_t R);
void moek_combine_bwd_f16(const moek_ctx *ctx, const moek_f16 *dout, const moek_f16 *ys,
    const int32_t *slot_row, const float *gates, moek_f16 *dys, float *dgates, int64_t N, int64_t D,
    int64_t k, int64_t R);
void moek_adamw_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *m,
    float *v, int64_t n, const float *hyper, const float *norm_sq, float weight_decay);
void moek_sgd_f16(const moek_ctx *ctx, moek_f16 *p, float *master, const float *g, float *buf,
    int64_t n, const float *hyper, const float *norm_sq, float weight_decay);
void moek_layernorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
    const moek_f16 *b, moek_f16 *y, float *mean, float *rstd, int64_t N, int64_t D, float eps);
void moek_layernorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
    const moek_f16 *w, const float *mean, const float *rstd, moek_f16 *dx, moek_f16 *dw,
    moek_f16 *db, int64_t N, int64_t D);
void moek_silu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t n);
void moek_silu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, moek_f16 *dx,
    int64_t n);
void moek_repeat_kv_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, moek_f16 *y, int64_t N,
    int64_t Hkv, int64_t H, int64_t Dh);
void moek_repeat_kv_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, int64_t N,
    int64_t Hkv, int64_t H, int64_t Dh);
void moek_bias_add_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *b, moek_f16 *y,
    int64_t N, int64_t D);
void moek_bias_add_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, moek_f16 *dx, moek_f16 *db,
    int64_t N, int64_t D);

/* ---- fused ops (issue 8; kernels/cpu/fused.c, kernels/cuda/fused.cu) --------
 * Each replaces a pattern of the ops above, declared next to it in
 * stdlib/core.moe (`fuses { }`), and computes what the pattern computes.
 *
 * Residual add + RMSNorm: s = a + b, y = rmsnorm(s) (as moek_rmsnorm_fwd),
 * the sum kept for the residual stream.  Backward: dx = rmsnorm_bwd(dy) + ds
 * (ds: the gradient of s from its other readers), da = db = dx, dw as
 * moek_rmsnorm_bwd.  _bf16/_f16: s is rounded first and the norm reads the
 * rounded s; the norm's dx is rounded before ds is added - each step rounds
 * where the unfused ops round, so the results equal theirs bit for bit. */
void moek_add_rmsnorm_fwd(const moek_ctx *ctx, const float *a, const float *b, const float *w, float *s,
                          float *y, float *rstd, int64_t N, int64_t D, float eps);
void moek_add_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *ds, const float *s,
                          const float *w, const float *rstd, float *da, float *db, float *dw,
                          int64_t N, int64_t D);
void moek_add_rmsnorm_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *a, const moek_bf16 *b,
                               const moek_bf16 *w, moek_bf16 *s, moek_bf16 *y, float *rstd,
                               int64_t N, int64_t D, float eps);
void moek_add_rmsnorm_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *ds,
                               const moek_bf16 *s, const moek_bf16 *w, const float *rstd, moek_bf16 *da,
                               moek_bf16 *db, moek_bf16 *dw, int64_t N, int64_t D);
void moek_add_rmsnorm_fwd_f16(const moek_ctx *ctx, const moek_f16 *a, const moek_f16 *b,
                              const moek_f16 *w, moek_f16 *s, moek_f16 *y, float *rstd,
                              int64_t N, int64_t D, float eps);
void moek_add_rmsnorm_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *ds,
                              const moek_f16 *s, const moek_f16 *w, const float *rstd, moek_f16 *da,
                              moek_f16 *db, moek_f16 *dw, int64_t N, int64_t D);

/* SwiGLU with its projections (stdlib/core.moe swiglu_proj): gate = x W1^T,
 * up = x W3^T (as moek_matmul_fwd), y = swiglu(gate, up).  Backward: dgate,
 * dup as moek_swiglu_bwd, then each projection's moek_matmul_bwd, and
 * dx = dx1 + dx3 (the gradient sum of the unfused graph).  The backward
 * needs MOEK_BF16_WORKSPACE_BYTES(2 N M + N K) in fp32 too (dgate, dup and
 * the first dx), and otherwise sets MOEK_E_SHAPE and writes nothing.
 * _bf16/_f16 round gate, up, dgate, dup, each dx and each dw where the
 * unfused ops round: bit for bit the same. */
void moek_swiglu_proj_fwd(const moek_ctx *ctx, const float *x, const float *w1, const float *w3, float *gate,
                          float *up, float *y, int64_t N, int64_t K, int64_t M);
void moek_swiglu_proj_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w1,
                          const float *w3, const float *gate, const float *up, float *dx, float *dw1,
                          float *dw3, int64_t N, int64_t K, int64_t M);
void moek_swiglu_proj_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w1,
                               const moek_bf16 *w3, moek_bf16 *gate, moek_bf16 *up, moek_bf16 *y,
                               int64_t N, int64_t K, int64_t M);
void moek_swiglu_proj_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                               const moek_bf16 *w1, const moek_bf16 *w3, const moek_bf16 *gate,
                               const moek_bf16 *up, moek_bf16 *dx, moek_bf16 *dw1, moek_bf16 *dw3,
                               int64_t N, int64_t K, int64_t M);
void moek_swiglu_proj_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w1,
                              const moek_f16 *w3, moek_f16 *gate, moek_f16 *up, moek_f16 *y,
                              int64_t N, int64_t K, int64_t M);
void moek_swiglu_proj_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                              const moek_f16 *w1, const moek_f16 *w3, const moek_f16 *gate,
                              const moek_f16 *up, moek_f16 *dx, moek_f16 *dw1, moek_f16 *dw3,
                              int64_t N, int64_t K, int64_t M);

/* Router softmax + top-k (stdlib/core.moe softmax_topk): probs as
 * moek_softmax_fwd, idx and gates as moek_topk_fwd on probs.  Backward:
 * dlogits = softmax_bwd(topk_bwd(dgates) + dprobs), dprobs the gradient
 * of probs from its other readers (the balance loss).  probs, gates and
 * their gradients are fp32 under any precision; _bf16/_f16 take half
 * logits (and need MOEK_BF16_WORKSPACE_BYTES(N E) for them). */
void moek_softmax_topk_fwd(const moek_ctx *ctx, const float *logits, float *probs, int32_t *idx, float *gates,
                           int64_t N, int64_t E, int64_t k, int64_t renorm);
void moek_softmax_topk_bwd(const moek_ctx *ctx, const float *dprobs, const float *dgates, const float *probs,
                           const int32_t *idx, float *dlogits, int64_t N, int64_t E, int64_t k, int64_t renorm);
void moek_softmax_topk_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *logits, float *probs, int32_t *idx,
                                float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm);
void moek_softmax_topk_bwd_bf16(const moek_ctx *ctx, const float *dprobs, const float *dgates,
                                const float *probs, const int32_t *idx, moek_bf16 *dlogits, int64_t N,
                                int64_t E, int64_t k, int64_t renorm);
void moek_softmax_topk_fwd_f16(const moek_ctx *ctx, const moek_f16 *logits, float *probs, int32_t *idx,
                               float *gates, int64_t N, int64_t E, int64_t k, int64_t renorm);
void moek_softmax_topk_bwd_f16(const moek_ctx *ctx, const float *dprobs, const float *dgates,
                               const float *probs, const int32_t *idx, moek_f16 *dlogits, int64_t N,
                               int64_t E, int64_t k, int64_t renorm);

/* A linear layer with its bias and GELU (stdlib/core.moe matmul_bias_gelu):
 * pre = x W^T (as moek_matmul_fwd) + b (as moek_bias_add_fwd), y =
 * gelu(pre).  Backward: dpre = moek_gelu_bwd(dy, pre), db its column sums
 * (as moek_bias_add_bwd), dx and dw as moek_matmul_bwd(dpre).  The backward
 * needs MOEK_BF16_WORKSPACE_BYTES(N M) for dpre, and otherwise sets
 * MOEK_E_SHAPE and writes nothing.  _bf16/_f16 round the GEMM's output,
 * pre, y, dpre, dx, dw and db where the unfused ops round (and need
 * MOEK_BF16_WORKSPACE_BYTES of their half arguments' element count). */
void moek_matmul_bias_gelu_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *pre,
                               float *y, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_gelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                               const float *pre, float *dx, float *dw, float *db, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_gelu_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w,
                                    const moek_bf16 *b, moek_bf16 *pre, moek_bf16 *y, int64_t N, int64_t K,
                                    int64_t M);
void moek_matmul_bias_gelu_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                                    const moek_bf16 *w, const moek_bf16 *pre, moek_bf16 *dx, moek_bf16 *dw,
                                    moek_bf16 *db, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_gelu_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w,
                                   const moek_f16 *b, moek_f16 *pre, moek_f16 *y, int64_t N, int64_t K,
                                   int64_t M);
void moek_matmul_bias_gelu_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x,
                                   const moek_f16 *w, const moek_f16 *pre, moek_f16 *dx, moek_f16 *dw,
                                   moek_f16 *db, int64_t N, int64_t K, int64_t M);

/* A linear layer with its bias (stdlib/core.moe matmul_bias): y = x W^T + b.
 * Backward: db = column sums of dy (as moek_bias_add_bwd), dx and dw as
 * moek_matmul_bwd(dy).  No workspace in fp32; _bf16/_f16 as above. */
void moek_matmul_bias_fwd(const moek_ctx *ctx, const float *x, const float *w, const float *b, float *y,
                          int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w, float *dx,
                          float *dw, float *db, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_fwd_bf16(const moek_ctx *ctx, const moek_bf16 *x, const moek_bf16 *w, const moek_bf16 *b,
                               moek_bf16 *y, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_bwd_bf16(const moek_ctx *ctx, const moek_bf16 *dy, const moek_bf16 *x,
                               const moek_bf16 *w, moek_bf16 *dx, moek_bf16 *dw, moek_bf16 *db, int64_t N,
                               int64_t K, int64_t M);
void moek_matmul_bias_fwd_f16(const moek_ctx *ctx, const moek_f16 *x, const moek_f16 *w, const moek_f16 *b,
                              moek_f16 *y, int64_t N, int64_t K, int64_t M);
void moek_matmul_bias_bwd_f16(const moek_ctx *ctx, const moek_f16 *dy, const moek_f16 *x, const moek_f16 *w,
                              moek_f16 *dx, moek_f16 *dw, moek_f16 *db, int64_t N, int64_t K, int64_t M);

#endif
