/* elaborate.c - AST -> forward ir_graph.
 *
 * Pipeline: load (main file + imports, each file once) -> collect
 * declarations -> lower every `extern op` to an ir_opdef -> run the model
 * body as a compile-time interpreter: scalars fold, tensors become IR values,
 * op calls become nodes, block calls open a naming scope, loops unroll ->
 * read train { } and parallel { }.
 *
 * Parameter names: <scope>.<param>, where the model body is the empty scope,
 * `for i in a..n` adds "<n>.<i>" (n = the bound's name, else the loop
 * variable), and a block call adds its `name = "..."` argument or else the
 * block's name (then "<block>_1", "<block>_2" for later calls in the same
 * scope); `name = ""` adds nothing.
 *
 * Precision: a tensor type written `float[...]` is the model's float storage
 * type.  A `param` declared `float` is stored in the compute dtype (f32, or
 * bf16 with train { precision = bf16 }).  In a signature, every `float` port
 * of one call binds to the same dtype, taken from the arguments (f32 or
 * bf16; outputs with no float input take the compute dtype); an extern op
 * whose float ports bind to bf16 calls the `<symbol>_bf16` kernels.  Ports
 * written `f32` stay f32 whatever the precision (norm statistics, losses,
 * router probabilities and gates).
 */
#include "elaborate.h"
#include "../kernels/moek.h"

#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ast.h"
#include "internal_ops.h"   /* iop_half_suffix: the half dtypes' kernel families */
#include "fuse.h"           /* fuses { }: fusion rules on extern ops */

#define EL_MAX_DEPTH 64
#define EL_MAX_UNROLL 100000
#define EL_MAX_NUMEL (INT64_C(1) << 48)
#define EL_FLOAT 100    /* el_dtype of a `float[...]` tensor type: bound per call */

typedef enum { EV_NONE, EV_INT, EV_FLOAT, EV_BOOL, EV_STRING, EV_TENSOR, EV_TUPLE } ev_kind;

typedef struct ev {
    ev_kind k;
    int64_t i;
    double f;
    const char *s;
    int t;              /* tensor: value index */
    int n;              /* tuple */
    struct ev *items;
} ev;

typedef struct el_var {
    const char *name;
    ev v;
} el_var;

typedef struct el_env {
    el_var *vars;
    int n, cap;
} el_env;

/* One declared port of an extern op or a typed block parameter. */
typedef struct el_port {
    const ast_node *sig;
} el_port;

typedef struct el_op {
    const ast_node *ast;
    ir_opdef def;
    const ir_opdef *reg;
    int nin, nout, nattr;
    const ast_node *in[IR_MAX_PORTS], *out[IR_MAX_PORTS], *attr[IR_MAX_SYMS];
    const ast_node *derived[IR_MAX_SYMS];   /* per dim symbol: expression, or NULL */
    bool saved[IR_MAX_PORTS];
    bool ok;
    bool generic;                           /* some port is `float`: has bf16/f16 instances */
    const ir_opdef *reg_bf16, *reg_f16;     /* those instances, registered on first use */
    bool update;                            /* `phase = optimizer`: runs once per step, after
                                               the optimizer (e.g. a router bias step) */
    const ast_node *fwd16, *bwd16;          /* `forward_bf16`/`backward_bf16`: the bf16
                                               instance's calls when not `<symbol>_bf16` */
    const ast_node *fwdh, *bwdh;            /* `forward_f16`/`backward_f16`, likewise; absent,
                                               the bf16 calls with bf16 -> f16 in the symbol */
    const ast_node *fuses;                  /* `fuses { }`: the pattern it replaces (fuse.h) */
    ir_fuse *rule;                          /* its lowered form, shared by the half instances */
    const ast_node *bwd_body;               /* `backward { }`: gradients as calls of other ops */
    bool bwd_bad;                           /* its run for one call failed: not tried again */
} el_op;

typedef struct el_decl {
    const char *name;
    const ast_node *ast;
} el_decl;

typedef struct el_loss {
    int value;
    const char *name;
} el_loss;

typedef struct el_count {
    const char *key;
    int n;
} el_count;

typedef struct el {
    diag_ctx *d;
    ast_arena *arena;
    ir_graph *g;
    const elab_options *opt;
    uint64_t hash;
    const char **loaded; int nloaded;         /* realpaths */
    const ast_file **files; int nfiles;
    el_op *ops; int nops;
    el_decl *blocks; int nblocks;
    el_decl *models; int nmodels;
    el_decl *cfg; int ncfg;                   /* config entries */
    const ast_node *train, *parallel;
    el_env globals;
    ast_span *origin; int norigin;            /* where each IR value came from */
    el_loss *losses; int nlosses;
    el_count *counts; int ncounts;            /* default-name counters per scope */
    const ast_node *stack[EL_MAX_DEPTH]; const ast_node *calls[EL_MAX_DEPTH]; int depth;
    const ast_file *main;
    int compute;                              /* PLAN_F32, PLAN_BF16 or PLAN_F16: train { precision } */
    ir_node *updates; int nupdates;           /* optimizer-phase calls, appended after the model */
    int bwd_depth;                            /* > 0 while a `backward { }` block runs */
} el;

typedef struct el_frame {
    el_env env;
    const char *prefix;
    bool returned;
    ev ret;
} el_frame;

static void *el_grow(void *p, int n, int *cap, size_t sz)
{
    if (n < *cap)
        return p;
    *cap = *cap ? *cap * 2 : 8;
    void *q = realloc(p, (size_t)*cap * sz);
    if (!q)
        abort();
    return q;
}
#define EL_PUSH(arr, n, cap, item)                                   \
    do {                                                             \
        (arr) = el_grow((arr), (n), &(cap), sizeof *(arr));           \
        (arr)[(n)++] = (item);                                       \
    } while (0)

static const char *el_fmt(el *E, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static const char *el_fmt(el *E, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return ast_strndup(E->arena, buf, strlen(buf));
}

#define ERR(at, hint, ...) diag_error(E->d, (at), (hint), __VA_ARGS__)

/* ---------------------------------------------------------------- values */

static ev ev_int(int64_t i) { ev v = {.k = EV_INT, .i = i}; return v; }
static ev ev_float(double f) { ev v = {.k = EV_FLOAT, .f = f}; return v; }
static ev ev_bool(bool b) { ev v = {.k = EV_BOOL, .i = b}; return v; }
static ev ev_tensor(int t) { ev v = {.k = EV_TENSOR, .t = t}; return v; }
static const ev ev_none = {.k = EV_NONE};

static const char *ev_kind_name(ev_kind k)
{
    static const char *const n[] = {"nothing", "int", "float", "bool", "string", "tensor", "tuple"};
    return n[k];
}

static bool ev_is_num(const ev *v) { return v->k == EV_INT || v->k == EV_FLOAT || v->k == EV_BOOL; }
static double ev_num(const ev *v) { return v->k == EV_FLOAT ? v->f : (double)v->i; }

static const char *el_shape_str(el *E, int t)
{
    const ir_value *v = &E->g->values[t];
    char buf[256];
    int off = snprintf(buf, sizeof buf, "%s[", ir_dtype_name(v->dtype));
    for (int i = 0; i < v->ndim; i++)
        off += snprintf(buf + off, sizeof buf - (size_t)off, "%s%" PRId64, i ? ", " : "", v->shape[i]);
    snprintf(buf + off, sizeof buf - (size_t)off, "]");
    return el_fmt(E, "%s", buf);
}

static void env_set(el_env *env, const char *name, ev v)
{
    for (int i = 0; i < env->n; i++)
        if (strcmp(env->vars[i].name, name) == 0) {
            env->vars[i].v = v;
            return;
        }
    el_var var = {name, v};
    EL_PUSH(env->vars, env->n, env->cap, var);
}

static const ev *env_get(const el_env *env, const char *name)
{
    for (int i = 0; i < env->n; i++)
        if (strcmp(env->vars[i].name, name) == 0)
            return &env->vars[i].v;
    return NULL;
}

static int el_value(el *E, const char *name, int dtype, int storage, int ndim, const int64_t *shape,
                    ast_span at)
{
    int t = ir_value_add(E->g, name, dtype, storage, ndim, shape);
    E->origin = el_grow(E->origin, t, &E->norigin, sizeof *E->origin);
    E->origin[t] = at;
    return t;
}

static ast_span el_origin(el *E, int t)
{
    ast_span none = {0};
    return t >= 0 && t < E->g->nvalues ? E->origin[t] : none;
}

static ir_srcloc el_loc(el *E, ast_span s)
{
    ir_srcloc l = {ir_strdup(E->g, s.file ? s.file : ""), s.line, s.col};
    return l;
}

/* ----------------------------------------------------------- loading */

static char *el_read(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        abort();
    size_t r;
    while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf)
                abort();
        }
    }
    fclose(f);
    *len = n;
    return buf;
}

static bool el_is_file(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static void el_load(el *E, const char *path, const char *text, size_t len);

static void el_import(el *E, const ast_node *imp, const char *from_file)
{
    const char *name = imp->name;
    size_t nl = strlen(name);
    const char *file = nl > 4 && strcmp(name + nl - 4, ".moe") == 0 ? name : el_fmt(E, "%s.moe", name);
    const char *dirs[64];
    int nd = 0;
    const char *slash = strrchr(from_file, '/');
    dirs[nd++] = slash ? el_fmt(E, "%.*s", (int)(slash - from_file), from_file) : ".";
    for (int i = 0; i < E->opt->ninclude && nd < 60; i++)
        dirs[nd++] = E->opt->include_dirs[i];
    if (E->opt->moec_path) {
        const char *p = E->opt->moec_path;
        while (*p && nd < 62) {
            const char *c = strchr(p, ':');
            size_t n = c ? (size_t)(c - p) : strlen(p);
            if (n)
                dirs[nd++] = ast_strndup(E->arena, p, n);
            p += n + (c ? 1 : 0);
        }
    }
    if (E->opt->stdlib_dir)
        dirs[nd++] = E->opt->stdlib_dir;
    char searched[2048];
    size_t off = 0;
    searched[0] = 0;
    for (int i = 0; i < nd; i++) {
        const char *cand = file[0] == '/' ? file : el_fmt(E, "%s/%s", dirs[i], file);
        if (strncmp(cand, "./", 2) == 0)
            cand += 2;
        if (el_is_file(cand)) {
            el_load(E, cand, NULL, 0);
            return;
        }
        if (off < sizeof searched)
            off += (size_t)snprintf(searched + off, sizeof searched - off, "%s%s", i ? ", " : "", cand);
        if (file[0] == '/')
            break;
    }
    ERR(imp->span, "add a directory with -I, set MOEC_PATH, or point --stdlib at the standard library",
        "import \"%s\" not found (searched %s)", name, searched);
}

static void el_add_decl(el *E, el_decl **arr, int *n, const ast_node *d)
{
    /* one namespace for ops and blocks: a second definition is an error */
    const ast_node *prev = NULL;
    for (int i = 0; i < E->nblocks && !prev; i++)
        if (strcmp(E->blocks[i].name, d->name) == 0)
            prev = E->blocks[i].ast;
    for (int i = 0; i < E->nops && !prev; i++)
        if (strcmp(E->ops[i].ast->name, d->name) == 0)
            prev = E->ops[i].ast;
    for (int i = 0; i < E->nmodels && !prev; i++)
        if (strcmp(E->models[i].name, d->name) == 0)
            prev = E->models[i].ast;
    if (prev) {
        ERR(d->span, "rename one of them", "duplicate definition of `%s`", d->name);
        diag_note(E->d, prev->span, "`%s` was first defined here", d->name);
        return;
    }
    if (arr) {
        int cap = *n;   /* arrays grow by exact size: few declarations */
        el_decl x = {d->name, d};
        *arr = realloc(*arr, (size_t)(cap + 1) * sizeof **arr);
        if (!*arr)
            abort();
        (*arr)[(*n)++] = x;
    }
}

static void el_collect(el *E, const ast_file *f)
{
    for (int i = 0; i < f->decls.n; i++) {
        const ast_node *d = f->decls.items[i];
        switch (d->kind) {
        case AST_IMPORT: el_import(E, d, f->path); break;
        case AST_BLOCK: el_add_decl(E, &E->blocks, &E->nblocks, d); break;
        case AST_MODEL: el_add_decl(E, &E->models, &E->nmodels, d); break;
        case AST_EXTERN_OP: {
            int before = diag_count(E->d);
            el_add_decl(E, NULL, NULL, d);
            if (diag_count(E->d) == before) {
                E->ops = realloc(E->ops, (size_t)(E->nops + 1) * sizeof *E->ops);
                if (!E->ops)
                    abort();
                memset(&E->ops[E->nops], 0, sizeof *E->ops);
                E->ops[E->nops++].ast = d;
            }
            break;
        }
        case AST_CONFIG:
            for (int j = 0; j < d->list.n; j++) {
                const ast_node *e = d->list.items[j];
                bool dup = false;
                for (int k = 0; k < E->ncfg && !dup; k++)
                    if (strcmp(E->cfg[k].name, e->name) == 0) {
                        ERR(e->span, "each config name is defined once", "duplicate definition of `%s`", e->name);
                        diag_note(E->d, E->cfg[k].ast->span, "`%s` was first defined here", e->name);
                        dup = true;
                    }
                if (!dup) {
                    E->cfg = realloc(E->cfg, (size_t)(E->ncfg + 1) * sizeof *E->cfg);
                    if (!E->cfg)
                        abort();
                    E->cfg[E->ncfg].name = e->name;
                    E->cfg[E->ncfg++].ast = e;
                }
            }
            break;
        case AST_TRAIN:
        case AST_PARALLEL: {
            const ast_node **slot = d->kind == AST_TRAIN ? &E->train : &E->parallel;
            if (*slot) {
                ERR(d->span, "merge them into one", "duplicate `%s { }` section", d->kind == AST_TRAIN ? "train" : "parallel");
                diag_note(E->d, (*slot)->span, "the first one is here");
            } else {
                *slot = d;
            }
            break;
        }
        default: break;
        }
    }
}

static void el_load(el *E, const char *path, const char *text, size_t len)
{
    char *owned = NULL;
    char *real = realpath(path, NULL);
    const char *key = real ? real : path;
    for (int i = 0; i < E->nloaded; i++)
        if (strcmp(E->loaded[i], key) == 0) {   /* each file once: cycles are harmless */
            free(real);
            return;
        }
    E->loaded = realloc(E->loaded, (size_t)(E->nloaded + 1) * sizeof *E->loaded);
    if (!E->loaded)
        abort();
    E->loaded[E->nloaded++] = ast_strndup(E->arena, key, strlen(key));
    free(real);
    if (!text) {
        owned = el_read(path, &len);
        if (!owned) {
            diag_plain(E->d, "cannot read %s: %s", path, strerror(errno));
            return;
        }
        text = owned;
    }
    E->hash = plan_fnv1a(text, len, E->hash);
    const ast_file *f = ast_parse(E->arena, E->d, path, text, len);
    free(owned);
    if (!E->main)
        E->main = f;
    E->files = realloc(E->files, (size_t)(E->nfiles + 1) * sizeof *E->files);
    if (!E->files)
        abort();
    E->files[E->nfiles++] = f;
    el_collect(E, f);
}

/* ----------------------------------------------------- name suggestions */

static const char *el_suggest(el *E, const char *name, const el_env *env, bool callables)
{
    const char *c[512];
    int n = 0;
    if (env)
        for (int i = 0; i < env->n && n < 500; i++)
            c[n++] = env->vars[i].name;
    if (!callables)
        for (int i = 0; i < E->globals.n && n < 500; i++)
            c[n++] = E->globals.vars[i].name;
    if (callables) {
        static const char *const builtins[] = {"ceil", "floor", "min", "max", "int", "float",
                                               "add_loss", "shared", "error",
                                               "add_expert_load", "hyper", "one_of"};
        for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++)
            c[n++] = builtins[i];
        for (int i = 0; i < E->nops && n < 500; i++)
            c[n++] = E->ops[i].ast->name;
        for (int i = 0; i < E->nblocks && n < 500; i++)
            c[n++] = E->blocks[i].name;
    }
    const char *best = diag_closest(name, c, n);
    return best ? el_fmt(E, "did you mean `%s`?", best) : NULL;
}

static const char *el_suggest_list(el *E, const char *name, const char *const *c, int n)
{
    const char *best = diag_closest(name, c, n);
    return best ? el_fmt(E, "did you mean `%s`?", best) : NULL;
}

/* --------------------------------------------------------- expressions */

static ev el_eval(el *E, el_frame *fr, const ast_node *x);
static void el_exec(el *E, el_frame *fr, const ast_list *body);

static bool el_want_num(el *E, const ev *v, const ast_node *at, const char *what)
{
    if (ev_is_num(v))
        return true;
    if (v->k != EV_NONE)
        ERR(at->span, NULL, "%s must be a number, got a %s", what, ev_kind_name(v->k));
    return false;
}

/* Integer division that stays an int when exact: 64 / 4 is 4, 2 / 8 is 0.25. */
static ev el_arith(el *E, int op, ev a, ev b, const ast_node *x)
{
    bool ints = a.k != EV_FLOAT && b.k != EV_FLOAT;
    double fa = ev_num(&a), fb = ev_num(&b);
    int64_t ia = a.i, ib = b.i, r;
    switch (op) {
    case '+':
        if (ints) {
            if (__builtin_add_overflow(ia, ib, &r))
                goto overflow;
            return ev_int(r);
        }
        return ev_float(fa + fb);
    case '-':
        if (ints) {
            if (__builtin_sub_overflow(ia, ib, &r))
                goto overflow;
            return ev_int(r);
        }
        return ev_float(fa - fb);
    case '*':
        if (ints) {
            if (__builtin_mul_overflow(ia, ib, &r))
                goto overflow;
            return ev_int(r);
        }
        return ev_float(fa * fb);
    case '/':
    case AST_OP_IDIV:
    case '%':
        if (fb == 0) {
            ERR(x->span, NULL, "division by zero");
            return ev_none;
        }
        if (op == '%') {
            if (ints)
                return ev_int(ia % ib);
            return ev_float(fmod(fa, fb));
        }
        if (op == AST_OP_IDIV)
            return ints ? ev_int(ia / ib) : ev_float(floor(fa / fb));
        if (ints && ia % ib == 0)
            return ev_int(ia / ib);
        return ev_float(fa / fb);
    case '<': return ev_bool(fa < fb);
    case '>': return ev_bool(fa > fb);
    case AST_OP_LE: return ev_bool(fa <= fb);
    case AST_OP_GE: return ev_bool(fa >= fb);
    case AST_OP_EQ: return ev_bool(fa == fb);
    case AST_OP_NE: return ev_bool(fa != fb);
    case AST_OP_AND: return ev_bool(fa != 0 && fb != 0);
    case AST_OP_OR: return ev_bool(fa != 0 || fb != 0);
    default: break;
    }
    return ev_none;
overflow:
    ERR(x->span, "dimensions and constants are 64-bit signed integers", "integer overflow in `%s`",
        ast_op_name(op));
    return ev_none;
}

static const el_op *el_find_op(el *E, const char *name)
{
    for (int i = 0; i < E->nops; i++)
        if (strcmp(E->ops[i].ast->name, name) == 0)
            return E->ops[i].ok ? &E->ops[i] : NULL;
    return NULL;
}

static ev el_call_op(el *E, el_frame *fr, const el_op *op, const ast_node *call, ev *pos, int npos,
                     const ast_node **kwn, ev *kwv, int nkw);

/* tensor (op) tensor or scalar: + -> add, - -> add(a, scale(b, -1)), * and / by a scalar -> scale */
static ev el_tensor_arith(el *E, el_frame *fr, int op, ev a, ev b, const ast_node *x)
{
    const char *need = (op == '+' || op == '-') && a.k == EV_TENSOR && b.k == EV_TENSOR ? "add" : "scale";
    if (a.k == EV_TENSOR && b.k == EV_TENSOR && op != '+' && op != '-') {
        ERR(x->span, "elementwise products of tensors need their own extern op",
            "operator `%s` is not defined for two tensors", ast_op_name(op));
        return ev_none;
    }
    if ((op == '+' || op == '-') && (a.k != EV_TENSOR || b.k != EV_TENSOR)) {
        ERR(x->span, "add a tensor to a tensor; scale a tensor by a number with `*`",
            "operator `%s` between a tensor and a %s", ast_op_name(op), ev_kind_name(a.k == EV_TENSOR ? b.k : a.k));
        return ev_none;
    }
    if (op == '/' && a.k != EV_TENSOR) {
        ERR(x->span, NULL, "cannot divide a number by a tensor");
        return ev_none;
    }
    if (op != '+' && op != '-' && op != '*' && op != '/') {
        ERR(x->span, NULL, "operator `%s` is not defined for tensors", ast_op_name(op));
        return ev_none;
    }
    const el_op *add = el_find_op(E, "add"), *scale = el_find_op(E, "scale");
    if ((strcmp(need, "add") == 0 && !add) || !scale) {
        ERR(x->span, "import \"core\" (or \"nn\") declares it",
            "tensor arithmetic needs the extern op `%s`, which is not declared", !scale ? "scale" : need);
        return ev_none;
    }
    if (op == '+')
        return el_call_op(E, fr, add, x, (ev[]){a, b}, 2, NULL, NULL, 0);
    if (op == '-') {
        ev nb = el_call_op(E, fr, scale, x, (ev[]){b, ev_float(-1.0)}, 2, NULL, NULL, 0);
        if (nb.k != EV_TENSOR)
            return ev_none;
        return el_call_op(E, fr, add, x, (ev[]){a, nb}, 2, NULL, NULL, 0);
    }
    ev t = a.k == EV_TENSOR ? a : b, s = a.k == EV_TENSOR ? b : a;
    if (!el_want_num(E, &s, x, "a tensor's scale"))
        return ev_none;
    double f = ev_num(&s);
    if (op == '/') {
        if (f == 0) {
            ERR(x->span, NULL, "division by zero");
            return ev_none;
        }
        f = 1.0 / f;
    }
    return el_call_op(E, fr, scale, x, (ev[]){t, ev_float(f)}, 2, NULL, NULL, 0);
}

static ev el_call(el *E, el_frame *fr, const ast_node *x);

static ev el_eval(el *E, el_frame *fr, const ast_node *x)
{
    switch (x->kind) {
    case AST_INT: return ev_int(x->i);
    case AST_FLOAT: return ev_float(x->f);
    case AST_BOOL: return ev_bool(x->i != 0);
    case AST_STRING: { ev v = {.k = EV_STRING, .s = x->name}; return v; }
    case AST_NAME: {
        const ev *v = fr ? env_get(&fr->env, x->name) : NULL;
        if (!v)
            v = env_get(&E->globals, x->name);
        if (v)
            return *v;
        ERR(x->span, el_suggest(E, x->name, fr ? &fr->env : NULL, false), "unknown identifier `%s`", x->name);
        return ev_none;
    }
    case AST_TUPLE: {
        ev t = {.k = EV_TUPLE, .n = x->list.n};
        t.items = ast_alloc(E->arena, (size_t)t.n * sizeof *t.items);
        for (int i = 0; i < t.n; i++)
            t.items[i] = el_eval(E, fr, x->list.items[i]);
        return t;
    }
    case AST_UNOP: {
        ev a = el_eval(E, fr, x->a);
        if (a.k == EV_NONE)
            return a;
        if (x->op == AST_OP_NOT) {
            if (!el_want_num(E, &a, x->a, "the operand of `not`"))
                return ev_none;
            return ev_bool(ev_num(&a) == 0);
        }
        if (a.k == EV_TENSOR)
            return el_tensor_arith(E, fr, '*', a, ev_float(-1.0), x);
        if (!el_want_num(E, &a, x->a, "the operand of `-`"))
            return ev_none;
        return a.k == EV_FLOAT ? ev_float(-a.f) : ev_int(-a.i);
    }
    case AST_BINOP: {
        ev a = el_eval(E, fr, x->a), b = el_eval(E, fr, x->b);
        if (a.k == EV_NONE || b.k == EV_NONE)
            return ev_none;
        if (a.k == EV_TENSOR || b.k == EV_TENSOR)
            return el_tensor_arith(E, fr, x->op, a, b, x);
        if (a.k == EV_STRING && b.k == EV_STRING && (x->op == AST_OP_EQ || x->op == AST_OP_NE))
            return ev_bool((strcmp(a.s, b.s) == 0) == (x->op == AST_OP_EQ));
        if (!el_want_num(E, &a, x->a, "an operand") || !el_want_num(E, &b, x->b, "an operand"))
            return ev_none;
        return el_arith(E, x->op, a, b, x);
    }
    case AST_CALL: return el_call(E, fr, x);
    default: break;
    }
    ERR(x->span, NULL, "this is not an expression");
    return ev_none;
}

/* ------------------------------------------------- shapes and dimensions */

/* A dimension value: an int > 0 (or >= 0 when zero_ok). */
static bool el_dim(el *E, ev v, const ast_node *at, int64_t *out, bool zero_ok)
{
    if (v.k == EV_NONE)
        return false;
    if (v.k == EV_FLOAT) {
        if (v.f == floor(v.f) && fabs(v.f) < 9e15) {
            v = ev_int((int64_t)v.f);
        } else {
            ERR(at->span, "dimensions are whole numbers; use `//` or ceil() to round",
                "dimension must be an integer, got %g", v.f);
            return false;
        }
    }
    if (v.k != EV_INT) {
        ERR(at->span, NULL, "dimension must be an integer, got a %s", ev_kind_name(v.k));
        return false;
    }
    if (v.i < 0 || (v.i == 0 && !zero_ok)) {
        ERR(at->span, NULL, "dimension must be positive, got %" PRId64, v.i);
        return false;
    }
    *out = v.i;
    return true;
}

static bool el_numel_ok(el *E, const int64_t *shape, int n, ast_span at)
{
    int64_t p = 1;
    for (int i = 0; i < n; i++)
        if (__builtin_mul_overflow(p, shape[i], &p) || p > EL_MAX_NUMEL) {
            ERR(at, "a tensor may hold at most 2^48 elements", "tensor size overflows");
            return false;
        }
    return true;
}

static int el_dtype(el *E, const ast_node *type, bool *tensor)
{
    const char *n = type->name;
    *tensor = type->flags & AST_F_HAS_TYPE;
    if (*tensor) {
        if (strcmp(n, "f32") == 0) return PLAN_F32;
        if (strcmp(n, "i32") == 0) return PLAN_I32;
        if (strcmp(n, "float") == 0) return EL_FLOAT;
        if (strcmp(n, "bf16") == 0 || strcmp(n, "f16") == 0) {
            ERR(type->span, "use precision = ... in train { }; tensors are declared f32",
                "dtype `%s` is not supported in declarations", n);
            return -1;
        }
        static const char *const t[] = {"f32", "i32", "float"};
        ERR(type->span, el_suggest_list(E, n, t, 3), "unknown dtype `%s`", n);
        return -1;
    }
    static const char *const s[] = {"int", "float", "bool", "string"};
    for (int i = 0; i < 4; i++)
        if (strcmp(n, s[i]) == 0)
            return i;
    ERR(type->span, el_suggest_list(E, n, s, 4), "unknown type `%s`", n);
    return -1;
}

/* Binds/checks one tensor against a typed signature entry.  `syms` holds
 * dimension symbols bound so far (and, for star symbols, their leading
 * dims in `lead`).  Returns false after reporting. */
typedef struct el_syms {
    const char *name[IR_MAX_SYMS * 2];
    int64_t val[IR_MAX_SYMS * 2];
    int from[IR_MAX_SYMS * 2];           /* value it was bound from */
    int nlead[IR_MAX_SYMS * 2];          /* star symbols: number of leading dims, else -1 */
    int64_t lead[IR_MAX_SYMS * 2][PLAN_MAX_DIMS];
    int n;
    int float_dt;                        /* dtype `float` ports bound to; 0 = not yet (+1 offset) */
    int float_from;                      /* the value it was bound from */
} el_syms;

static int syms_find(const el_syms *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->name[i], name) == 0)
            return i;
    return -1;
}

static void el_mismatch(el *E, const ast_node *call, const char *callee, const char *sym, int64_t had,
                        int from, int64_t got, int t, const char *port)
{
    ERR(call->span, NULL,
        "shape mismatch in `%s`: %s is %" PRId64 " from %s but %" PRId64 " from `%s` %s",
        callee, sym, had, from >= 0 ? el_fmt(E, "%s", el_shape_str(E, from)) : "an argument", got, port,
        el_shape_str(E, t));
    if (from >= 0 && el_origin(E, from).file)
        diag_note(E->d, el_origin(E, from), "%s comes from this %s", el_shape_str(E, from),
                  E->g->values[from].name);
    if (el_origin(E, t).file)
        diag_note(E->d, el_origin(E, t), "%s comes from this %s", el_shape_str(E, t), E->g->values[t].name);
}

static bool el_bind_tensor(el *E, el_frame *scope, el_syms *s, const ast_node *sig, int t, const ast_node *call,
                           const char *callee)
{
    const ast_node *type = sig->a;
    bool tensor;
    int dt = el_dtype(E, type, &tensor);
    if (dt < 0)
        return false;
    const ir_value *v = &E->g->values[t];
    if (dt == EL_FLOAT) {
        if (v->dtype != PLAN_F32 && !iop_half_suffix(v->dtype)) {
            ERR(call->span, "token ids and expert indices are i32; `float` ports take f32, bf16 or f16",
                "dtype mismatch in `%s`: `%s` must be a float tensor, got %s", callee, sig->name,
                el_shape_str(E, t));
            if (el_origin(E, t).file)
                diag_note(E->d, el_origin(E, t), "%s comes from here", el_shape_str(E, t));
            return false;
        }
        if (s->float_dt && s->float_dt - 1 != v->dtype) {
            ERR(call->span, "every `float` port of one call has the same dtype",
                "dtype mismatch in `%s`: `%s` is %s but an earlier float argument is %s", callee,
                sig->name, el_shape_str(E, t), el_shape_str(E, s->float_from));
            if (el_origin(E, s->float_from).file)
                diag_note(E->d, el_origin(E, s->float_from), "%s comes from here",
                          el_shape_str(E, s->float_from));
            return false;
        }
        s->float_dt = v->dtype + 1;
        s->float_from = t;
    } else if (v->dtype != dt) {
        /* routing ops keep their scores fp32 in every precision (docs/moe.md) */
        bool route = dt == PLAN_F32 && (v->dtype == PLAN_BF16 || v->dtype == PLAN_F16) &&
                     (strcmp(sig->name, "scores") == 0 || strcmp(sig->name, "logits") == 0 ||
                      strcmp(sig->name, "probs") == 0);
        const char *hint = dt == PLAN_I32 ? "token ids and expert indices are i32"
                         : route ? "router logits, scores and gates are fp32 in every precision: "
                                   "convert with to_f32(...) first (import \"moe\"), as the moe block does"
                         : dt == PLAN_F32 && v->dtype == PLAN_BF16
                             ? "precision = bf16 stores activations as bf16: declare the port `float` "
                               "(and give the op a <kernel>_bf16 variant) to accept them"
                         : dt == PLAN_F32 && v->dtype == PLAN_F16
                             ? "precision = fp16 stores activations as f16: declare the port `float` "
                               "(and give the op a <kernel>_f16 variant) to accept them"
                             : NULL;
        ERR(call->span, hint,
            "dtype mismatch in `%s`: `%s` must be %s, got %s", callee, sig->name, ir_dtype_name(dt),
            el_shape_str(E, t));
        if (el_origin(E, t).file)
            diag_note(E->d, el_origin(E, t), "%s comes from here", el_shape_str(E, t));
        return false;
    }
    const ast_list *dims = &type->list;
    bool star = dims->n > 0 && (dims->items[0]->flags & AST_F_STAR);
    int fixed = dims->n - (star ? 1 : 0);
    if ((!star && v->ndim != dims->n) || (star && v->ndim < fixed)) {
        ERR(call->span, NULL, "shape mismatch in `%s`: `%s` must have %s%d dims, got %s", callee, sig->name,
            star ? "at least " : "", fixed, el_shape_str(E, t));
        if (el_origin(E, t).file)
            diag_note(E->d, el_origin(E, t), "%s comes from here", el_shape_str(E, t));
        return false;
    }
    int nlead = v->ndim - fixed;
    if (star) {
        const char *sym = dims->items[0]->name;
        int64_t p = 1;
        for (int i = 0; i < nlead; i++)
            p *= v->shape[i];
        int k = syms_find(s, sym);
        if (k >= 0) {
            bool same = s->nlead[k] < 0 ? s->val[k] == p : s->nlead[k] == nlead;
            for (int i = 0; same && s->nlead[k] >= 0 && i < nlead; i++)
                same = s->lead[k][i] == v->shape[i];
            if (!same) {
                ERR(call->span, NULL, "shape mismatch in `%s`: leading dims *%s differ between %s and `%s` %s",
                    callee, sym, s->from[k] >= 0 ? el_shape_str(E, s->from[k]) : "an argument", sig->name,
                    el_shape_str(E, t));
                if (s->from[k] >= 0 && el_origin(E, s->from[k]).file)
                    diag_note(E->d, el_origin(E, s->from[k]), "%s comes from here", el_shape_str(E, s->from[k]));
                if (el_origin(E, t).file)
                    diag_note(E->d, el_origin(E, t), "%s comes from here", el_shape_str(E, t));
                return false;
            }
        } else if (s->n < IR_MAX_SYMS * 2) {
            k = s->n++;
            s->name[k] = sym;
            s->val[k] = p;
            s->from[k] = t;
            s->nlead[k] = nlead;
            for (int i = 0; i < nlead; i++)
                s->lead[k][i] = v->shape[i];
        }
    }
    for (int i = 0; i < fixed; i++) {
        const ast_node *dn = dims->items[i + (star ? 1 : 0)];
        int64_t got = v->shape[nlead + i];
        const ast_node *e = dn->a;
        if (e->kind == AST_NAME) {
            int k = syms_find(s, e->name);
            bool defined = k >= 0 || (scope && env_get(&scope->env, e->name)) || env_get(&E->globals, e->name);
            if (!defined) {
                if (s->n < IR_MAX_SYMS * 2) {
                    k = s->n++;
                    s->name[k] = e->name;
                    s->val[k] = got;
                    s->from[k] = t;
                    s->nlead[k] = -1;
                }
                continue;
            }
            if (k >= 0) {
                if (s->val[k] != got) {
                    el_mismatch(E, call, callee, e->name, s->val[k], s->from[k], got, t, sig->name);
                    return false;
                }
                continue;
            }
        }
        /* an expression of bound symbols and constants */
        el_frame tmp = {0};
        if (scope)
            for (int j = 0; j < scope->env.n; j++)
                env_set(&tmp.env, scope->env.vars[j].name, scope->env.vars[j].v);
        for (int j = 0; j < s->n; j++)
            env_set(&tmp.env, s->name[j], ev_int(s->val[j]));
        ev want = el_eval(E, &tmp, e);
        free(tmp.env.vars);
        int64_t w;
        if (!el_dim(E, want, e, &w, true))
            return false;
        if (w != got) {
            ERR(call->span, NULL, "shape mismatch in `%s`: dim %d of `%s` must be %" PRId64 ", got %s", callee,
                nlead + i, sig->name, w, el_shape_str(E, t));
            if (el_origin(E, t).file)
                diag_note(E->d, el_origin(E, t), "%s comes from here", el_shape_str(E, t));
            return false;
        }
    }
    return true;
}

/* ----------------------------------------------------- argument binding */

/* Matches positional and keyword arguments to a signature.  out[i] is the
 * value for sig param i (EV_NONE + has[i] false when missing). */
static bool el_bind_args(el *E, const ast_node *call, const char *callee, const ast_list *sig, ev *pos, int npos,
                         const ast_node **kwn, ev *kwv, int nkw, ev *out, bool *has, const char *extra_kw)
{
    bool ok = true;
    for (int i = 0; i < sig->n; i++)
        has[i] = false;
    if (npos > sig->n) {
        ERR(call->span, NULL, "`%s` takes at most %d argument%s, got %d", callee, sig->n, sig->n == 1 ? "" : "s",
            npos);
        return false;
    }
    for (int i = 0; i < npos; i++) {
        out[i] = pos[i];
        has[i] = true;
    }
    for (int j = 0; j < nkw; j++) {
        if (extra_kw && strcmp(kwn[j]->name, extra_kw) == 0)
            continue;
        int k = -1;
        for (int i = 0; i < sig->n; i++)
            if (strcmp(sig->items[i]->name, kwn[j]->name) == 0)
                k = i;
        if (k < 0) {
            const char *c[IR_MAX_SYMS * 3];
            int n = 0;
            for (int i = 0; i < sig->n && n < IR_MAX_SYMS * 3; i++)
                c[n++] = sig->items[i]->name;
            ERR(kwn[j]->span, el_suggest_list(E, kwn[j]->name, c, n), "`%s` has no argument `%s`", callee,
                kwn[j]->name);
            ok = false;
            continue;
        }
        if (has[k]) {
            ERR(kwn[j]->span, NULL, "argument `%s` of `%s` given twice", kwn[j]->name, callee);
            ok = false;
            continue;
        }
        out[k] = kwv[j];
        has[k] = true;
    }
    return ok;
}

/* ------------------------------------------------------------ op calls */

static const ir_opdef *el_half_def(el *E, el_op *op, const ast_node *call, int dtype);
static void el_bwd_instance(el *E, el_op *op, const ir_node *fn);

static ev el_call_op(el *E, el_frame *fr, const el_op *op, const ast_node *call, ev *pos, int npos,
                     const ast_node **kwn, ev *kwv, int nkw)
{
    const ast_node *a = op->ast;
    const char *name = a->name;
    ev args[IR_MAX_PORTS + IR_MAX_SYMS];
    bool has[IR_MAX_PORTS + IR_MAX_SYMS];
    if (!el_bind_args(E, call, name, &a->list, pos, npos, kwn, kwv, nkw, args, has, NULL))
        return ev_none;
    el_syms s = {0};
    ir_node node;
    memset(&node, 0, sizeof node);
    node.def = op->reg;
    node.grad_of = -1;
    for (int i = 0; i < IR_MAX_PORTS; i++)
        node.inputs[i] = node.outputs[i] = node.grads_in[i] = node.grads_out[i] = -1;
    /* attributes first: input dims may refer to them */
    el_frame attrs = {0};
    bool ok = true;
    int ai = 0;
    for (int i = 0; i < a->list.n; i++) {
        const ast_node *sp = a->list.items[i];
        bool tensor = sp->a && (sp->a->flags & AST_F_HAS_TYPE);
        if (tensor)
            continue;
        ev v = has[i] ? args[i] : ev_none;
        if (!has[i]) {
            if (!sp->b) {
                ERR(call->span, NULL, "missing argument `%s` of `%s`", sp->name, name);
                ok = false;
                ai++;
                continue;
            }
            v = el_eval(E, NULL, sp->b);
        }
        if (v.k == EV_NONE) {
            ok = false;
            ai++;
            continue;
        }
        if (!ev_is_num(&v)) {
            ERR(call->span, NULL, "argument `%s` of `%s` must be a number, got a %s", sp->name, name,
                ev_kind_name(v.k));
            ok = false;
        } else if (op->def.attr_kinds[ai] == PLAN_ARG_I64) {
            if (v.k == EV_FLOAT && v.f != floor(v.f)) {
                ERR(call->span, NULL, "argument `%s` of `%s` must be an integer, got %g", sp->name, name, v.f);
                ok = false;
            }
            node.attrs[ai].i = (int64_t)ev_num(&v);
            env_set(&attrs.env, sp->name, ev_int(node.attrs[ai].i));
        } else {
            node.attrs[ai].f = ev_num(&v);
            env_set(&attrs.env, sp->name, ev_float(node.attrs[ai].f));
        }
        ai++;
    }
    int ii = 0;
    for (int i = 0; i < a->list.n && ok; i++) {
        const ast_node *sp = a->list.items[i];
        if (!(sp->a && (sp->a->flags & AST_F_HAS_TYPE)))
            continue;
        if (!has[i]) {
            ERR(call->span, NULL, "missing argument `%s` of `%s`", sp->name, name);
            ok = false;
            break;
        }
        if (args[i].k != EV_TENSOR) {
            if (args[i].k != EV_NONE)
                ERR(call->span, NULL, "argument `%s` of `%s` must be a tensor, got a %s", sp->name, name,
                    ev_kind_name(args[i].k));
            ok = false;
            break;
        }
        if (!el_bind_tensor(E, &attrs, &s, sp, args[i].t, call, name)) {
            ok = false;
            break;
        }
        node.inputs[ii++] = args[i].t;
    }
    /* `float` ports bound to bf16 or f16: the op's instance for that dtype
     * (`<kernel>_bf16`, `<kernel>_f16`) */
    int fdt = s.float_dt ? s.float_dt - 1 : E->compute;
    if (ok && op->generic && iop_half_suffix(fdt)) {
        node.def = el_half_def(E, (el_op *)op, call, fdt);
        ok = node.def != NULL;
    }
    if (!ok) {
        free(attrs.env.vars);
        return ev_none;
    }
    /* every dimension symbol of the def, derived ones evaluated now */
    for (int j = 0; j < s.n; j++)
        env_set(&attrs.env, s.name[j], ev_int(s.val[j]));
    for (int d = 0; d < op->def.ndims && ok; d++) {
        if (op->derived[d]) {
            ev v = el_eval(E, &attrs, op->derived[d]);
            if (v.k == EV_FLOAT && v.f == floor(v.f))
                v = ev_int((int64_t)v.f);
            if (v.k != EV_INT) {
                ERR(call->span, NULL, "`%s` of `%s` is not an integer here (%g)", op->def.dim_names[d], name,
                    ev_num(&v));
                ok = false;
                break;
            }
            node.dims[d] = v.i;
        } else {
            int k = syms_find(&s, op->def.dim_names[d]);
            node.dims[d] = k >= 0 ? s.val[k] : 0;
        }
    }
    /* outputs */
    const char *what = fr && fr->prefix[0] ? el_fmt(E, "%s.%s", fr->prefix, name) : name;
    ev res[IR_MAX_PORTS];
    int nres = 0;
    for (int o = 0; o < op->nout && ok; o++) {
        const ast_node *sp = op->out[o];
        bool tensor;
        int dt = el_dtype(E, sp->a, &tensor);
        if (dt == EL_FLOAT)
            dt = fdt;
        int64_t shape[PLAN_MAX_DIMS];
        int nd = 0;
        const ast_list *dims = &sp->a->list;
        for (int i = 0; i < dims->n && ok; i++) {
            const ast_node *dn = dims->items[i];
            if (dn->flags & AST_F_STAR) {
                int k = syms_find(&s, dn->name);
                for (int j = 0; k >= 0 && j < s.nlead[k] && nd < PLAN_MAX_DIMS; j++)
                    shape[nd++] = s.lead[k][j];
                continue;
            }
            ev v = el_eval(E, &attrs, dn->a);
            if (nd >= PLAN_MAX_DIMS) {
                ERR(call->span, NULL, "`%s` of `%s` would have more than %d dims", sp->name, name, PLAN_MAX_DIMS);
                ok = false;
                break;
            }
            if (!el_dim(E, v, call, &shape[nd++], false))
                ok = false;
        }
        if (!ok || !el_numel_ok(E, shape, nd, call->span)) {
            ok = false;
            break;
        }
        int t = el_value(E, el_fmt(E, "%s.%s", what, sp->name), dt, PLAN_ST_ACT, nd, shape, call->span);
        node.outputs[o] = t;
        if (!op->saved[o])
            res[nres++] = ev_tensor(t);
    }
    free(attrs.env.vars);
    if (!ok)
        return ev_none;
    node.loc = el_loc(E, call->span);
    node.what = ir_strdup(E->g, what);
    node.phase = PLAN_PHASE_FORWARD;
    if (op->update) {
        /* appended after every forward op (el_model), run in the optimizer phase */
        node.phase = PLAN_PHASE_OPTIMIZER;
        E->updates = realloc(E->updates, (size_t)(E->nupdates + 1) * sizeof *E->updates);
        if (!E->updates)
            abort();
        E->updates[E->nupdates++] = node;
        return (ev){.k = EV_TUPLE, .n = 0};
    }
    ir_node_add(E->g, &node);
    /* not inside another op's backward block: a step op's own backward is
     * never wanted (steps are not differentiated) */
    if (op->def.bwd_kind == IR_BWD_EXPR && !E->bwd_depth && !op->bwd_bad)
        el_bwd_instance(E, (el_op *)op, &node);
    if (nres == 1)
        return res[0];
    ev t = {.k = EV_TUPLE, .n = nres};
    t.items = ast_alloc(E->arena, (size_t)nres * sizeof *t.items);
    memcpy(t.items, res, (size_t)nres * sizeof *res);
    return t;
}

/* ----------------------------------------------------------- block calls */

static const char *el_child_prefix(el *E, const char *prefix, const char *seg)
{
    if (!seg[0])
        return prefix;
    return prefix[0] ? el_fmt(E, "%s.%s", prefix, seg) : seg;
}

static const char *el_default_seg(el *E, const char *prefix, const char *block)
{
    const char *key = el_fmt(E, "%s|%s", prefix, block);
    for (int i = 0; i < E->ncounts; i++)
        if (strcmp(E->counts[i].key, key) == 0)
            return el_fmt(E, "%s_%d", block, E->counts[i].n++);
    E->counts = realloc(E->counts, (size_t)(E->ncounts + 1) * sizeof *E->counts);
    if (!E->counts)
        abort();
    E->counts[E->ncounts].key = key;
    E->counts[E->ncounts++].n = 1;
    return block;
}

static ev el_call_block(el *E, el_frame *fr, const ast_node *blk, const ast_node *call, ev *pos, int npos,
                        const ast_node **kwn, ev *kwv, int nkw)
{
    const char *name = blk->name;
    for (int i = 0; i < E->depth; i++)
        if (E->stack[i] == blk) {
            ERR(call->span, "blocks are expanded at compile time, so they cannot call themselves",
                "recursive block `%s`", name);
            for (int j = i; j < E->depth; j++)
                diag_note(E->d, E->stack[j]->span, "`%s` is on the call chain", E->stack[j]->name);
            return ev_none;
        }
    if (E->depth >= EL_MAX_DEPTH) {
        ERR(call->span, NULL, "blocks nested more than %d deep", EL_MAX_DEPTH);
        return ev_none;
    }
    ev args[64];
    bool has[64];
    if (blk->list.n > 64) {
        ERR(blk->span, NULL, "block `%s` has more than 64 parameters", name);
        return ev_none;
    }
    if (!el_bind_args(E, call, name, &blk->list, pos, npos, kwn, kwv, nkw, args, has, "name"))
        return ev_none;
    const char *seg = NULL;
    for (int j = 0; j < nkw; j++)
        if (strcmp(kwn[j]->name, "name") == 0) {
            if (kwv[j].k != EV_STRING) {
                ERR(kwn[j]->span, NULL, "`name` must be a string");
                return ev_none;
            }
            seg = kwv[j].s;
        }
    const char *prefix = fr ? fr->prefix : "";
    if (!seg)
        seg = el_default_seg(E, prefix, name);
    el_frame inner = {0};
    inner.prefix = el_child_prefix(E, prefix, seg);
    el_syms s = {0};
    bool ok = true;
    for (int i = 0; i < blk->list.n; i++) {
        const ast_node *sp = blk->list.items[i];
        ev v = args[i];
        if (!has[i]) {
            if (!sp->b) {
                ERR(call->span, NULL, "missing argument `%s` of `%s`", sp->name, name);
                ok = false;
                continue;
            }
            v = el_eval(E, &inner, sp->b);
        }
        if (v.k == EV_NONE) {
            ok = false;
            continue;
        }
        if (sp->a) {
            bool tensor;
            int dt = el_dtype(E, sp->a, &tensor);
            if (dt < 0) {
                ok = false;
                continue;
            }
            if (tensor) {
                if (v.k != EV_TENSOR) {
                    ERR(call->span, NULL, "argument `%s` of `%s` must be a tensor, got a %s", sp->name, name,
                        ev_kind_name(v.k));
                    ok = false;
                    continue;
                }
                if (!el_bind_tensor(E, &inner, &s, sp, v.t, call, name)) {
                    ok = false;
                    continue;
                }
                for (int j = 0; j < s.n; j++)
                    env_set(&inner.env, s.name[j], ev_int(s.val[j]));
            } else {
                bool good = (dt == 0 && (v.k == EV_INT || (v.k == EV_FLOAT && v.f == floor(v.f)))) ||
                            (dt == 1 && ev_is_num(&v)) || (dt == 2 && v.k == EV_BOOL) || (dt == 3 && v.k == EV_STRING);
                if (!good) {
                    ERR(call->span, NULL, "argument `%s` of `%s` must be %s %s, got a %s", sp->name, name,
                        dt == 0 ? "an" : "a", sp->a->name, ev_kind_name(v.k));
                    ok = false;
                    continue;
                }
                if (dt == 0 && v.k == EV_FLOAT)
                    v = ev_int((int64_t)v.f);
            }
        }
        env_set(&inner.env, sp->name, v);
    }
    ev ret = ev_none;
    if (ok) {
        E->calls[E->depth] = call;
        E->stack[E->depth++] = blk;
        el_exec(E, &inner, &blk->list2);
        E->depth--;
        ret = inner.ret;
    }
    free(inner.env.vars);
    return ret;
}

/* ------------------------------------------------------------- builtins */

static ev el_builtin(el *E, el_frame *fr, const ast_node *x, ev *pos, int npos, int nkw, bool *handled)
{
    const char *n = x->name;
    *handled = true;
    static const char *const one_num[] = {"ceil", "floor", "int", "float"};
    for (int i = 0; i < 4; i++)
        if (strcmp(n, one_num[i]) == 0) {
            if (npos != 1 || nkw) {
                ERR(x->span, NULL, "`%s` takes 1 argument, got %d", n, npos + nkw);
                return ev_none;
            }
            if (!el_want_num(E, &pos[0], x, el_fmt(E, "the argument of `%s`", n)))
                return ev_none;
            double v = ev_num(&pos[0]);
            if (i == 3)
                return ev_float(v);
            double r = i == 0 ? ceil(v) : i == 1 ? floor(v) : trunc(v);
            if (fabs(r) > 9e15) {
                ERR(x->span, NULL, "`%s` result %g does not fit an integer", n, r);
                return ev_none;
            }
            return ev_int((int64_t)r);
        }
    if (strcmp(n, "min") == 0 || strcmp(n, "max") == 0) {
        if (npos != 2 || nkw) {
            ERR(x->span, NULL, "`%s` takes 2 arguments, got %d", n, npos + nkw);
            return ev_none;
        }
        if (!el_want_num(E, &pos[0], x, "an argument") || !el_want_num(E, &pos[1], x, "an argument"))
            return ev_none;
        bool first = (ev_num(&pos[0]) < ev_num(&pos[1])) == (n[1] == 'i');
        return first ? pos[0] : pos[1];
    }
    if (strcmp(n, "error") == 0) {
        /* error("message") or error("message", "hint") */
        if (npos < 1 || npos > 2 || pos[0].k != EV_STRING || (npos == 2 && pos[1].k != EV_STRING)) {
            ERR(x->span, NULL, "`error` takes a message string and an optional hint string");
            return ev_none;
        }
        /* report at the call into the block, then where the check is */
        ERR(E->depth ? E->calls[E->depth - 1]->span : x->span, npos == 2 ? pos[1].s : NULL, "%s",
            pos[0].s);
        if (E->depth)
            diag_note(E->d, x->span, "reported by this check in `%s`", E->stack[E->depth - 1]->name);
        if (fr)
            fr->returned = true;   /* stop the block: later errors would only repeat this one */
        return ev_none;
    }
    if (strcmp(n, "shared") == 0) {
        if (npos != 1 || pos[0].k != EV_STRING) {
            ERR(x->span, NULL, "`shared` takes one string, the full name of a parameter");
            return ev_none;
        }
        const char *c[1024];
        int nc = 0;
        for (int i = 0; i < E->g->nparams; i++) {
            const ir_value *v = &E->g->values[E->g->params[i].value];
            if (strcmp(v->name, pos[0].s) == 0)
                return ev_tensor(E->g->params[i].value);
            if (nc < 1024)
                c[nc++] = v->name;
        }
        ERR(x->span, el_suggest_list(E, pos[0].s, c, nc), "no parameter named \"%s\" (yet)", pos[0].s);
        return ev_none;
    }
    if (strcmp(n, "add_loss") == 0) {
        if (npos != 2 || pos[0].k != EV_STRING || pos[1].k != EV_TENSOR) {
            ERR(x->span, "add_loss(\"name\", scalar_tensor)", "`add_loss` takes a name and a loss tensor");
            return ev_none;
        }
        const ir_value *v = &E->g->values[pos[1].t];
        if (ir_value_numel(v) != 1 || v->dtype != PLAN_F32) {
            ERR(x->span, NULL, "`add_loss` needs a 1-element f32 tensor, got %s", el_shape_str(E, pos[1].t));
            return ev_none;
        }
        el_loss l = {pos[1].t, fr && fr->prefix[0] ? el_fmt(E, "%s.%s", fr->prefix, pos[0].s) : pos[0].s};
        E->losses = realloc(E->losses, (size_t)(E->nlosses + 1) * sizeof *E->losses);
        if (!E->losses)
            abort();
        E->losses[E->nlosses++] = l;
        return ev_none;
    }
    if (strcmp(n, "add_expert_load") == 0) {
        /* per-expert load of one MoE layer, read by the runtime's statistics */
        if (npos != 1 || nkw || pos[0].k != EV_TENSOR) {
            ERR(x->span, "add_expert_load(expert_load(idx, slot_row, experts))",
                "`add_expert_load` takes one tensor");
            return ev_none;
        }
        ir_value *v = &E->g->values[pos[0].t];
        if (v->ndim != 1 || v->dtype != PLAN_F32 || v->shape[0] < 2 || v->role != PLAN_ROLE_NONE ||
            v->storage != PLAN_ST_ACT) {
            ERR(x->span, "its last element counts the dropped slots", "`add_expert_load` needs a computed f32[experts + 1] tensor, got %s",
                el_shape_str(E, pos[0].t));
            return ev_none;
        }
        v->role = PLAN_ROLE_EXPERT_LOAD;
        v->name = ir_strdup(E->g, fr && fr->prefix[0] ? el_fmt(E, "%s.load", fr->prefix) : "load");
        for (int i = 0; i < E->g->nvalues; i++)
            if (i != pos[0].t && E->g->values[i].role == PLAN_ROLE_EXPERT_LOAD &&
                strcmp(E->g->values[i].name, v->name) == 0) {
                ERR(x->span, "one expert load per block call", "a second expert load named `%s`", v->name);
                return ev_none;
            }
        return ev_none;
    }
    if (strcmp(n, "one_of") == 0) {
        /* one_of(value, "keyword", "choice", ...): a block checks a string
         * keyword; the error points at that keyword in the call into the block */
        bool ok = npos >= 3 && !nkw;
        for (int i = 0; i < npos && ok; i++)
            ok = pos[i].k == EV_STRING;
        if (!ok) {
            ERR(x->span, "one_of(router, \"router\", \"softmax\", \"sigmoid\")",
                "`one_of` takes a string value, its keyword and the allowed strings");
            return ev_none;
        }
        const char *c[62];
        for (int i = 2; i < npos; i++) {
            c[i - 2] = pos[i].s;
            if (strcmp(pos[0].s, pos[i].s) == 0)
                return ev_none;
        }
        ast_span at = x->span;
        if (E->depth) {
            const ast_node *call = E->calls[E->depth - 1];
            at = call->span;
            for (int i = 0; i < call->list.n; i++)
                if (call->list.items[i]->name && strcmp(call->list.items[i]->name, pos[1].s) == 0)
                    at = call->list.items[i]->span;
        }
        char all[512] = "";
        for (int i = 0; i < npos - 2; i++)
            snprintf(all + strlen(all), sizeof all - strlen(all), "%s\"%s\"", i ? ", " : "", c[i]);
        const char *hint = el_suggest_list(E, pos[0].s, c, npos - 2);
        ERR(at, hint ? hint : el_fmt(E, "%s is one of %s", pos[1].s, all), "unknown %s \"%s\"%s%s", pos[1].s,
            pos[0].s, E->depth ? " for " : "", E->depth ? el_fmt(E, "`%s`", E->stack[E->depth - 1]->name) : "");
        if (fr)
            fr->returned = true;
        return ev_none;
    }
    if (strcmp(n, "hyper") == 0) {
        /* the per-step numbers the runtime writes (enum moek_hyper): one tensor */
        if (npos || nkw) {
            ERR(x->span, NULL, "`hyper` takes no arguments");
            return ev_none;
        }
        for (int i = 0; i < E->g->nvalues; i++)
            if (E->g->values[i].role == PLAN_ROLE_HYPER)
                return ev_tensor(i);
        int64_t nh = MOEK_HYPER_COUNT;
        int t = el_value(E, "hyper", PLAN_F32, PLAN_ST_INPUT, 1, &nh, x->span);
        E->g->values[t].role = PLAN_ROLE_HYPER;
        return ev_tensor(t);
    }
    *handled = false;
    return ev_none;
}

static ev el_call(el *E, el_frame *fr, const ast_node *x)
{
    ev pos[64], kwv[64];
    const ast_node *kwn[64];
    int npos = 0, nkw = 0;
    bool bad = false;
    if (x->list.n > 64) {
        ERR(x->span, NULL, "more than 64 arguments");
        return ev_none;
    }
    for (int i = 0; i < x->list.n; i++) {
        const ast_node *a = x->list.items[i];
        ev v = el_eval(E, fr, a->a);
        bad |= v.k == EV_NONE && a->a->kind != AST_CALL;
        if (a->name) {
            kwn[nkw] = a;
            kwv[nkw++] = v;
        } else {
            if (nkw) {
                ERR(a->span, NULL, "positional argument after a keyword argument");
                bad = true;
            }
            pos[npos++] = v;
        }
    }
    bool handled;
    ev r = el_builtin(E, fr, x, pos, npos, nkw, &handled);
    if (handled)
        return r;
    if (bad)
        return ev_none;
    for (int i = 0; i < E->nops; i++)
        if (strcmp(E->ops[i].ast->name, x->name) == 0)
            return E->ops[i].ok ? el_call_op(E, fr, &E->ops[i], x, pos, npos, kwn, kwv, nkw) : ev_none;
    for (int i = 0; i < E->nblocks; i++)
        if (strcmp(E->blocks[i].name, x->name) == 0)
            return el_call_block(E, fr, E->blocks[i].ast, x, pos, npos, kwn, kwv, nkw);
    ERR(x->span, el_suggest(E, x->name, NULL, true), "unknown op or block `%s`", x->name);
    return ev_none;
}

/* ------------------------------------------------------------ statements */

static void el_param(el *E, el_frame *fr, const ast_node *st)
{
    bool tensor;
    int dt = el_dtype(E, st->a, &tensor);
    if (dt < 0)
        return;
    if (!tensor || (dt != PLAN_F32 && dt != EL_FLOAT)) {
        ERR(st->a->span, NULL, "parameters are f32 tensors, got `%s`", st->a->name);
        return;
    }
    /* `float` params follow precision; `f32` ones stay f32 */
    dt = dt == EL_FLOAT ? E->compute : PLAN_F32;
    int64_t shape[PLAN_MAX_DIMS];
    int nd = 0;
    if (st->a->list.n > PLAN_MAX_DIMS) {
        ERR(st->a->span, NULL, "a tensor has at most %d dims", PLAN_MAX_DIMS);
        return;
    }
    for (int i = 0; i < st->a->list.n; i++) {
        const ast_node *dn = st->a->list.items[i];
        if (dn->flags & AST_F_STAR) {
            ERR(dn->span, NULL, "a parameter's shape is fixed: `*%s` is only for signatures", dn->name);
            return;
        }
        if (!el_dim(E, el_eval(E, fr, dn->a), dn, &shape[nd++], false))
            return;
    }
    if (!el_numel_ok(E, shape, nd, st->a->span))
        return;
    ir_param p = {.grad = -1, .state0 = -1, .state1 = -1, .expert_axis = -1, .tied_to = -1,
                  .active_fraction = 1.0f, .decay = nd >= 2};
    const ast_node *init = st->b;
    int storage = PLAN_ST_PARAM;
    if (init->kind == AST_CALL && strcmp(init->name, "buffer") == 0) {
        /* buffer(zeros): checkpointed, never trained (a router bias) */
        if (init->list.n != 1 || init->list.items[0]->name || init->list.items[0]->a->kind == AST_CALL) {
            ERR(init->span, "param bias: f32[E] = buffer(zeros)", "`buffer` takes one initializer: zeros, ones");
            return;
        }
        if (dt != PLAN_F32) {
            ERR(st->a->span, "declare it f32[...]", "a buffer is f32 in every precision");
            return;
        }
        init = init->list.items[0]->a;
        storage = PLAN_ST_BUFFER;
        p.frozen = true;
        p.decay = false;
    }
    if (init->kind == AST_NAME && strcmp(init->name, "zeros") == 0) {
        p.init = PLAN_INIT_ZEROS;
    } else if (init->kind == AST_NAME && strcmp(init->name, "ones") == 0) {
        p.init = PLAN_INIT_ONES;
    } else if (init->kind == AST_CALL && strcmp(init->name, "normal") == 0 && init->list.n == 1) {
        ev s = el_eval(E, fr, init->list.items[0]->a);
        if (!el_want_num(E, &s, init, "the std of normal()"))
            return;
        if (ev_num(&s) < 0) {
            ERR(init->span, NULL, "normal() needs a std >= 0, got %g", ev_num(&s));
            return;
        }
        p.init = PLAN_INIT_NORMAL;
        p.init_std = (float)ev_num(&s);
    } else {
        const char *inits[] = {"zeros", "ones", "normal"};
        ERR(init->span, init->name ? el_suggest_list(E, init->name, inits, 3) : "use normal(std), zeros or ones",
            "unknown initializer%s%s%s", init->name ? " `" : "", init->name ? init->name : "", init->name ? "`" : "");
        return;
    }
    for (int i = 0; i < st->list.n; i++) {
        const ast_node *at = st->list.items[i];
        if (strcmp(at->name, "expert") == 0) {
            p.expert_axis = 0;
        } else if (strcmp(at->name, "nodecay") == 0) {
            p.decay = false;
        } else if (strcmp(at->name, "frozen") == 0) {
            p.frozen = true;
        } else if (strcmp(at->name, "active") == 0) {
            ev f = el_eval(E, fr, at->a);
            if (!el_want_num(E, &f, at, "active()"))
                return;
            if (ev_num(&f) <= 0 || ev_num(&f) > 1) {
                ERR(at->span, "the share of the parameter one token uses, e.g. top_k / experts",
                    "active() must be in (0, 1], got %g", ev_num(&f));
                return;
            }
            p.active_fraction = (float)ev_num(&f);
        }
    }
    const char *full = fr->prefix[0] ? el_fmt(E, "%s.%s", fr->prefix, st->name) : st->name;
    for (int i = 0; i < E->g->nparams; i++) {
        const ir_param *q = &E->g->params[i];
        if (strcmp(E->g->values[q->value].name, full) == 0) {
            ERR(st->span, "give one of the block calls a distinct name = \"...\"",
                "duplicate definition of parameter `%s`", full);
            ast_span prev = {q->loc.file, q->loc.line, q->loc.col, q->loc.line, q->loc.col};
            diag_note(E->d, prev, "`%s` was first defined here", full);
            return;
        }
    }
    int t = el_value(E, full, dt, storage, nd, shape, st->span);
    p.loc = el_loc(E, st->span);
    ir_param_add(E->g, t, &p);
    env_set(&fr->env, st->name, ev_tensor(t));
}

static bool el_cond(el *E, el_frame *fr, const ast_node *c, bool *out)
{
    ev v = el_eval(E, fr, c);
    if (v.k == EV_NONE)
        return false;
    if (!ev_is_num(&v)) {
        ERR(c->span, "`if` chooses at compile time: compare config values, loop indices or arguments",
            "`if` needs a compile-time value, got a %s", ev_kind_name(v.k));
        return false;
    }
    *out = ev_num(&v) != 0;
    return true;
}

static void el_exec(el *E, el_frame *fr, const ast_list *body)
{
    for (int i = 0; i < body->n && !fr->returned; i++) {
        const ast_node *st = body->items[i];
        if (!st)
            continue;
        if (diag_full(E->d))
            return;
        switch (st->kind) {
        case AST_ASSIGN: {
            ev v = el_eval(E, fr, st->a);
            int nt = st->list.n;
            if (nt == 1) {
                env_set(&fr->env, st->list.items[0]->name, v);
                break;
            }
            if (v.k == EV_NONE) {
                for (int j = 0; j < nt; j++)
                    env_set(&fr->env, st->list.items[j]->name, ev_none);
                break;
            }
            if (v.k != EV_TUPLE || v.n != nt) {
                ERR(st->span, NULL, "cannot unpack %d value%s into %d names", v.k == EV_TUPLE ? v.n : 1,
                    v.k == EV_TUPLE && v.n == 1 ? "" : (v.k == EV_TUPLE ? "s" : ""), nt);
                break;
            }
            for (int j = 0; j < nt; j++)
                env_set(&fr->env, st->list.items[j]->name, v.items[j]);
            break;
        }
        case AST_EXPR_STMT: el_eval(E, fr, st->a); break;
        case AST_PARAM: el_param(E, fr, st); break;
        case AST_RETURN: {
            if (st->list.n == 1) {
                fr->ret = el_eval(E, fr, st->list.items[0]);
            } else {
                ev t = {.k = EV_TUPLE, .n = st->list.n};
                t.items = ast_alloc(E->arena, (size_t)t.n * sizeof *t.items);
                for (int j = 0; j < t.n; j++)
                    t.items[j] = el_eval(E, fr, st->list.items[j]);
                fr->ret = t;
            }
            fr->returned = true;
            break;
        }
        case AST_IF: {
            bool c;
            if (!el_cond(E, fr, st->a, &c))
                break;
            el_exec(E, fr, c ? &st->list : &st->list2);
            break;
        }
        case AST_FOR: {
            ev lo = el_eval(E, fr, st->a), hi = el_eval(E, fr, st->b);
            if (lo.k == EV_NONE || hi.k == EV_NONE)
                break;
            if (lo.k != EV_INT || hi.k != EV_INT) {
                ERR(ast_join(st->a->span, st->b->span), NULL, "loop bounds must be integers, got %s..%s",
                    ev_kind_name(lo.k), ev_kind_name(hi.k));
                break;
            }
            if (hi.i - lo.i > EL_MAX_UNROLL) {
                ERR(ast_join(st->a->span, st->b->span), NULL, "loop of %" PRId64 " iterations is too long to unroll",
                    hi.i - lo.i);
                break;
            }
            const char *seg = st->b->kind == AST_NAME ? st->b->name : st->name;
            const char *saved = fr->prefix;
            for (int64_t k = lo.i; k < hi.i && !fr->returned; k++) {
                fr->prefix = el_child_prefix(E, saved, el_fmt(E, "%s.%" PRId64, seg, k));
                env_set(&fr->env, st->name, ev_int(k));
                el_exec(E, fr, &st->list);
                if (diag_full(E->d))
                    break;
            }
            fr->prefix = saved;
            break;
        }
        default:
            ERR(st->span, NULL, "unexpected statement");
            break;
        }
    }
}

/* ------------------------------------------------------ extern op lowering */

typedef struct el_ksig {
    const char *sym;
    const char *kinds;   /* T tensor, i int64, f float */
} el_ksig;

/* Arity and kinds of every kernel in kernels/moek.h, after ctx. */
static const el_ksig el_kernels[] = {
    {"moek_add_fwd", "TTTi"}, {"moek_scale_fwd", "TTif"}, {"moek_scale_bwd", "TTif"},
    {"moek_gelu_fwd", "TTi"}, {"moek_gelu_bwd", "TTTi"}, {"moek_swiglu_fwd", "TTTi"},
    {"moek_swiglu_bwd", "TTTTTi"}, {"moek_embedding_fwd", "TTTiii"}, {"moek_embedding_bwd", "TTTiii"},
    {"moek_matmul_fwd", "TTTiii"}, {"moek_matmul_bwd", "TTTTTiii"}, {"moek_rmsnorm_fwd", "TTTTiif"},
    {"moek_rmsnorm_bwd", "TTTTTTii"}, {"moek_rope_fwd", "TTiiiif"}, {"moek_rope_bwd", "TTiiiif"},
    {"moek_attention_fwd", "TTTTTiiii"}, {"moek_attention_bwd", "TTTTTTTTTiiii"},
    {"moek_cross_entropy_fwd", "TTTTii"}, {"moek_cross_entropy_bwd", "TTTTTii"},
    {"moek_softmax_fwd", "TTii"}, {"moek_softmax_bwd", "TTTii"}, {"moek_topk_fwd", "TTTiiii"},
    {"moek_topk_bwd", "TTTTiiii"}, {"moek_balance_loss_fwd", "TTTiii"}, {"moek_balance_loss_bwd", "TTTTiii"},
    {"moek_zloss_fwd", "TTii"}, {"moek_zloss_bwd", "TTTii"}, {"moek_dispatch_fwd", "TTTTTiiiii"},
    {"moek_dispatch_bwd", "TTTiiii"}, {"moek_grouped_matmul_fwd", "TTTTiiii"},
    {"moek_grouped_matmul_bwd", "TTTTTTiiii"}, {"moek_combine_fwd", "TTTTiiii"},
    {"moek_combine_bwd", "TTTTTTiiii"},
    {"moek_copy", "TTi"}, {"moek_cast_bf16_f32", "TTi"}, {"moek_cast_f32_bf16", "TTi"},
    /* routing, issue 4 (fp32 only) */
    {"moek_sigmoid_fwd", "TTii"}, {"moek_sigmoid_bwd", "TTTii"},
    {"moek_topk_biased_fwd", "TTTTiiiif"}, {"moek_topk_biased_bwd", "TTTTiiiif"},
    {"moek_topk_grouped_fwd", "TTTTiiiiiif"}, {"moek_topk_softmax_fwd", "TTTiii"},
    {"moek_topk_softmax_bwd", "TTTTiii"}, {"moek_jitter_fwd", "TTifTi"}, {"moek_jitter_bwd", "TTifTi"},
    {"moek_seq_balance_loss_fwd", "TTTiiii"}, {"moek_seq_balance_loss_bwd", "TTTTiiii"},
    {"moek_expert_load", "TTTiii"}, {"moek_router_bias_update", "TTif"},
    {"moek_dispatch_by_score_fwd", "TTTTTTiiiii"},
    /* the bf16 variants (same arguments, moek_bf16 storage; kernels/moek.h) */
    {"moek_add_fwd_bf16", "TTTi"}, {"moek_scale_fwd_bf16", "TTif"}, {"moek_scale_bwd_bf16", "TTif"},
    {"moek_gelu_fwd_bf16", "TTi"}, {"moek_gelu_bwd_bf16", "TTTi"}, {"moek_swiglu_fwd_bf16", "TTTi"},
    {"moek_swiglu_bwd_bf16", "TTTTTi"}, {"moek_embedding_fwd_bf16", "TTTiii"},
    {"moek_embedding_bwd_bf16", "TTTiii"}, {"moek_matmul_fwd_bf16", "TTTiii"},
    {"moek_matmul_bwd_bf16", "TTTTTiii"}, {"moek_rmsnorm_fwd_bf16", "TTTTiif"},
    {"moek_rmsnorm_bwd_bf16", "TTTTTTii"}, {"moek_rope_fwd_bf16", "TTiiiif"},
    {"moek_rope_bwd_bf16", "TTiiiif"}, {"moek_attention_fwd_bf16", "TTTTTiiii"},
    {"moek_attention_bwd_bf16", "TTTTTTTTTiiii"}, {"moek_cross_entropy_fwd_bf16", "TTTTii"},
    {"moek_cross_entropy_bwd_bf16", "TTTTTii"}, {"moek_softmax_fwd_bf16", "TTii"},
    {"moek_softmax_bwd_bf16", "TTTii"}, {"moek_zloss_fwd_bf16", "TTii"}, {"moek_zloss_bwd_bf16", "TTTii"},
    {"moek_dispatch_fwd_bf16", "TTTTTiiiii"}, {"moek_dispatch_bwd_bf16", "TTTiiii"},
    {"moek_grouped_matmul_fwd_bf16", "TTTTiiii"}, {"moek_grouped_matmul_bwd_bf16", "TTTTTTiiii"},
    {"moek_combine_fwd_bf16", "TTTTiiii"}, {"moek_combine_bwd_bf16", "TTTTTTiiii"},
    /* issue 2 stdlib ops: layernorm, silu, repeat_kv, bias_add (and _bf16) */
    {"moek_layernorm_fwd", "TTTTTTiif"}, {"moek_layernorm_bwd", "TTTTTTTTii"},
    {"moek_silu_fwd", "TTi"}, {"moek_silu_bwd", "TTTi"}, {"moek_repeat_kv_fwd", "TTiiii"},
    {"moek_repeat_kv_bwd", "TTiiii"}, {"moek_bias_add_fwd", "TTTii"}, {"moek_bias_add_bwd", "TTTii"},
    {"moek_layernorm_fwd_bf16", "TTTTTTiif"}, {"moek_layernorm_bwd_bf16", "TTTTTTTTii"},
    {"moek_silu_fwd_bf16", "TTi"}, {"moek_silu_bwd_bf16", "TTTi"}, {"moek_repeat_kv_fwd_bf16", "TTiiii"},
    {"moek_repeat_kv_bwd_bf16", "TTiiii"}, {"moek_bias_add_fwd_bf16", "TTTii"},
    {"moek_bias_add_bwd_bf16", "TTTii"},
    /* fused ops (issue 8; kernels/cpu/fused.c), fp32 and bf16 */
    {"moek_add_rmsnorm_fwd", "TTTTTTiif"}, {"moek_add_rmsnorm_bwd", "TTTTTTTTii"},
    {"moek_add_rmsnorm_fwd_bf16", "TTTTTTiif"}, {"moek_add_rmsnorm_bwd_bf16", "TTTTTTTTii"},
    {"moek_swiglu_proj_fwd", "TTTTTTiii"}, {"moek_swiglu_proj_bwd", "TTTTTTTTTiii"},
    {"moek_swiglu_proj_fwd_bf16", "TTTTTTiii"}, {"moek_swiglu_proj_bwd_bf16", "TTTTTTTTTiii"},
    {"moek_softmax_topk_fwd", "TTTTiiii"}, {"moek_softmax_topk_bwd", "TTTTTiiii"},
    {"moek_softmax_topk_fwd_bf16", "TTTTiiii"}, {"moek_softmax_topk_bwd_bf16", "TTTTTiiii"},
    {"moek_matmul_bias_gelu_fwd", "TTTTTiii"}, {"moek_matmul_bias_gelu_bwd", "TTTTTTTiii"},
    {"moek_matmul_bias_gelu_fwd_bf16", "TTTTTiii"}, {"moek_matmul_bias_gelu_bwd_bf16", "TTTTTTTiii"},
    {"moek_matmul_bias_fwd", "TTTTiii"}, {"moek_matmul_bias_bwd", "TTTTTTiii"},
    {"moek_matmul_bias_fwd_bf16", "TTTTiii"}, {"moek_matmul_bias_bwd_bf16", "TTTTTTiii"},
};

static const el_ksig *el_kernel_find(const char *sym)
{
    for (size_t k = 0; k < sizeof el_kernels / sizeof *el_kernels; k++)
        if (strcmp(el_kernels[k].sym, sym) == 0)
            return &el_kernels[k];
    /* moek.h's fp16 section is the bf16 list with f16 storage: an `_f16`
     * kernel has the signature of its `_bf16` twin (casts included) */
    const char *h = strstr(sym, "_f16");
    if (h && strlen(sym) < 96) {
        char twin[112];
        snprintf(twin, sizeof twin, "%.*s_bf16%s", (int)(h - sym), sym, h + 4);
        for (size_t k = 0; k < sizeof el_kernels / sizeof *el_kernels; k++)
            if (strcmp(el_kernels[k].sym, twin) == 0 && strstr(twin, "_bf16"))
                return &el_kernels[k];
    }
    return NULL;
}

static void expr_str(const ast_node *x, char *buf, size_t n)
{
    switch (x->kind) {
    case AST_NAME: snprintf(buf, n, "%s", x->name); return;
    case AST_INT: snprintf(buf, n, "%" PRId64, x->i); return;
    case AST_FLOAT: snprintf(buf, n, "%g", x->f); return;
    case AST_BINOP: {
        char a[128], b[128];
        expr_str(x->a, a, sizeof a);
        expr_str(x->b, b, sizeof b);
        snprintf(buf, n, "%s%s%s", a, ast_op_name(x->op), b);
        return;
    }
    case AST_UNOP: {
        char a[128];
        expr_str(x->a, a, sizeof a);
        snprintf(buf, n, "%s%s", ast_op_name(x->op), a);
        return;
    }
    default: snprintf(buf, n, "?"); return;
    }
}

static int op_dim(el *E, el_op *op, const char *name)
{
    for (int i = 0; i < op->def.ndims; i++)
        if (strcmp(op->def.dim_names[i], name) == 0)
            return i;
    if (op->def.ndims >= IR_MAX_SYMS)
        return -1;
    op->def.dim_names[op->def.ndims] = ir_strdup(E->g, name);
    return op->def.ndims++;
}

static bool el_names_only(el *E, el_op *op, const ast_node *x, const ast_node **bad)
{
    (void)E;
    if (x->kind == AST_INT)
        return true;
    if (x->kind == AST_NAME) {
        for (int i = 0; i < op->def.ndims; i++)
            if (strcmp(op->def.dim_names[i], x->name) == 0)
                return true;
        for (int i = 0; i < op->nattr; i++)
            if (strcmp(op->attr[i]->name, x->name) == 0)
                return true;
        *bad = x;
        return false;
    }
    if (x->kind == AST_BINOP)
        return el_names_only(E, op, x->a, bad) && el_names_only(E, op, x->b, bad);
    *bad = x;
    return false;
}

/* Lowers one kernel call (forward = f(args) / backward = g(args)). */
static bool el_lower_call(el *E, el_op *op, const ast_node *call, bool bwd, const char **sym, ir_ref *refs, int *nrefs)
{
    *sym = ir_strdup(E->g, call->name);
    int n = 0;
    const char *opname = op->ast->name;
    if (call->list.n > PLAN_MAX_KERNEL_ARGS) {
        ERR(call->span, NULL, "a kernel takes at most %d arguments", PLAN_MAX_KERNEL_ARGS);
        return false;
    }
    char kinds[PLAN_MAX_KERNEL_ARGS + 1];
    for (int i = 0; i < call->list.n; i++) {
        const ast_node *a = call->list.items[i];
        const ast_node *x = a->a;
        ir_ref r = {0};
        bool found = false;
        if (a->name) {
            ERR(a->span, NULL, "kernel arguments are positional");
            return false;
        }
        if (x->kind == AST_NAME) {
            const char *nm = x->name;
            for (int j = 0; j < op->nin && !found; j++) {
                if (strcmp(op->in[j]->name, nm) == 0)
                    r.kind = IR_REF_IN, r.index = j, found = true;
                else if (bwd && nm[0] == 'd' && strcmp(op->in[j]->name, nm + 1) == 0)
                    r.kind = IR_REF_DIN, r.index = j, found = true;
            }
            for (int j = 0; j < op->nout && !found; j++) {
                if (strcmp(op->out[j]->name, nm) == 0)
                    r.kind = IR_REF_OUT, r.index = j, found = true;
                else if (bwd && nm[0] == 'd' && strcmp(op->out[j]->name, nm + 1) == 0)
                    r.kind = IR_REF_DOUT, r.index = j, found = true;
            }
            for (int j = 0; j < op->nattr && !found; j++)
                if (strcmp(op->attr[j]->name, nm) == 0)
                    r.kind = IR_REF_ATTR, r.index = j, found = true;
            for (int j = 0; j < op->def.ndims && !found; j++)
                if (strcmp(op->def.dim_names[j], nm) == 0)
                    r.kind = IR_REF_DIM, r.index = j, found = true;
            if (!found) {
                const char *c[64];
                int nc = 0;
                for (int j = 0; j < op->nin; j++) {
                    c[nc++] = op->in[j]->name;
                    if (bwd)
                        c[nc++] = el_fmt(E, "d%s", op->in[j]->name);
                }
                for (int j = 0; j < op->nout; j++) {
                    c[nc++] = op->out[j]->name;
                    if (bwd)
                        c[nc++] = el_fmt(E, "d%s", op->out[j]->name);
                }
                for (int j = 0; j < op->def.ndims && nc < 60; j++)
                    c[nc++] = op->def.dim_names[j];
                const char *hint = el_suggest_list(E, nm, c, nc);
                if (!hint && !bwd && nm[0] == 'd')
                    hint = "gradients (dX) exist only in the backward call";
                ERR(x->span, hint, "unknown name `%s` in the kernel arguments of `%s`", nm, opname);
                return false;
            }
        } else if (x->kind == AST_INT || (x->kind == AST_UNOP && x->op == AST_OP_NEG && x->a->kind == AST_INT)) {
            r.kind = IR_REF_INT;
            r.i = x->kind == AST_INT ? x->i : -x->a->i;
        } else if (x->kind == AST_FLOAT || (x->kind == AST_UNOP && x->op == AST_OP_NEG && x->a->kind == AST_FLOAT)) {
            r.kind = IR_REF_FLOAT;
            r.f = x->kind == AST_FLOAT ? x->f : -x->a->f;
        } else {
            const ast_node *bad = NULL;
            if (!el_names_only(E, op, x, &bad)) {
                ERR(bad->span, "an argument expression may use only dimensions, integer attributes and integers",
                    "`%s` cannot appear in a kernel argument expression of `%s`",
                    bad->kind == AST_NAME ? bad->name : "this", opname);
                return false;
            }
            char s[256];
            expr_str(x, s, sizeof s);
            int d = op_dim(E, op, s);
            if (d < 0) {
                ERR(x->span, NULL, "too many dimension symbols in `%s` (at most %d)", opname, IR_MAX_SYMS);
                return false;
            }
            op->derived[d] = x;
            r.kind = IR_REF_DIM;
            r.index = d;
        }
        switch (r.kind) {
        case IR_REF_IN: case IR_REF_OUT: case IR_REF_DIN: case IR_REF_DOUT: kinds[n] = 'T'; break;
        case IR_REF_DIM: case IR_REF_INT: kinds[n] = 'i'; break;
        case IR_REF_FLOAT: kinds[n] = 'f'; break;
        case IR_REF_ATTR: kinds[n] = op->def.attr_kinds[r.index] == PLAN_ARG_F32 ? 'f' : 'i'; break;
        }
        refs[n++] = r;
    }
    kinds[n] = 0;
    *nrefs = n;
    if (op->def.lib)
        return true;   /* a user library: its signature is the user's promise */
    const el_ksig *ks = el_kernel_find(call->name);
    if (ks) {
        const char *want = ks->kinds;
        if (strlen(want) != (size_t)n) {
            ERR(call->span, "see kernels/moek.h for its argument list",
                "kernel `%s` takes %zu arguments after ctx, `%s` passes %d", call->name, strlen(want), opname, n);
            return false;
        }
        static const char *const kn[] = {"a tensor", "an int", "a float"};
        for (int i = 0; i < n; i++)
            if (want[i] != kinds[i]) {
                int w = want[i] == 'T' ? 0 : want[i] == 'i' ? 1 : 2, g = kinds[i] == 'T' ? 0 : kinds[i] == 'i' ? 1 : 2;
                ERR(call->list.items[i]->span, "see kernels/moek.h for its argument list",
                    "argument %d of kernel `%s` is %s, got %s", i + 1, call->name, kn[w], kn[g]);
                return false;
            }
        return true;
    }
    ERR(call->span, "kernels/moek.h lists the kernels; a user kernel needs `from \"lib.so\"`",
        "unknown kernel `%s`", call->name);
    return false;
}

/* ------------------------------------------------ backward { } blocks */

/* A name or call a `backward { }` block may use: the op's inputs, outputs,
 * d<output> of outputs that carry a gradient, attributes, dims, config
 * values, the d<input>s assigned above it, and calls of extern ops.  Checked
 * at the declaration, so a mistake shows even when no model calls the op. */
static bool el_bwd_names(el *E, el_op *op, const ast_node *x, const bool *assigned)
{
    const char *opname = op->ast->name;
    switch (x->kind) {
    case AST_INT: case AST_FLOAT: case AST_BOOL:
        return true;
    case AST_BINOP:
        return el_bwd_names(E, op, x->a, assigned) && el_bwd_names(E, op, x->b, assigned);
    case AST_UNOP:
        return el_bwd_names(E, op, x->a, assigned);
    case AST_NAME: {
        const char *c[4 * IR_MAX_PORTS + 2 * IR_MAX_SYMS];
        int nc = 0;
        for (int i = 0; i < op->nin; i++) {
            c[nc++] = op->in[i]->name;
            if (assigned[i])
                c[nc++] = el_fmt(E, "d%s", op->in[i]->name);
        }
        for (int o = 0; o < op->nout; o++) {
            c[nc++] = op->out[o]->name;
            if (op->def.output_diff[o])
                c[nc++] = el_fmt(E, "d%s", op->out[o]->name);
        }
        for (int i = 0; i < op->nattr; i++)
            c[nc++] = op->attr[i]->name;
        for (int i = 0; i < op->def.ndims; i++)
            c[nc++] = op->def.dim_names[i];
        for (int i = 0; i < nc; i++)
            if (strcmp(c[i], x->name) == 0)
                return true;
        if (env_get(&E->globals, x->name))
            return true;
        const char *hint = el_suggest_list(E, x->name, c, nc);
        ERR(x->span, hint ? hint : "a backward block reads the op's inputs, outputs, d<output>, "
            "attributes and dims", "unknown name `%s` in the backward of `%s`", x->name, opname);
        return false;
    }
    case AST_CALL: {
        const el_op *callee = NULL;
        for (int i = 0; i < E->nops && !callee; i++)
            if (strcmp(E->ops[i].ast->name, x->name) == 0)
                callee = &E->ops[i];
        if (!callee) {
            const char *c[256];
            int nc = 0;
            for (int i = 0; i < E->nops && nc < 256; i++)
                c[nc++] = E->ops[i].ast->name;
            const char *hint = el_suggest_list(E, x->name, c, nc);
            ERR(x->span, hint ? hint : "a backward block calls extern ops (blocks and builtins "
                "are not allowed)", "unknown op `%s` in the backward of `%s`", x->name, opname);
            return false;
        }
        const ast_list *sig = &callee->ast->list;
        bool has[IR_MAX_PORTS + IR_MAX_SYMS] = {false}, ok = true;
        int npos = 0;
        for (int i = 0; i < x->list.n; i++) {
            const ast_node *a = x->list.items[i];
            if (a->name) {
                int k = -1;
                for (int j = 0; j < sig->n && j < IR_MAX_PORTS + IR_MAX_SYMS; j++)
                    if (strcmp(sig->items[j]->name, a->name) == 0)
                        k = j;
                if (k < 0) {
                    ERR(a->span, NULL, "`%s` has no argument `%s`", x->name, a->name);
                    ok = false;
                } else {
                    has[k] = true;
                }
            } else if (npos < IR_MAX_PORTS + IR_MAX_SYMS) {
                has[npos++] = true;
            }
            ok &= el_bwd_names(E, op, a->a, assigned);
        }
        if (npos > sig->n) {
            ERR(x->span, NULL, "`%s` takes at most %d argument%s, got %d", x->name, sig->n,
                sig->n == 1 ? "" : "s", npos);
            return false;
        }
        for (int j = 0; ok && j < sig->n && j < IR_MAX_PORTS + IR_MAX_SYMS; j++)
            if (!has[j] && !sig->items[j]->b) {
                ERR(x->span, NULL, "missing argument `%s` of `%s`", sig->items[j]->name, x->name);
                ok = false;
            }
        return ok;
    }
    default:
        ERR(x->span, "write a gradient with calls of extern ops, `+` and `*` by a number",
            "this cannot appear in the backward of `%s`", opname);
        return false;
    }
}

/* Index of the input whose gradient `name` is ("dx" -> x), or -1. */
static int el_bwd_target(const el_op *op, const char *name)
{
    for (int i = 0; i < op->nin; i++)
        if (name[0] == 'd' && strcmp(op->in[i]->name, name + 1) == 0)
            return i;
    return -1;
}

static bool el_bwd_check(el *E, el_op *op, const ast_node *blk)
{
    const char *opname = op->ast->name;
    bool assigned[IR_MAX_PORTS] = {false}, ok = true;
    for (int s = 0; s < blk->list.n; s++) {
        const ast_node *st = blk->list.items[s];
        if (!st)
            continue;   /* a syntax error, already reported */
        if (st->kind != AST_ASSIGN || st->list.n != 1) {
            ERR(st->span, "write `d<input> = <expression>`, one per line",
                "the backward of `%s` may only assign input gradients", opname);
            ok = false;
            continue;
        }
        const ast_node *t = st->list.items[0];
        int k = el_bwd_target(op, t->name);
        if (k < 0) {
            const char *c[IR_MAX_PORTS];
            int nc = 0;
            for (int i = 0; i < op->nin; i++)
                if (op->def.input_diff[i])
                    c[nc++] = el_fmt(E, "d%s", op->in[i]->name);
            const char *hint = el_suggest_list(E, t->name, c, nc);
            ERR(t->span, hint ? hint : el_fmt(E, "assign d<input>, e.g. `%s`", nc ? c[0] : "dx"),
                "`%s` is not the gradient of an input of `%s`", t->name, opname);
            ok = false;
            continue;
        }
        if (!op->def.input_diff[k]) {
            ERR(t->span, el_fmt(E, "`%s` is nograd or an integer: drop this line", op->in[k]->name),
                "`%s` is assigned, but input `%s` of `%s` has no gradient", t->name, op->in[k]->name,
                opname);
            ok = false;
            continue;
        }
        if (assigned[k]) {
            ERR(t->span, "sum the terms in one expression with `+`",
                "`%s` is assigned twice in the backward of `%s`", t->name, opname);
            ok = false;
            continue;
        }
        ok &= el_bwd_names(E, op, st->a, assigned);
        assigned[k] = true;
    }
    for (int i = 0; ok && i < op->nin; i++)
        if (op->def.input_diff[i] && !assigned[i]) {
            ERR(blk->span, el_fmt(E, "assign `d%s = ...` in the block, or mark `%s` nograd",
                                  op->in[i]->name, op->in[i]->name),
                "backward of `%s` does not assign the gradient of `%s`", opname, op->in[i]->name);
            ok = false;
        }
    return ok;
}

/* Where value v of a backward block's run comes from: the forward node fn's
 * ports, the d<output> stand-ins dout, or step k < nsteps (graph node n0+k). */
static bool el_bwd_ref(const ir_graph *g, const ir_node *fn, const int *dout, int n0, int nsteps,
                       int v, ir_bwd_ref *r)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < fn->def->ninputs; i++)
        if (fn->inputs[i] == v) {
            r->src = IR_BWD_SRC_IN, r->index = i;
            return true;
        }
    for (int o = 0; o < fn->def->noutputs; o++) {
        if (fn->outputs[o] == v) {
            r->src = IR_BWD_SRC_OUT, r->index = o;
            return true;
        }
        if (dout[o] == v) {
            r->src = IR_BWD_SRC_DOUT, r->index = o;
            return true;
        }
    }
    for (int k = 0; k < nsteps; k++) {
        const ir_node *sn = &g->nodes[n0 + k];
        for (int p = 0; p < sn->def->noutputs; p++)
            if (sn->outputs[p] == v) {
                r->src = IR_BWD_SRC_STEP, r->index = k, r->port = p;
                return true;
            }
    }
    return false;
}

/* Runs op's `backward { }` for the forward node fn just added: the calls go
 * through el_call_op like any other (shapes, dtypes, half variants), their
 * nodes and values are kept as fn's instance (ir.h ir_bwd_inst) and taken
 * out of the graph again; autodiff puts back the ones it needs. */
static void el_bwd_instance(el *E, el_op *op, const ir_node *fn)
{
    ir_graph *g = E->g;
    const ast_node *blk = op->bwd_body;
    const char *opname = op->ast->name;
    int v0 = g->nvalues, n0 = g->nnodes, u0 = E->nupdates, errs = diag_count(E->d);
    el_frame fr;
    memset(&fr, 0, sizeof fr);
    fr.prefix = "";
    int dout[IR_MAX_PORTS], grad[IR_MAX_PORTS];
    for (int i = 0; i < IR_MAX_PORTS; i++)
        dout[i] = grad[i] = -1;
    for (int i = 0; i < op->nin; i++)
        env_set(&fr.env, op->in[i]->name, ev_tensor(fn->inputs[i]));
    for (int o = 0; o < op->nout; o++) {
        env_set(&fr.env, op->out[o]->name, ev_tensor(fn->outputs[o]));
        if (!op->def.output_diff[o])
            continue;
        const ir_value ov = g->values[fn->outputs[o]];   /* a copy: el_value may move them */
        dout[o] = el_value(E, el_fmt(E, "d%s", op->out[o]->name), ov.dtype, PLAN_ST_ACT, ov.ndim,
                           ov.shape, blk->span);
        env_set(&fr.env, el_fmt(E, "d%s", op->out[o]->name), ev_tensor(dout[o]));
    }
    for (int a = 0; a < op->nattr; a++)
        env_set(&fr.env, op->attr[a]->name, op->def.attr_kinds[a] == PLAN_ARG_I64
                                                ? ev_int(fn->attrs[a].i) : ev_float(fn->attrs[a].f));
    for (int d = 0; d < op->def.ndims; d++)
        if (!op->derived[d])
            env_set(&fr.env, op->def.dim_names[d], ev_int(fn->dims[d]));
    E->bwd_depth++;
    for (int s = 0; s < blk->list.n; s++) {
        const ast_node *st = blk->list.items[s];
        const char *tname = st->list.items[0]->name;
        int k = el_bwd_target(op, tname);
        ev r = el_eval(E, &fr, st->a);
        if (r.k != EV_TENSOR) {
            if (r.k != EV_NONE)
                ERR(st->a->span, NULL, "the gradient `%s` of `%s` must be a tensor, got a %s", tname,
                    opname, ev_kind_name(r.k));
            continue;
        }
        const ir_value *iv = &g->values[fn->inputs[k]], *rv = &g->values[r.t];
        if (iv->dtype != rv->dtype || iv->ndim != rv->ndim ||
            memcmp(iv->shape, rv->shape, (size_t)iv->ndim * sizeof *iv->shape) != 0) {
            ERR(st->a->span, "a gradient has the shape and dtype of its input",
                "`%s` of `%s` is %s, but `%s` is %s", tname, opname, el_shape_str(E, r.t),
                op->in[k]->name, el_shape_str(E, fn->inputs[k]));
            continue;
        }
        grad[k] = r.t;
        env_set(&fr.env, tname, r);
    }
    E->bwd_depth--;
    free(fr.env.vars);
    if (E->nupdates != u0) {
        ERR(blk->span, NULL, "the backward of `%s` calls an optimizer-phase op", opname);
        E->nupdates = u0;
    }
    ir_bwd_inst *in = ir_alloc(g, sizeof *in);
    memset(in, 0, sizeof *in);
    in->key = fn->outputs[0];
    in->nsteps = g->nnodes - n0;
    in->steps = ir_alloc(g, sizeof *in->steps * ((size_t)in->nsteps + 1));
    for (int k = 0; k < in->nsteps && diag_count(E->d) == errs; k++) {
        const ir_node *sn = &g->nodes[n0 + k];
        ir_bwd_step *st = &in->steps[k];
        memset(st, 0, sizeof *st);
        st->def = sn->def;
        memcpy(st->dims, sn->dims, sizeof st->dims);
        memcpy(st->attrs, sn->attrs, sizeof st->attrs);
        for (int i = 0; i < sn->def->ninputs; i++)
            if (!el_bwd_ref(g, fn, dout, n0, k, sn->inputs[i], &st->in[i]))
                ERR(blk->span, NULL, "internal error: input %d of step %d in the backward of `%s` "
                    "comes from outside the block", i, k, opname);
        for (int o = 0; o < sn->def->noutputs; o++) {
            const ir_value *ov = &g->values[sn->outputs[o]];
            st->out_dtype[o] = ov->dtype;
            st->out_ndim[o] = ov->ndim;
            memcpy(st->out_shape[o], ov->shape, sizeof st->out_shape[o]);
        }
    }
    for (int i = 0; i < op->nin && diag_count(E->d) == errs; i++) {
        if (grad[i] < 0)
            continue;
        in->has_grad[i] = el_bwd_ref(g, fn, dout, n0, in->nsteps, grad[i], &in->grad[i]);
        if (in->grad[i].src == IR_BWD_SRC_IN || in->grad[i].src == IR_BWD_SRC_OUT) {
            const ast_node *st = NULL;
            for (int s = 0; s < blk->list.n && !st; s++)
                if (el_bwd_target(op, blk->list.items[s]->list.items[0]->name) == i)
                    st = blk->list.items[s];
            ERR(st ? st->a->span : blk->span, "compute it from the incoming gradients (d<output>)",
                "the gradient `d%s` of `%s` is a forward value", op->in[i]->name, opname);
        }
    }
    g->nvalues = v0;   /* the block's values and nodes live on in the instance only */
    g->nnodes = n0;
    if (diag_count(E->d) != errs) {
        op->bwd_bad = true;
        return;
    }
    in->next = op->def.bwd_expr->first;
    op->def.bwd_expr->first = in;
}

static void el_lower_op(el *E, el_op *op)
{
    const ast_node *a = op->ast;
    int before = diag_count(E->d);
    op->def.name = ir_strdup(E->g, a->name);
    op->def.lib = a->str ? ir_strdup(E->g, a->str) : NULL;
    op->def.loc = el_loc(E, a->span);
    for (int i = 0; i < a->list.n; i++) {
        const ast_node *sp = a->list.items[i];
        if (!sp->a) {
            ERR(sp->span, "write `name: f32[dims]` or `name: int`", "op argument `%s` needs a type", sp->name);
            continue;
        }
        bool tensor;
        int dt = el_dtype(E, sp->a, &tensor);
        if (dt < 0)
            continue;
        if (tensor) {
            if (op->nin >= IR_MAX_PORTS) {
                ERR(sp->span, NULL, "an op has at most %d tensor inputs", IR_MAX_PORTS);
                continue;
            }
            op->def.input_names[op->nin] = ir_strdup(E->g, sp->name);
            op->def.input_diff[op->nin] = (dt == PLAN_F32 || dt == EL_FLOAT) && !(sp->flags & AST_F_NOGRAD);
            op->generic |= dt == EL_FLOAT;
            op->in[op->nin++] = sp;
            const ast_list *dims = &sp->a->list;
            for (int j = 0; j < dims->n; j++) {
                const ast_node *dn = dims->items[j];
                if (dn->flags & AST_F_STAR) {
                    if (j != 0)
                        ERR(dn->span, NULL, "`*%s` must be the first dim", dn->name);
                    op_dim(E, op, dn->name);
                } else if (dn->a->kind == AST_NAME) {
                    bool attr = false;
                    for (int k = 0; k < a->list.n; k++)
                        attr |= strcmp(a->list.items[k]->name, dn->a->name) == 0;
                    if (!attr)
                        op_dim(E, op, dn->a->name);
                }
            }
        } else {
            if (dt > 1) {
                ERR(sp->a->span, NULL, "op attributes are int or float, got `%s`", sp->a->name);
                continue;
            }
            if (op->nattr >= IR_MAX_SYMS) {
                ERR(sp->span, NULL, "an op has at most %d attributes", IR_MAX_SYMS);
                continue;
            }
            op->def.attr_names[op->nattr] = ir_strdup(E->g, sp->name);
            op->def.attr_kinds[op->nattr] = dt == 0 ? PLAN_ARG_I64 : PLAN_ARG_F32;
            op->attr[op->nattr++] = sp;
        }
    }
    for (int i = 0; i < a->list2.n; i++) {
        const ast_node *sp = a->list2.items[i];
        bool tensor;
        if (!sp->a) {
            ERR(sp->span, NULL, "op output `%s` needs a tensor type", sp->name);
            continue;
        }
        int dt = el_dtype(E, sp->a, &tensor);
        if (dt < 0)
            continue;
        if (!tensor) {
            ERR(sp->a->span, NULL, "op outputs are tensors, got `%s`", sp->a->name);
            continue;
        }
        if (op->nout >= IR_MAX_PORTS) {
            ERR(sp->span, NULL, "an op has at most %d outputs", IR_MAX_PORTS);
            continue;
        }
        op->def.output_names[op->nout] = ir_strdup(E->g, sp->name);
        op->def.output_diff[op->nout] = (dt == PLAN_F32 || dt == EL_FLOAT) && !(sp->flags & AST_F_NOGRAD);
        op->generic |= dt == EL_FLOAT;
        op->saved[op->nout] = sp->flags & AST_F_SAVED;
        op->out[op->nout++] = sp;
    }
    op->def.ninputs = op->nin;
    op->def.noutputs = op->nout;
    op->def.nattrs = op->nattr;
    const ast_node *fwd = NULL, *bwd = NULL, *phase = NULL;
    for (int i = 0; i < a->list3.n; i++) {
        const ast_node *e = a->list3.items[i];
        static const char *const keys[] = {"forward", "backward", "phase", "forward_bf16", "backward_bf16",
                                           "forward_f16", "backward_f16", "fuses"};
        const ast_node **slots[] = {&fwd, &bwd, &phase, &op->fwd16, &op->bwd16, &op->fwdh, &op->bwdh,
                                    &op->fuses};
        const ast_node **slot = NULL;
        for (int k = 0; k < 8; k++)
            if (strcmp(e->name, keys[k]) == 0)
                slot = slots[k];
        if (!slot) {
            ERR(e->span, el_suggest_list(E, e->name, keys, 8), "unknown key `%s` in extern op `%s`", e->name, a->name);
            continue;
        }
        /* `fuses` takes a { } body, `backward` either form, the rest `= ...` */
        if (e->a ? slot == &op->fuses : slot != &op->fuses && slot != &bwd) {
            ERR(e->span, e->a ? "write `fuses { out = op(args) ... }`" : el_fmt(E, "write `%s = ...`", e->name),
                "`%s` in extern op `%s` %s", e->name, a->name, e->a ? "takes a { } body" : "is not a { } body");
            continue;
        }
        if (*slot) {
            ERR(e->span, NULL, "duplicate `%s` in extern op `%s`", e->name, a->name);
            continue;
        }
        *slot = e;
    }
    if (phase) {
        /* `phase = optimizer`: a stateful update with no outputs and no gradient */
        const char *pv = phase->a->kind == AST_NAME || phase->a->kind == AST_STRING ? phase->a->name : NULL;
        if (pv && strcmp(pv, "optimizer") == 0) {
            op->update = true;
        } else if (!(pv && strcmp(pv, "forward") == 0)) {
            static const char *const ph[] = {"forward", "optimizer"};
            ERR(phase->a->span, pv ? el_suggest_list(E, pv, ph, 2) : "phase = forward or phase = optimizer",
                "unknown phase%s%s%s for extern op `%s`", pv ? " `" : "", pv ? pv : "", pv ? "`" : "", a->name);
        }
    }
    if (a->list2.n == 0 && !op->update)
        ERR(a->span, "only a `phase = optimizer` op may have no outputs", "op `%s` has no outputs", a->name);
    if (op->update && (a->list2.n != 0 || (bwd && !(bwd->a && bwd->a->kind == AST_NAME && strcmp(bwd->a->name, "none") == 0))))
        ERR(phase->span, "an optimizer-phase op writes its inputs in place: -> () and no backward",
            "op `%s` runs in the optimizer phase, so it has no outputs and no backward", a->name);
    if (diag_count(E->d) != before)
        return;
    if (!fwd || fwd->a->kind != AST_CALL) {
        ERR(fwd ? fwd->a->span : a->span, "forward = kernel_symbol(args...)", "extern op `%s` needs a forward kernel call",
            a->name);
        return;
    }
    if (!el_lower_call(E, op, fwd->a, false, &op->def.fwd_symbol, op->def.fwd, &op->def.nfwd))
        return;
    if (bwd && !bwd->a && op->fuses) {
        /* the fuse pass makes its calls, so no call of it runs the block */
        ERR(bwd->span, "give a fused op a backward kernel", "fused op `%s` cannot have a backward { } block",
            a->name);
        return;
    } else if (bwd && !bwd->a) {
        op->def.bwd_kind = IR_BWD_EXPR;
        op->bwd_body = bwd;
        if (!el_bwd_check(E, op, bwd))
            return;
        op->def.bwd_expr = ir_alloc(E->g, sizeof *op->def.bwd_expr);
        op->def.bwd_expr->first = NULL;
    } else if (!bwd || (bwd->a->kind == AST_NAME && strcmp(bwd->a->name, "none") == 0)) {
        op->def.bwd_kind = IR_BWD_NONE;
        for (int i = 0; i < op->nin; i++)
            op->def.input_diff[i] = false;
    } else if (bwd->a->kind == AST_NAME && strcmp(bwd->a->name, "passthrough") == 0) {
        op->def.bwd_kind = IR_BWD_PASSTHROUGH;
    } else if (bwd->a->kind == AST_CALL) {
        op->def.bwd_kind = IR_BWD_KERNEL;
        if (!el_lower_call(E, op, bwd->a, true, &op->def.bwd_symbol, op->def.bwd, &op->def.nbwd))
            return;
        for (int i = 0; i < op->nin; i++) {
            bool written = false;
            for (int j = 0; j < op->def.nbwd; j++)
                written |= op->def.bwd[j].kind == IR_REF_DIN && op->def.bwd[j].index == i;
            if (op->def.input_diff[i] && !written) {
                ERR(bwd->a->span, el_fmt(E, "pass d%s to the kernel, or mark `%s` nograd", op->in[i]->name, op->in[i]->name),
                    "backward of `%s` does not write the gradient of `%s`", a->name, op->in[i]->name);
                return;
            }
        }
    } else {
        ERR(bwd->a->span, "backward = kernel(args...), backward { dx = <ops of dy> }, none or passthrough",
            "bad backward for extern op `%s`", a->name);
        return;
    }
    if (op->fuses) {   /* filled once every op is lowered (el_fuse_rules) */
        op->rule = ir_alloc(E->g, sizeof *op->rule);
        memset(op->rule, 0, sizeof *op->rule);
        op->def.fuse = op->rule;
    }
    op->reg = ir_def_add(E->g, &op->def);
    op->ok = op->reg != NULL;
}

/* `sym` with its first "bf16" written "f16": an explicit bf16 call's fp16
 * twin (moek_cast_bf16_f32 -> moek_cast_f16_f32). */
static const char *el_f16_twin(el *E, const char *sym)
{
    const char *b = strstr(sym, "bf16");
    return b ? el_fmt(E, "%.*s%s", (int)(b - sym), sym, b + 1) : sym;
}

/* The half instance of a generic op (dtype PLAN_BF16 or PLAN_F16): the same
 * def calling `<symbol>_bf16` / `<symbol>_f16`, registered as
 * "<name><bf16>" / "<name><f16>" (no identifier can take those names).  NULL
 * after an error when the device library has no such kernel. */
static const ir_opdef *el_half_def(el *E, el_op *op, const ast_node *call, int dtype)
{
    bool f16 = dtype == PLAN_F16;
    const ir_opdef **reg = f16 ? &op->reg_f16 : &op->reg_bf16;
    if (*reg)
        return *reg;
    const char *suffix = iop_half_suffix(dtype);
    ir_opdef d = op->def;
    d.name = el_fmt(E, "%s<%s>", op->def.name, suffix + 1);
    d.fwd_symbol = el_fmt(E, "%s%s", op->def.fwd_symbol, suffix);
    if (op->def.bwd_symbol)
        d.bwd_symbol = el_fmt(E, "%s%s", op->def.bwd_symbol, suffix);
    /* explicit half calls (a cast is not `<symbol>_bf16` of its fp32 copy);
     * fp16 without its own falls back to the bf16 call's f16 twin */
    const ast_node *fwd = f16 && op->fwdh ? op->fwdh : op->fwd16;
    const ast_node *bwd = f16 && op->bwdh ? op->bwdh : op->bwd16;
    if (fwd && (fwd->a->kind != AST_CALL ||
                !el_lower_call(E, op, fwd->a, false, &d.fwd_symbol, d.fwd, &d.nfwd)))
        return NULL;
    if (bwd && (bwd->a->kind != AST_CALL || !d.bwd_symbol ||
                !el_lower_call(E, op, bwd->a, true, &d.bwd_symbol, d.bwd, &d.nbwd)))
        return NULL;
    if (f16 && fwd && fwd == op->fwd16)
        d.fwd_symbol = el_f16_twin(E, d.fwd_symbol);
    if (f16 && bwd && bwd == op->bwd16)
        d.bwd_symbol = el_f16_twin(E, d.bwd_symbol);
    const char *missing = NULL;
    if (!d.lib && !el_kernel_find(d.fwd_symbol))
        missing = d.fwd_symbol;
    else if (!d.lib && d.bwd_symbol && !el_kernel_find(d.bwd_symbol))
        missing = d.bwd_symbol;
    if (missing) {
        ERR(call->span, el_fmt(E, "declare the ports of `%s` f32, or use precision = fp32", op->def.name),
            "op `%s` gets %s tensors but kernels/moek.h has no `%s`", op->def.name, suffix + 1,
            missing);
        ast_span at = op->ast->span;
        diag_note(E->d, at, "`%s` is declared here with `float` ports", op->def.name);
        return NULL;
    }
    d.name = ir_strdup(E->g, d.name);
    d.fwd_symbol = ir_strdup(E->g, d.fwd_symbol);
    if (d.bwd_symbol)
        d.bwd_symbol = ir_strdup(E->g, d.bwd_symbol);
    *reg = ir_def_add(E->g, &d);
    return *reg;
}

/* Fusion rules (fuse.h): lowered after every op, since a pattern names
 * ops declared anywhere.  A failed rule stays empty (nops 0: never used). */
static void el_fuse_rules(el *E)
{
    for (int i = 0; i < E->nops; i++) {
        el_op *op = &E->ops[i];
        if (op->ok && op->rule && fuse_rule_lower(E->g, E->d, op->ast, op->fuses, op->reg, op->rule))
            op->rule->nops = 0;
    }
}

/* The fusion pass replaces nodes with a fused op's instance for their
 * dtype, which no call registered: register it now for the precision the
 * model computes in, where the kernel library has its kernels. */
static void el_fuse_instances(el *E)
{
    const char *suffix = iop_half_suffix(E->compute);
    for (int i = 0; i < E->nops && suffix; i++) {
        el_op *op = &E->ops[i];
        if (!op->ok || !op->rule || !op->rule->nops || !op->generic || op->def.lib)
            continue;
        const char *f = el_fmt(E, "%s%s", op->def.fwd_symbol, suffix);
        const char *b = op->def.bwd_symbol ? el_fmt(E, "%s%s", op->def.bwd_symbol, suffix) : NULL;
        if (el_kernel_find(f) && (!b || el_kernel_find(b)))
            el_half_def(E, op, op->ast, E->compute);
    }
}

/* -------------------------------------------------------- train/parallel */

static const ast_node *el_entry(const ast_node *sec, const char *key)
{
    if (!sec)
        return NULL;
    for (int i = 0; i < sec->list.n; i++)
        if (strcmp(sec->list.items[i]->name, key) == 0)
            return sec->list.items[i];
    return NULL;
}

static void el_check_keys(el *E, const ast_node *sec, const char *what, const char *const *keys, int nkeys)
{
    if (!sec)
        return;
    for (int i = 0; i < sec->list.n; i++) {
        const ast_node *e = sec->list.items[i];
        bool known = false;
        for (int k = 0; k < nkeys; k++)
            known |= strcmp(keys[k], e->name) == 0;
        if (!known)
            ERR(e->span, el_suggest_list(E, e->name, keys, nkeys), "unknown key `%s` in %s { }", e->name, what);
        for (int j = 0; j < i; j++)
            if (strcmp(sec->list.items[j]->name, e->name) == 0) {
                ERR(e->span, NULL, "duplicate key `%s` in %s { }", e->name, what);
                diag_note(E->d, sec->list.items[j]->span, "first set here");
                break;
            }
    }
}

static bool el_num_entry(el *E, const ast_node *e, double lo, double hi, bool integer, double *out)
{
    ev v = el_eval(E, NULL, e->a);
    if (v.k == EV_NONE)
        return false;
    if (!ev_is_num(&v) || (integer && v.k == EV_FLOAT && v.f != floor(v.f))) {
        ERR(e->a->span, NULL, "`%s` must be %s, got a %s", e->name, integer ? "an integer" : "a number",
            ev_kind_name(v.k));
        return false;
    }
    double x = ev_num(&v);
    if (x < lo || x > hi) {
        ERR(e->a->span, NULL, "`%s` must be in [%g, %g], got %g", e->name, lo, hi, x);
        return false;
    }
    *out = x;
    return true;
}

static void el_set_i(el *E, const ast_node *sec, const char *key, double lo, double hi, int64_t *dst)
{
    const ast_node *e = el_entry(sec, key);
    double x;
    if (e && el_num_entry(E, e, lo, hi, true, &x))
        *dst = (int64_t)x;
}

static void el_set_f(el *E, const ast_node *sec, const char *key, double lo, double hi, float *dst)
{
    const ast_node *e = el_entry(sec, key);
    double x;
    if (e && el_num_entry(E, e, lo, hi, false, &x))
        *dst = (float)x;
}

/* Keyword arguments of optimizer = adamw(...) / schedule = cosine(...). */
static void el_kwargs(el *E, const ast_node *call, const char *const *keys, int nkeys, const ast_node **out)
{
    for (int k = 0; k < nkeys; k++)
        out[k] = NULL;
    for (int i = 0; i < call->list.n; i++) {
        const ast_node *a = call->list.items[i];
        if (!a->name) {
            if (i == 0 && strcmp(keys[0], "lr") == 0) {
                out[0] = a;
                continue;
            }
            ERR(a->span, NULL, "arguments of `%s` are written key = value", call->name);
            continue;
        }
        int k = -1;
        for (int j = 0; j < nkeys; j++)
            if (strcmp(keys[j], a->name) == 0)
                k = j;
        if (k < 0)
            ERR(a->span, el_suggest_list(E, a->name, keys, nkeys), "`%s` has no argument `%s`", call->name, a->name);
        else
            out[k] = a;
    }
}

/* train { loss_scale = dynamic | dynamic(initial = S0) | S, loss_scale_window = W }:
 * fp16 only.  Dynamic (the default) starts at 65536 and doubles after W =
 * 1000 overflow-free steps; a number is a static scale (window 0).  The
 * runtime halves S on every overflow either way (docs/runtime.md). */
static void el_loss_scale(el *E, const ast_node *tr, plan_train *t)
{
    const ast_node *ls = el_entry(tr, "loss_scale"), *win = el_entry(tr, "loss_scale_window");
    t->loss_scale = 0.0f;
    t->loss_scale_window = 0;
    if (E->compute != PLAN_F16) {
        const ast_node *e = ls ? ls : win;
        if (e)
            ERR(e->span, "loss scaling keeps fp16 gradients in range; fp32 and bf16 need none",
                "`%s` is only meaningful with precision = fp16", e->name);
        return;
    }
    t->loss_scale = 65536.0f;
    t->loss_scale_window = 1000;
    bool dynamic = true;
    if (ls) {
        const ast_node *x = ls->a;
        const char *n = x->kind == AST_CALL || x->kind == AST_NAME ? x->name : NULL;
        double d;
        if (n && strcmp(n, "dynamic") == 0) {
            if (x->kind == AST_CALL) {
                static const char *const k[] = {"initial"};
                const ast_node *v[1];
                el_kwargs(E, x, k, 1, v);
                if (v[0] && el_num_entry(E, v[0], 1, 1e38, false, &d))
                    t->loss_scale = (float)d;
            }
        } else if (x->kind == AST_NAME || x->kind == AST_CALL) {
            static const char *const k[] = {"dynamic"};
            ERR(x->span, el_suggest_list(E, n, k, 1),
                "unknown loss_scale `%s`: write dynamic, dynamic(initial = 65536) or a number", n);
        } else if (el_num_entry(E, ls, 1, 1e38, false, &d)) {
            t->loss_scale = (float)d;
            t->loss_scale_window = 0;
            dynamic = false;
        }
    }
    if (win) {
        double d;
        if (!dynamic)
            ERR(win->span, "write loss_scale = dynamic to let the scale grow again",
                "`loss_scale_window` needs a dynamic loss scale; loss_scale is a fixed number here");
        else if (el_num_entry(E, win, 1, 1e9, true, &d))
            t->loss_scale_window = (uint32_t)d;
    }
}

static void el_train(el *E, const ast_node *model_tokens_type)
{
    plan_train *t = &E->g->train;
    const ast_node *tr = E->train;
    static const char *const keys[] = {
        "batch", "seq", "grad_accum", "steps", "seed", "lr", "min_lr", "warmup", "schedule", "optimizer",
        "clip_grad", "eval_every", "eval_batches", "checkpoint_every", "log_every", "val_fraction", "data",
        "data_format", "device", "precision", "global_batch", "weight_decay", "recompute",
        "freeze", "loss_scale", "loss_scale_window"};
    el_check_keys(E, tr, "train", keys, (int)(sizeof keys / sizeof *keys));
    t->batch = 0;
    t->seq = 0;
    t->grad_accum = 1;
    t->steps = 100;
    t->seed = 1337;
    t->eval_every = 0;
    t->eval_batches = 4;
    t->checkpoint_every = 0;
    t->log_every = 1;
    t->warmup = 0;
    t->optimizer = PLAN_OPT_ADAMW;
    t->schedule = PLAN_SCHED_CONSTANT;
    t->lr = 3e-4f;
    t->min_lr = -1;
    t->beta1 = 0.9f;
    t->beta2 = 0.95f;
    t->eps = 1e-8f;
    t->weight_decay = 0.0f;
    t->momentum = 0.0f;
    t->clip_grad = 1.0f;
    t->val_fraction = 0.1f;
    el_set_i(E, tr, "batch", 1, 1 << 24, &t->batch);
    el_set_i(E, tr, "seq", 1, 1 << 24, &t->seq);
    el_set_i(E, tr, "grad_accum", 1, 1 << 20, &t->grad_accum);
    el_set_i(E, tr, "steps", 0, 1e12, &t->steps);
    el_set_i(E, tr, "seed", 0, 9e15, &t->seed);
    el_set_i(E, tr, "warmup", 0, 1e12, &t->warmup);
    el_set_i(E, tr, "eval_every", 0, 1e12, &t->eval_every);
    el_set_i(E, tr, "eval_batches", 0, 1e9, &t->eval_batches);
    el_set_i(E, tr, "checkpoint_every", 0, 1e12, &t->checkpoint_every);
    el_set_i(E, tr, "log_every", 1, 1e12, &t->log_every);
    el_set_f(E, tr, "lr", 0, 10, &t->lr);
    el_set_f(E, tr, "min_lr", 0, 10, &t->min_lr);
    el_set_f(E, tr, "clip_grad", 0, 1e9, &t->clip_grad);
    el_set_f(E, tr, "val_fraction", 0, 0.9, &t->val_fraction);
    el_set_f(E, tr, "weight_decay", 0, 10, &t->weight_decay);
    const ast_node *e;
    if ((e = el_entry(tr, "optimizer"))) {
        const ast_node *x = e->a;
        const char *n = x->kind == AST_CALL || x->kind == AST_NAME ? x->name : NULL;
        static const char *const opts[] = {"adamw", "sgd"};
        if (n && strcmp(n, "adamw") == 0) {
            t->optimizer = PLAN_OPT_ADAMW;
            if (x->kind == AST_CALL) {
                static const char *const k[] = {"lr", "betas", "eps", "weight_decay"};
                const ast_node *v[4];
                el_kwargs(E, x, k, 4, v);
                double d;
                if (v[0] && el_num_entry(E, v[0], 0, 10, false, &d)) t->lr = (float)d;
                if (v[2] && el_num_entry(E, v[2], 0, 1, false, &d)) t->eps = (float)d;
                if (v[3] && el_num_entry(E, v[3], 0, 10, false, &d)) t->weight_decay = (float)d;
                if (v[1]) {
                    const ast_node *b = v[1]->a;
                    if (b->kind != AST_TUPLE || b->list.n != 2) {
                        ERR(b->span, "betas = (0.9, 0.95)", "`betas` must be a pair");
                    } else {
                        ev b1 = el_eval(E, NULL, b->list.items[0]), b2 = el_eval(E, NULL, b->list.items[1]);
                        if (!ev_is_num(&b1) || !ev_is_num(&b2) || ev_num(&b1) < 0 || ev_num(&b1) >= 1 ||
                            ev_num(&b2) < 0 || ev_num(&b2) >= 1)
                            ERR(b->span, NULL, "`betas` must be two numbers in [0, 1)");
                        else
                            t->beta1 = (float)ev_num(&b1), t->beta2 = (float)ev_num(&b2);
                    }
                }
            }
        } else if (n && strcmp(n, "sgd") == 0) {
            t->optimizer = PLAN_OPT_SGD;
            if (x->kind == AST_CALL) {
                static const char *const k[] = {"lr", "momentum", "weight_decay"};
                const ast_node *v[3];
                el_kwargs(E, x, k, 3, v);
                double d;
                if (v[0] && el_num_entry(E, v[0], 0, 10, false, &d)) t->lr = (float)d;
                if (v[1] && el_num_entry(E, v[1], 0, 1, false, &d)) t->momentum = (float)d;
                if (v[2] && el_num_entry(E, v[2], 0, 10, false, &d)) t->weight_decay = (float)d;
            }
        } else {
            ERR(x->span, n ? el_suggest_list(E, n, opts, 2) : "use adamw(...) or sgd(...)", "unknown optimizer%s%s%s",
                n ? " `" : "", n ? n : "", n ? "`" : "");
        }
    }
    if ((e = el_entry(tr, "schedule"))) {
        const ast_node *x = e->a;
        const char *n = x->kind == AST_CALL || x->kind == AST_NAME ? x->name : NULL;
        static const char *const sch[] = {"constant", "cosine", "linear"};
        int k = -1;
        for (int i = 0; n && i < 3; i++)
            if (strcmp(n, sch[i]) == 0)
                k = i;
        if (k < 0) {
            ERR(x->span, n ? el_suggest_list(E, n, sch, 3) : "use constant, cosine(...) or linear(...)",
                "unknown schedule%s%s%s", n ? " `" : "", n ? n : "", n ? "`" : "");
        } else {
            t->schedule = (uint32_t)k;
            if (x->kind == AST_CALL) {
                static const char *const kk[] = {"warmup", "min_lr"};
                const ast_node *v[2];
                el_kwargs(E, x, kk, 2, v);
                double d;
                if (v[0] && el_num_entry(E, v[0], 0, 1e12, true, &d)) t->warmup = (int64_t)d;
                if (v[1] && el_num_entry(E, v[1], 0, 10, false, &d)) t->min_lr = (float)d;
            }
        }
    }
    if (t->min_lr < 0)
        t->min_lr = t->schedule == PLAN_SCHED_CONSTANT ? t->lr : t->lr * 0.1f;
    if ((e = el_entry(tr, "precision"))) {
        const char *n = e->a->kind == AST_NAME || e->a->kind == AST_STRING ? e->a->name : NULL;
        static const char *const p[] = {"fp32", "bf16", "fp16"};
        if (n && strcmp(n, "bf16") == 0)
            E->compute = PLAN_BF16;
        else if (n && strcmp(n, "fp16") == 0)
            E->compute = PLAN_F16;
        else if (!n || strcmp(n, "fp32") != 0)
            ERR(e->a->span, n ? el_suggest_list(E, n, p, 3) : NULL, "unknown precision%s%s%s", n ? " `" : "",
                n ? n : "", n ? "`" : "");
    }
    t->precision = (uint32_t)E->compute;
    el_loss_scale(E, tr, t);
    if ((e = el_entry(tr, "device"))) {
        const char *n = e->a->kind == AST_NAME || e->a->kind == AST_STRING ? e->a->name : NULL;
        static const char *const dv[] = {"cpu", "cuda"};
        if (n && strcmp(n, "cpu") == 0)
            t->device = 0;
        else if (n && strcmp(n, "cuda") == 0)
            t->device = 1;
        else
            ERR(e->a->span, n ? el_suggest_list(E, n, dv, 2) : NULL, "unknown device%s%s%s", n ? " `" : "",
                n ? n : "", n ? "`" : "");
    }
    if ((e = el_entry(tr, "data"))) {
        if (e->a->kind != AST_STRING) {
            ERR(e->a->span, "data = \"path/to/tokens.bin\"", "`data` must be a string");
        } else {
            E->g->data_path = ir_strdup(E->g, e->a->name);
            size_t n = strlen(e->a->name);
            if (n > 4 && strcmp(e->a->name + n - 4, ".bin") == 0)
                t->data_format = 1;
        }
    }
    if ((e = el_entry(tr, "data_format"))) {
        const char *n = e->a->kind == AST_NAME || e->a->kind == AST_STRING ? e->a->name : NULL;
        static const char *const f[] = {"bytes", "u16", "u32"};
        int k = -1;
        for (int i = 0; n && i < 3; i++)
            if (strcmp(n, f[i]) == 0)
                k = i;
        if (k < 0)
            ERR(e->a->span, n ? el_suggest_list(E, n, f, 3) : NULL, "unknown data_format (bytes, u16 or u32)");
        else
            t->data_format = (uint32_t)k;
    }
    if ((e = el_entry(tr, "recompute"))) {
        const char *n = e->a->kind == AST_NAME || e->a->kind == AST_STRING ? e->a->name : NULL;
        static const char *const rc[] = {"none", "selective", "full"};
        int k = -1;
        for (int i = 0; n && i < 3; i++)
            if (strcmp(n, rc[i]) == 0)
                k = i;
        const char *hint = n ? el_suggest_list(E, n, rc, 3) : NULL;
        if (k < 0)
            ERR(e->a->span, hint ? hint : "use recompute = none, selective or full",
                "unknown recompute policy%s%s%s", n ? " `" : "", n ? n : "", n ? "`" : "");
        else
            E->g->recompute = k;   /* enum memplan_recompute: none, selective, full */
    }
    (void)model_tokens_type;
    if (tr)
        E->g->train_loc = el_loc(E, tr->span);
}

/* train { freeze = "layers.0.*" | ("embed.*", "layers.0.*") }: the params
 * whose names match a pattern (fnmatch; `*` also crosses dots) are frozen,
 * as `param ... frozen` is (docs/passes.md).  Runs after the model, when
 * every param has its name. */
static void el_freeze(el *E)
{
    const ast_node *e = el_entry(E->train, "freeze");
    if (!e)
        return;
    const ast_node *one[1] = {e->a};
    const ast_node *const *pats = one;
    int npat = 1;
    if (e->a->kind == AST_TUPLE) {
        pats = (const ast_node *const *)e->a->list.items;
        npat = e->a->list.n;
    }
    for (int k = 0; k < npat; k++) {
        const ast_node *pat = pats[k];
        if (pat->kind != AST_STRING) {
            ERR(pat->span, "write freeze = \"layers.0.*\" or freeze = (\"embed.*\", \"layers.0.*\")",
                "freeze takes parameter name patterns in quotes");
            continue;
        }
        int hits = 0;
        for (int p = 0; p < E->g->nparams; p++) {
            ir_param *pp = &E->g->params[p];
            const ir_value *v = &E->g->values[pp->value];
            if (v->storage == PLAN_ST_PARAM && fnmatch(pat->name, v->name, 0) == 0) {
                pp->frozen = true;
                hits++;
            }
        }
        if (hits == 0) {
            const char *names[64];
            int n = 0;
            for (int p = 0; p < E->g->nparams && n < 64; p++)
                names[n++] = E->g->values[E->g->params[p].value].name;
            const char *near = diag_closest(pat->name, names, n);
            char hint[256];
            snprintf(hint, sizeof hint, "parameter names look like `%s`%s%s%s",
                     n ? names[0] : "embed.weight", near ? "; did you mean `" : "", near ? near : "",
                     near ? "`?" : "");
            ERR(pat->span, hint, "freeze pattern `%s` matches no parameter", pat->name);
        }
    }
}

static void el_parallel(el *E)
{
    const ast_node *p = E->parallel;
    static const char *const keys[] = {"ranks", "expert", "zero"};
    el_check_keys(E, p, "parallel", keys, 3);
    E->g->par_ranks = 1;
    E->g->par_expert = 1;
    E->g->par_zero = 0;
    el_set_i(E, p, "ranks", 1, 1 << 20, &E->g->par_ranks);
    el_set_i(E, p, "expert", 1, 1 << 20, &E->g->par_expert);
    const ast_node *z = el_entry(p, "zero");
    double d;
    if (z && el_num_entry(E, z, -1e18, 1e18, true, &d)) {
        if (d < 0 || d > 3)
            ERR(z->a->span, "ZeRO stages are 0 (off), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)",
                "zero stage must be 0-3, got %g", d);
        else
            E->g->par_zero = (int64_t)d;
    }
    const ast_node *ex = el_entry(p, "expert"), *rk = el_entry(p, "ranks");
    if (ex && E->g->par_ranks % E->g->par_expert != 0) {
        ERR(ex->a->span, "the expert-parallel size must divide the number of ranks",
            "impossible layout: %" PRId64 " ranks are not divisible by expert = %" PRId64, E->g->par_ranks,
            E->g->par_expert);
        if (rk)
            diag_note(E->d, rk->a->span, "ranks = %" PRId64 " is set here", E->g->par_ranks);
    }
}

/* ------------------------------------------------------------- the model */

static void el_model(el *E, const ast_node *m)
{
    ir_graph *g = E->g;
    g->model_name = ir_strdup(g, m->name);
    el_frame fr = {0};
    fr.prefix = "";
    const ast_node *tr = E->train;
    const ast_node *eb = el_entry(tr, "batch"), *es = el_entry(tr, "seq");
    int ntok = 0;
    int64_t batch = 0, seq = 0;
    const ast_node *batch_at = NULL, *seq_at = NULL;
    for (int i = 0; i < m->list.n; i++) {
        const ast_node *sp = m->list.items[i];
        bool tensor = false;
        int dt = sp->a ? el_dtype(E, sp->a, &tensor) : -1;
        if (!sp->a || !tensor || dt != PLAN_I32 || sp->a->list.n != 2) {
            ERR(sp->span, "model inputs are token tensors: tokens: i32[B, seq], targets: i32[B, seq]",
                "model input `%s` must be an i32[batch, seq] tensor", sp->name);
            continue;
        }
        int64_t shape[2];
        for (int d = 0; d < 2; d++) {
            const ast_node *dn = sp->a->list.items[d];
            if (dn->flags & AST_F_STAR) {
                ERR(dn->span, NULL, "model inputs have a fixed shape");
                goto done;
            }
            const ast_node *ent = d == 0 ? eb : es;
            int64_t trv = d == 0 ? g->train.batch : g->train.seq;
            int64_t *bound = d == 0 ? &batch : &seq;
            const ast_node **bound_at = d == 0 ? &batch_at : &seq_at;
            bool symbolic = dn->a->kind == AST_NAME && !env_get(&E->globals, dn->a->name);
            int64_t v = 0;
            if (symbolic) {
                if (!ent) {
                    ERR(dn->span, d == 0 ? "set batch = ... in train { }" : "set seq = ... in train { } or config { }",
                        "the %s size `%s` is not known", d == 0 ? "batch" : "sequence", dn->a->name);
                    goto done;
                }
                v = trv;
            } else {
                if (!el_dim(E, el_eval(E, NULL, dn->a), dn, &v, false))
                    goto done;
                if (ent && trv != v) {
                    ERR(ent->a->span, "the model inputs and train { } must agree",
                        "%s conflict: train { } says %s = %" PRId64 " but `%s` has %" PRId64,
                        d == 0 ? "batch" : "sequence length", d == 0 ? "batch" : "seq", trv, sp->name, v);
                    diag_note(E->d, dn->span, "`%s` dim %d is %" PRId64 " here", sp->name, d, v);
                    goto done;
                }
            }
            if (*bound && *bound != v) {
                ERR(dn->span, NULL, "model inputs disagree: %" PRId64 " here but %" PRId64 " before", v, *bound);
                diag_note(E->d, (*bound_at)->span, "set here");
                goto done;
            }
            *bound = v;
            *bound_at = dn;
            shape[d] = v;
        }
        int t = el_value(E, sp->name, PLAN_I32, PLAN_ST_INPUT, 2, shape, sp->span);
        g->values[t].role = ntok == 0 ? PLAN_ROLE_TOKENS : ntok == 1 ? PLAN_ROLE_TARGETS : PLAN_ROLE_NONE;
        ntok++;
        env_set(&fr.env, sp->name, ev_tensor(t));
    }
    if (ntok < 2 && diag_count(E->d) == 0)
        ERR(m->span, "model name(tokens: i32[B, seq], targets: i32[B, seq])", "model `%s` needs tokens and targets inputs",
            m->name);
    g->train.batch = batch;
    g->train.seq = seq;
    if (diag_count(E->d))
        goto done;
    el_exec(E, &fr, &m->list2);
    if (diag_count(E->d)) {
        goto done;
    }
    ev r = fr.ret;
    ev loss = r.k == EV_TUPLE ? (r.n ? r.items[0] : ev_none) : r;
    ev logits = r.k == EV_TUPLE && r.n > 1 ? r.items[1] : ev_none;
    if (!fr.returned || loss.k != EV_TENSOR || ir_value_numel(&g->values[loss.t]) != 1) {
        ERR(m->span, "end the model with `return cross_entropy(logits, targets)` (optionally `, logits`)",
            "model `%s` must return a 1-element loss tensor", m->name);
        goto done;
    }
    if (r.k == EV_TUPLE && r.n > 2)
        ERR(m->span, NULL, "model `%s` returns %d values; it returns the loss and optionally the logits", m->name, r.n);
    int total = loss.t;
    const el_op *add = el_find_op(E, "add");
    for (int i = 0; i < E->nlosses; i++) {
        g->values[E->losses[i].value].role = PLAN_ROLE_METRIC;
        g->values[E->losses[i].value].name = ir_strdup(g, E->losses[i].name);
        if (!add) {
            ERR(m->span, "import \"core\"", "auxiliary losses need the extern op `add`");
            break;
        }
        ast_node fake = {.kind = AST_CALL, .name = "add", .span = m->span};
        ev s = el_call_op(E, &fr, add, &fake, (ev[]){ev_tensor(total), ev_tensor(E->losses[i].value)}, 2, NULL, NULL, 0);
        if (s.k != EV_TENSOR)
            break;
        g->nodes[g->nnodes - 1].what = "loss + aux losses";
        total = s.t;
    }
    g->loss = total;
    g->values[total].role = PLAN_ROLE_LOSS;
    for (int i = 0; i < E->nupdates; i++)
        ir_node_add(g, &E->updates[i]);
    if (logits.k == EV_TENSOR) {
        g->logits = logits.t;
        g->values[logits.t].role = PLAN_ROLE_LOGITS;
        const ir_value *lv = &g->values[logits.t];
        g->train.vocab = lv->shape[lv->ndim - 1];
    }
done:   /* every exit frees the model frame's variables */
    free(fr.env.vars);
}

static void el_counts(el *E)
{
    ir_graph *g = E->g;
    double total = 0, active = 0;
    for (int i = 0; i < g->nparams; i++) {
        if (g->values[g->params[i].value].storage == PLAN_ST_BUFFER)
            continue;   /* state, not weights */
        double n = (double)ir_value_numel(&g->values[g->params[i].value]);
        total += n;
        active += n * g->params[i].active_fraction;
    }
    g->train.param_count = (uint64_t)total;
    g->train.active_param_count = (uint64_t)(active + 0.5);
    /* 6N + 6LCT (Kaplan): L and C from the attention ops the model runs */
    int64_t layers = 0, width = 0;
    for (int i = 0; i < g->nnodes; i++)
        if (g->nodes[i].def->fwd_symbol && (strcmp(g->nodes[i].def->fwd_symbol, "moek_attention_fwd") == 0 ||
                                             strcmp(g->nodes[i].def->fwd_symbol, "moek_attention_fwd_bf16") == 0 ||
                                             strcmp(g->nodes[i].def->fwd_symbol, "moek_attention_fwd_f16") == 0)) {
            layers++;
            width = g->values[g->nodes[i].inputs[0]].shape[2];
        }
    g->train.flops_per_token = 6 * g->train.active_param_count + (uint64_t)(6 * layers * width * g->train.seq);
}

/* ------------------------------------------------------------- entry */

ir_graph *elaborate(const char *path, const elab_options *opt, diag_ctx *d)
{
    el Es;
    el *E = &Es;
    memset(E, 0, sizeof *E);
    E->d = d;
    E->opt = opt;
    E->arena = ast_arena_new();
    E->g = ir_graph_new();
    E->hash = PLAN_FNV_OFFSET;
    E->compute = PLAN_F32;
    int start = diag_count(d);
    el_load(E, path, opt->text, opt->text_len);
    if (diag_count(d) == start) {
        /* config: in order, each may use the ones before it */
        for (int i = 0; i < E->ncfg; i++) {
            ev v = el_eval(E, NULL, E->cfg[i].ast->a);
            if (v.k == EV_TENSOR)
                ERR(E->cfg[i].ast->span, NULL, "config values are compile-time numbers, strings or bools");
            else if (v.k != EV_NONE)
                env_set(&E->globals, E->cfg[i].name, v);
        }
        for (int i = 0; i < E->nops; i++)
            el_lower_op(E, &E->ops[i]);
        el_fuse_rules(E);
        el_train(E, NULL);
        el_parallel(E);
        const ast_node *model = NULL;
        for (int i = 0; i < E->nmodels; i++)
            if (E->models[i].ast->span.file == E->main->path)
                model = E->models[i].ast;
        if (!model && diag_count(d) == start)
            diag_error(d, (diag_span){E->main->path, 0, 0, 0, 0}, "declare model name(tokens: i32[B, seq], targets: i32[B, seq]) { ... }",
                       "no model in %s", E->main->path);
        else if (model && diag_count(d) == start)
            el_model(E, model);
        if (model && diag_count(d) == start)
            el_freeze(E);
        if (model && diag_count(d) == start)
            el_fuse_instances(E);
        if (diag_count(d) == start) {
            const ast_node *ga = el_entry(E->train, "global_batch");
            double gb;
            if (ga && el_num_entry(E, ga, 1, 1e15, true, &gb)) {
                int64_t dp = E->g->par_ranks;
                int64_t got = E->g->train.batch * E->g->train.grad_accum * dp;
                if (got != (int64_t)gb) {
                    ERR(ga->a->span, "global_batch = batch x grad_accum x data-parallel ranks",
                        "batch conflict: global_batch = %" PRId64 " but batch %" PRId64 " x grad_accum %" PRId64
                        " x ranks %" PRId64 " = %" PRId64, (int64_t)gb, E->g->train.batch, E->g->train.grad_accum, dp,
                        got);
                    const ast_node *e;
                    if ((e = el_entry(E->train, "batch"))) diag_note(d, e->a->span, "batch is set here");
                    if ((e = el_entry(E->train, "grad_accum"))) diag_note(d, e->a->span, "grad_accum is set here");
                    if ((e = el_entry(E->parallel, "ranks"))) diag_note(d, e->a->span, "ranks is set here");
                }
            }
            /* experts must split evenly over the expert-parallel group */
            for (int i = 0; i < E->g->nparams && E->g->par_expert > 1; i++) {
                const ir_param *p = &E->g->params[i];
                const ir_value *v = &E->g->values[p->value];
                if (p->expert_axis >= 0 && v->shape[p->expert_axis] % E->g->par_expert != 0) {
                    const ast_node *ex = el_entry(E->parallel, "expert");
                    ERR(ex->a->span, "choose an expert-parallel size that divides the number of experts",
                        "impossible layout: %" PRId64 " experts of `%s` are not divisible by expert = %" PRId64,
                        v->shape[p->expert_axis], v->name, E->g->par_expert);
                    ast_span at = {p->loc.file, p->loc.line, p->loc.col, p->loc.line, p->loc.col};
                    diag_note(d, at, "the expert parameter is declared here");
                    break;
                }
            }
        }
        if (E->g->train.vocab == 0) {
            const ev *v = env_get(&E->globals, "vocab");
            E->g->train.vocab = v && v->k == EV_INT ? v->i : 256;
        }
        el_counts(E);
    }
    E->g->source_hash = E->hash;
    ir_graph *g = E->g;
    if (diag_count(d) != start) {
        ir_graph_free(g);
        g = NULL;
    }
    free(E->loaded);
    free(E->files);
    free(E->ops);
    free(E->blocks);
    free(E->models);
    free(E->cfg);
    free(E->globals.vars);
    free(E->origin);
    free(E->losses);
    free(E->updates);
    free(E->counts);
    ast_arena_free(E->arena);
    return g;
}
