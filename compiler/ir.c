/* ir.c - graph construction and the graph's arena. */
#include "ir.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ir_chunk {
    struct ir_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} ir_chunk;

struct ir_arena {
    ir_chunk *head;
};

static void *ir_xrealloc(void *p, size_t bytes)
{
    void *q = realloc(p, bytes);
    if (!q) {
        fprintf(stderr, "moec: out of memory (%zu bytes)\n", bytes);
        abort();
    }
    return q;
}

ir_graph *ir_graph_new(void)
{
    ir_graph *g = ir_xrealloc(NULL, sizeof *g);
    memset(g, 0, sizeof *g);
    g->arena = ir_xrealloc(NULL, sizeof *g->arena);
    g->arena->head = NULL;
    g->loss = -1;
    g->logits = -1;
    g->data_path = "";
    g->model_name = "";
    g->par_ranks = g->par_expert = 1;
    return g;
}

void ir_graph_free(ir_graph *g)
{
    if (!g)
        return;
    for (ir_chunk *c = g->arena->head; c;) {
        ir_chunk *next = c->next;
        free(c);
        c = next;
    }
    free(g->arena);
    free(g->defs);
    free(g->values);
    free(g->nodes);
    free(g->params);
    free(g->libs);
    free(g);
}

void *ir_alloc(ir_graph *g, size_t bytes)
{
    bytes = (bytes + 15) & ~(size_t)15;
    ir_chunk *c = g->arena->head;
    if (!c || c->cap - c->used < bytes) {
        size_t cap = bytes > 65536 ? bytes : 65536;
        c = ir_xrealloc(NULL, sizeof *c + cap);
        c->next = g->arena->head;
        c->used = 0;
        c->cap = cap;
        g->arena->head = c;
    }
    void *p = c->data + c->used;
    c->used += bytes;
    memset(p, 0, bytes);
    return p;
}

const char *ir_strdup(ir_graph *g, const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = ir_alloc(g, n);
    memcpy(d, s, n);
    return d;
}

const char *ir_strfmt(ir_graph *g, const char *fmt, ...)
{
    va_list ap;
    if (!fmt)   /* also keeps gcc 12 -fsanitize=undefined from a false "null format" error */
        fmt = "";
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    char *d = ir_alloc(g, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(d, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return d;
}

/* Grows *arr (of elem-sized items) so that index *n fits. */
static void *ir_grow(void *arr, int n, int *cap, size_t elem)
{
    if (n < *cap)
        return arr;
    *cap = *cap ? *cap * 2 : 16;
    return ir_xrealloc(arr, (size_t)*cap * elem);
}

const ir_opdef *ir_def_find(const ir_graph *g, const char *name)
{
    for (int i = 0; i < g->ndefs; i++)
        if (strcmp(g->defs[i]->name, name) == 0)
            return g->defs[i];
    return NULL;
}

const ir_opdef *ir_def_add(ir_graph *g, const ir_opdef *def)
{
    if (ir_def_find(g, def->name))
        return NULL;
    ir_opdef *d = ir_alloc(g, sizeof *d);
    *d = *def;
    g->defs = ir_grow(g->defs, g->ndefs, &g->cap_defs, sizeof *g->defs);
    g->defs[g->ndefs++] = d;
    if (d->lib) {
        int found = 0;
        for (int i = 0; i < g->nlibs; i++)
            found |= strcmp(g->libs[i], d->lib) == 0;
        if (!found) {
            g->libs = ir_grow(g->libs, g->nlibs, &g->cap_libs, sizeof *g->libs);
            g->libs[g->nlibs++] = d->lib;
        }
    }
    return d;
}

int ir_value_add(ir_graph *g, const char *name, int dtype, int storage, int ndim,
                 const int64_t *shape)
{
    /* shape may point into g->values (a copy of another value's shape):
     * read it before growing the array moves it */
    int64_t dims[PLAN_MAX_DIMS] = {0};
    for (int i = 0; i < ndim && i < PLAN_MAX_DIMS; i++)
        dims[i] = shape[i];
    g->values = ir_grow(g->values, g->nvalues, &g->cap_values, sizeof *g->values);
    ir_value *v = &g->values[g->nvalues];
    memset(v, 0, sizeof *v);
    v->name = ir_strdup(g, name ? name : "");
    v->dtype = (uint8_t)dtype;
    v->storage = (uint8_t)storage;
    v->ndim = (uint8_t)ndim;
    memcpy(v->shape, dims, sizeof dims);
    v->producer = -1;
    v->param = -1;
    v->view_of = -1;
    v->pool = -1;
    return g->nvalues++;
}

int ir_param_add(ir_graph *g, int value, const ir_param *p)
{
    const ir_param copy = *p;  /* p may point into g->params, which may move */
    g->params = ir_grow(g->params, g->nparams, &g->cap_params, sizeof *g->params);
    ir_param *q = &g->params[g->nparams];
    *q = copy;
    q->value = value;
    g->values[value].param = g->nparams;
    return g->nparams++;
}

int ir_node_add(ir_graph *g, const ir_node *n)
{
    const ir_node copy = *n;   /* n may point into g->nodes, which may move */
    g->nodes = ir_grow(g->nodes, g->nnodes, &g->cap_nodes, sizeof *g->nodes);
    g->nodes[g->nnodes] = copy;
    const int *outs = copy.is_backward ? copy.grads_out : copy.outputs;
    int nouts = copy.is_backward ? copy.def->ninputs : copy.def->noutputs;
    for (int i = 0; i < nouts; i++)
        if (outs[i] >= 0)
            g->values[outs[i]].producer = g->nnodes;
    return g->nnodes++;
}

int64_t ir_value_numel(const ir_value *v)
{
    int64_t n = 1;
    for (int i = 0; i < v->ndim; i++)
        n *= v->shape[i];
    return n;
}

uint64_t ir_value_bytes(const ir_value *v)
{
    return (uint64_t)ir_value_numel(v) * plan_dtype_size(v->dtype);
}

const char *ir_dtype_name(int dtype)
{
    static const char *const names[] = {"f32", "bf16", "f16", "i32", "i64"};
    return dtype >= 0 && dtype < 5 ? names[dtype] : "?";
}

const char *ir_storage_name(int storage)
{
    static const char *const names[] = {"param", "grad", "optstate", "act", "input", "buffer"};
    return storage >= 0 && storage < PLAN_ST_COUNT ? names[storage] : "?";
}
