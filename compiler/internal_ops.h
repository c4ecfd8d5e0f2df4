/* internal_ops.h - ops the compiler adds on its own (zero fills, gradient
 * sums, accumulation, the optimizer step) and helpers the later passes share
 * to read a node's kernel-argument template.
 *
 * Internal opdefs are ordinary ir_opdefs bound to kernels/moek.h symbols and
 * registered in the graph on first use under names starting with "__", which
 * no stdlib or user op can take.
 */
#ifndef MOEC_INTERNAL_OPS_H
#define MOEC_INTERNAL_OPS_H

#include "ir.h"

typedef enum iop_kind {
    IOP_FILL,          /* fresh value y = value:          moek_fill(OUT0, n, value) */
    IOP_FILL_INPLACE,  /* overwrite a pinned tensor:       moek_fill(IN0, n, value) */
    IOP_COPY,          /* y = x:                           moek_copy(IN0, OUT0, n) */
    IOP_ADD,           /* y = a + b:                       moek_add_fwd(IN0, IN1, OUT0, n) */
    IOP_ACCUMULATE,    /* dst += src (dst read and written) moek_accumulate(IN0, IN1, n) */
    IOP_SUMSQ_ACCUM,   /* *acc += sum(x^2):                moek_sumsq_accum(IN0, IN1, n) */
    IOP_ADAMW,         /* p, g, m, v, hyper, norm_sq; attr weight_decay */
    IOP_SGD,           /* p, g, buf, hyper, norm_sq; attr weight_decay */
    /* precision = bf16 (kernels/moek.h "bf16 storage") */
    IOP_FILL_BF16,       /* moek_fill_bf16(OUT0, n, value) */
    IOP_ADD_BF16,        /* moek_add_fwd_bf16(IN0, IN1, OUT0, n): bf16 gradient sums */
    IOP_ACCUMULATE_BF16, /* fp32 dst += bf16 src: moek_accumulate_bf16(IN0, IN1, n) */
    IOP_ADAMW_BF16,      /* p (bf16), master, g, m, v, hyper, norm_sq; attr weight_decay */
    IOP_SGD_BF16,        /* p (bf16), master, g, buf, hyper, norm_sq; attr weight_decay */
    /* precision = fp16: the same five with moek_f16 storage (the _f16 kernels) */
    IOP_FILL_F16,
    IOP_ADD_F16,
    IOP_ACCUMULATE_F16,
    IOP_ADAMW_F16,
    IOP_SGD_F16,
    IOP_COUNT
} iop_kind;

/* The variant of kind for values of this dtype: IOP_FILL, IOP_ADD,
 * IOP_ACCUMULATE (by the source's dtype), IOP_ADAMW and IOP_SGD (by the
 * param's dtype) have bf16 and f16 twins; other kinds and dtypes map to
 * themselves. */
iop_kind iop_for_dtype(iop_kind kind, int dtype);

/* The half storage types (PLAN_BF16, PLAN_F16): the kernel-symbol suffix of
 * their variants ("_bf16", "_f16"), the name they have in messages ("bf16",
 * "fp16"); NULL for every other dtype.  The one place that maps a dtype to
 * its kernel family. */
const char *iop_half_suffix(int dtype);
const char *iop_half_name(int dtype);

/* The opdef of an internal op, registered in g on first use. */
const ir_opdef *iop_def(ir_graph *g, iop_kind kind);
/* True if def is one of the compiler's internal opdefs. */
int iop_is_internal(const ir_opdef *def);
/* The internal op def is an instance of, or IOP_COUNT for any other def. */
iop_kind iop_kind_of(const ir_opdef *def);

/* Appends an internal-op node: n elements (the one dim), attribute a0 (the
 * fill value or the weight decay; ignored by ops without attributes). */
int iop_node(ir_graph *g, iop_kind kind, const int *inputs, const int *outputs, int64_t n,
             double a0, int phase, ir_srcloc loc, const char *what);

/* The kernel-argument template a node instantiates (fwd or bwd). */
const ir_ref *iop_template(const ir_node *n, int *count);
const char *iop_symbol(const ir_node *n);
/* The value a tensor reference of node n names: >= 0, -1 when the node has
 * no value there (a bug the callers report), or -2 for a non-tensor ref. */
int iop_ref_value(const ir_node *n, const ir_ref *r);

#endif
