/* ir.h - the graph IR: SSA ops on typed, fully shaped tensors.
 *
 * Elaboration (compiler/elaborate.c) turns the AST into an ir_graph holding
 * the forward pass; later passes (autodiff, optimizer, memory plan, emit)
 * extend and annotate the same graph.  Every op instance is an ir_node that
 * points at an ir_opdef - the resolved form of a stdlib `extern op` (or of a
 * compiler-internal op such as accumulate/adamw) - so no pass needs to know
 * what a transformer is: a kernel call is an opdef's argument template
 * instantiated with a node's tensors, dims and attributes.
 *
 * The graph owns all of its memory (one arena, dropped whole by
 * ir_graph_free), so an error path never leaks.
 */
#ifndef MOEC_IR_H
#define MOEC_IR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../runtime/plan.h"

#define IR_MAX_PORTS 8      /* inputs or outputs of one op */
#define IR_MAX_SYMS 12      /* dimension symbols or attributes of one op */

typedef struct ir_srcloc {
    const char *file;       /* owned by the graph (ir_strdup) */
    int line, col;          /* 1-based; 0 = compiler-generated */
} ir_srcloc;

/* One argument of a kernel call, as declared in an `extern op`. */
typedef enum ir_ref_kind {
    IR_REF_IN,      /* forward input #index (a tensor) */
    IR_REF_OUT,     /* forward output #index */
    IR_REF_DIN,     /* gradient of input #index (backward only; written by the kernel) */
    IR_REF_DOUT,    /* gradient of output #index (backward only; read) */
    IR_REF_DIM,     /* dimension symbol #index, passed as int64 */
    IR_REF_ATTR,    /* attribute #index, passed as the attribute's kind */
    IR_REF_INT,     /* literal int64 (value in .i) */
    IR_REF_FLOAT,   /* literal float (value in .f) */
} ir_ref_kind;

typedef struct ir_ref {
    ir_ref_kind kind;
    int index;
    int64_t i;
    double f;
} ir_ref;

typedef enum ir_bwd_kind {
    IR_BWD_NONE,         /* not differentiable: gradients stop here */
    IR_BWD_KERNEL,       /* one backward kernel writes every differentiable input's gradient */
    IR_BWD_PASSTHROUGH,  /* every differentiable input's gradient is d(output 0) (add) */
    IR_BWD_EXPR,         /* `backward { dx = op(dy, ...) }`: calls of other ops (bwd_expr) */
} ir_bwd_kind;

typedef struct ir_opdef {
    const char *name;                       /* "rmsnorm" */
    const char *lib;                        /* NULL: the device kernel library; else "libmyops.so" */
    ir_srcloc loc;                          /* where it was declared */
    int ninputs, noutputs, ndims, nattrs;
    const char *input_names[IR_MAX_PORTS];
    const char *output_names[IR_MAX_PORTS];
    bool input_diff[IR_MAX_PORTS];          /* gradient flows into this input */
    bool output_diff[IR_MAX_PORTS];         /* this output carries a gradient (not e.g. rstd, idx) */
    const char *dim_names[IR_MAX_SYMS];
    const char *attr_names[IR_MAX_SYMS];
    uint8_t attr_kinds[IR_MAX_SYMS];        /* PLAN_ARG_I64 or PLAN_ARG_F32 */
    const char *fwd_symbol;
    int nfwd;
    ir_ref fwd[PLAN_MAX_KERNEL_ARGS];
    ir_bwd_kind bwd_kind;
    const char *bwd_symbol;
    int nbwd;
    ir_ref bwd[PLAN_MAX_KERNEL_ARGS];
    const struct ir_fuse *fuse;             /* NULL, or the forward pattern this op replaces
                                               (`fuses { }`; compiler/fuse.h) */
    struct ir_bwd_expr *bwd_expr;           /* IR_BWD_EXPR: its instances (below); shared by
                                               the op's half-precision copies */
} ir_opdef;

typedef union ir_scalar {
    int64_t i;
    double f;
} ir_scalar;

/* Same attribute value, bit for bit (both members are 8 bytes, so .i
 * carries every bit of either; -0.0 and NaN payloads stay distinct). */
static inline bool ir_scalar_same(ir_scalar a, ir_scalar b)
{
    return a.i == b.i;
}

/* `backward { }` (IR_BWD_EXPR).  Elaboration runs the block once per forward
 * node with the ordinary call code (shapes, dtypes, half variants), keeps
 * the ops it called as steps and drops them from the graph; autodiff adds
 * the steps a wanted gradient needs as plain backward-phase nodes. */
typedef enum ir_bwd_src {
    IR_BWD_SRC_IN,       /* forward input #index */
    IR_BWD_SRC_OUT,      /* forward output #index */
    IR_BWD_SRC_DOUT,     /* gradient of output #index (zeros if none arrives) */
    IR_BWD_SRC_STEP,     /* output #port of step #index */
} ir_bwd_src;

typedef struct ir_bwd_ref {
    ir_bwd_src src;
    int index, port;
} ir_bwd_ref;

typedef struct ir_bwd_step {
    const ir_opdef *def;                    /* the instance for its dtype (scale<bf16>) */
    ir_bwd_ref in[IR_MAX_PORTS];            /* def->ninputs of them */
    int64_t dims[IR_MAX_SYMS];
    ir_scalar attrs[IR_MAX_SYMS];
    uint8_t out_dtype[IR_MAX_PORTS], out_ndim[IR_MAX_PORTS];
    int64_t out_shape[IR_MAX_PORTS][PLAN_MAX_DIMS];
} ir_bwd_step;

typedef struct ir_bwd_inst {
    int key;                                /* the forward node's output 0 */
    int nsteps;
    ir_bwd_step *steps;
    bool has_grad[IR_MAX_PORTS];            /* per forward input: the block assigns d<input> */
    ir_bwd_ref grad[IR_MAX_PORTS];          /* ... to this (a DOUT or a STEP) */
    struct ir_bwd_inst *next;
} ir_bwd_inst;

typedef struct ir_bwd_expr {
    ir_bwd_inst *first;
} ir_bwd_expr;

typedef struct ir_value {
    const char *name;          /* params: stable dotted path "layers.0.attn.wq"; others: debug name */
    uint8_t dtype;             /* enum plan_dtype */
    uint8_t storage;           /* enum plan_storage */
    uint8_t role;              /* enum plan_role */
    uint8_t ndim;
    int64_t shape[PLAN_MAX_DIMS];
    int producer;              /* node index, -1 for params, inputs and buffers */
    int param;                 /* index into params, -1 if not a param/buffer */
    /* A view lives inside another value of its storage class at a fixed
     * byte offset (compiler/pass_multi_tensor.c: one flat buffer per group
     * of params, each param a view of it).  The planner places the base
     * and puts the view at base offset + view_offset; it gets no bytes of
     * its own.  view_of = -1 for an ordinary value (ir_value_add). */
    int view_of;
    uint64_t view_offset;      /* PLAN_ALIGN multiple */
    /* set by later passes */
    int pool;                  /* memory planner */
    uint64_t offset;
} ir_value;

typedef struct ir_node {
    const ir_opdef *def;
    int inputs[IR_MAX_PORTS];   /* value indices */
    int outputs[IR_MAX_PORTS];
    int64_t dims[IR_MAX_SYMS];  /* resolved dimension symbols, in def->dim_names order */
    ir_scalar attrs[IR_MAX_SYMS];
    uint8_t phase;              /* enum plan_phase */
    bool is_backward;           /* instantiate def->bwd instead of def->fwd */
    int grad_of;                /* is_backward: the forward node this differentiates; else -1 */
    int grads_in[IR_MAX_PORTS]; /* is_backward: value of d(output i) or -1 */
    int grads_out[IR_MAX_PORTS];/* is_backward: value of d(input i) or -1 */
    ir_srcloc loc;
    const char *what;           /* human label: "attention (backward)" */
} ir_node;

typedef struct ir_param {
    int value;                 /* PARAM or BUFFER value */
    int grad;                  /* GRAD value, -1 until autodiff / for buffers */
    int state0, state1;        /* optimizer state values, -1 until the optimizer pass */
    uint32_t init;             /* enum plan_init */
    float init_std;
    bool decay;                /* weight decay applies (false for norms/biases unless configured) */
    bool frozen;
    int expert_axis;           /* -1, or the dim that indexes experts (for expert sharding) */
    int tied_to;               /* -1, or the param this one shares storage with */
    float active_fraction;     /* share used per token: 1 dense, top_k/E routed experts */
    ir_srcloc loc;
    int master;                /* bf16 params: the fp32 master copy (OPTSTATE value); -1 if
                                  none.  Set by the optimizer pass (it resets it first) */
} ir_param;

typedef struct ir_graph {
    struct ir_arena *arena;
    const char *model_name;
    uint64_t source_hash;

    const ir_opdef **defs; int ndefs, cap_defs;
    ir_value *values; int nvalues, cap_values;
    ir_node *nodes; int nnodes, cap_nodes;
    ir_param *params; int nparams, cap_params;
    const char **libs; int nlibs, cap_libs;    /* user kernel libraries named by opdefs */

    plan_train train;          /* from train { } (strings go in the fields below) */
    const char *data_path;     /* "" = embedded default corpus */
    ir_srcloc train_loc;
    int64_t par_ranks, par_expert, par_zero;   /* parallel { } */
    int loss;                  /* value returned by the model, -1 until set */
    int logits;                /* value kept for sampling, -1 if none */
    int64_t pool_bytes[PLAN_ST_COUNT];         /* memory planner */
    int recompute;             /* train { recompute }: enum memplan_recompute (memplan.h) */
} ir_graph;

ir_graph *ir_graph_new(void);
void ir_graph_free(ir_graph *g);

/* Memory owned by the graph's arena; never freed individually.  Abort only
 * on out-of-memory (the one failure a compiler cannot report usefully). */
void *ir_alloc(ir_graph *g, size_t bytes);
const char *ir_strdup(ir_graph *g, const char *s);
const char *ir_strfmt(ir_graph *g, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Registers an opdef (copied into the graph); returns it, or NULL if the
 * name is already taken. */
const ir_opdef *ir_def_add(ir_graph *g, const ir_opdef *def);
const ir_opdef *ir_def_find(const ir_graph *g, const char *name);

int ir_value_add(ir_graph *g, const char *name, int dtype, int storage, int ndim,
                 const int64_t *shape);
int ir_param_add(ir_graph *g, int value, const ir_param *p);
/* Appends a node; the caller has filled def, inputs, outputs, dims, attrs,
 * loc.  Sets producer of each output.  Returns the node index. */
int ir_node_add(ir_graph *g, const ir_node *n);

int64_t ir_value_numel(const ir_value *v);
uint64_t ir_value_bytes(const ir_value *v);
const char *ir_dtype_name(int dtype);
const char *ir_storage_name(int storage);

#endif
