/* ast.h - the syntax tree of a .moe file.  Every node carries the source span
 * it came from; every node, list and string of one compilation lives in one
 * arena (ast_arena), dropped whole, so error paths leak nothing. */
#ifndef MOEC_AST_H
#define MOEC_AST_H

#include <stdint.h>
#include <stdio.h>

#include "diag.h"

typedef diag_span ast_span;
typedef struct ast_arena ast_arena;

typedef enum ast_kind {
    /* expressions */
    AST_INT, AST_FLOAT, AST_STRING, AST_BOOL, AST_NAME, AST_BINOP, AST_UNOP, AST_CALL, AST_TUPLE,
    /* statements */
    AST_ASSIGN, AST_EXPR_STMT, AST_PARAM, AST_FOR, AST_IF, AST_RETURN,
    /* declarations */
    AST_IMPORT, AST_CONFIG, AST_BLOCK, AST_MODEL, AST_EXTERN_OP, AST_TRAIN, AST_PARALLEL,
    /* pieces */
    AST_ARG,      /* call argument: name (NULL if positional), a = value */
    AST_ENTRY,    /* key = value inside config/train/parallel/extern op bodies */
    AST_SIGPARAM, /* name: type = default (block/model/op signatures) */
    AST_TYPE,     /* name = dtype ("f32", "int", ...), list = dims (NULL list: a scalar type) */
    AST_DIM,      /* a = size expression, or name = "*N" leading-dims symbol */
    AST_ATTR,     /* param attribute: name, optional a (e.g. active(0.25)) */
    AST_KIND_COUNT
} ast_kind;

/* binary/unary operators: the operator characters, or these for two-char ones */
enum { AST_OP_EQ = 256, AST_OP_NE, AST_OP_LE, AST_OP_GE, AST_OP_AND, AST_OP_OR, AST_OP_NOT,
       AST_OP_IDIV, AST_OP_NEG };

enum { AST_F_NOGRAD = 1, AST_F_SAVED = 2, AST_F_STAR = 4, AST_F_HAS_TYPE = 8 };

typedef struct ast_node ast_node;
typedef struct ast_list {
    ast_node **items;
    int n, cap;
} ast_list;

struct ast_node {
    ast_kind kind;
    ast_span span;
    const char *name;  /* identifier, callee, keyword, key, import path, string literal */
    const char *str;   /* extern op: `from` library (NULL if none) */
    int64_t i;         /* INT, BOOL */
    double f;          /* FLOAT */
    int op;            /* BINOP / UNOP */
    int flags;         /* AST_F_* */
    ast_node *a, *b, *c;
    /* CALL/TUPLE/RETURN: list; ASSIGN: list = targets; BLOCK/MODEL: list = params,
     * list2 = body; FOR: list = body; IF: list = then, list2 = else; CONFIG/TRAIN/
     * PARALLEL: list = entries; EXTERN_OP: list = inputs, list2 = outputs, list3 =
     * entries; TYPE: list = dims; PARAM: list = attributes. */
    ast_list list, list2, list3;
};

typedef struct ast_file {
    const char *path;
    ast_list decls;
} ast_file;

ast_arena *ast_arena_new(void);
void ast_arena_free(ast_arena *a);
void *ast_alloc(ast_arena *a, size_t bytes);
const char *ast_strndup(ast_arena *a, const char *s, size_t n);

ast_node *ast_new(ast_arena *a, ast_kind kind, ast_span span);
void ast_push(ast_arena *a, ast_list *l, ast_node *n);
/* Span from the start of `x` to the end of `y`. */
ast_span ast_join(ast_span x, ast_span y);

/* Parses `text` (registered with d for error display).  Returns the file,
 * possibly partial; diag_count(d) tells whether there were errors. */
ast_file *ast_parse(ast_arena *a, diag_ctx *d, const char *path, const char *text, size_t len);

/* --dump=ast: one node per line, indented, with line:col; stable. */
void ast_dump(const ast_file *f, FILE *out);
const char *ast_kind_name(ast_kind k);
const char *ast_op_name(int op);

#endif
