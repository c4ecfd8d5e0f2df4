/* ast.c - AST arena, constructors and the --dump=ast printer. */
#include "ast.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

typedef struct ast_chunk {
    struct ast_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} ast_chunk;

struct ast_arena {
    ast_chunk *head;
};

ast_arena *ast_arena_new(void)
{
    ast_arena *a = calloc(1, sizeof *a);
    if (!a)
        abort();
    return a;
}

void ast_arena_free(ast_arena *a)
{
    if (!a)
        return;
    for (ast_chunk *c = a->head; c;) {
        ast_chunk *n = c->next;
        free(c);
        c = n;
    }
    free(a);
}

void *ast_alloc(ast_arena *a, size_t bytes)
{
    bytes = (bytes + 15) & ~(size_t)15;
    ast_chunk *c = a->head;
    if (!c || c->cap - c->used < bytes) {
        size_t cap = bytes > 65536 ? bytes : 65536;
        c = malloc(sizeof *c + cap);
        if (!c)
            abort();   /* out of memory: the one failure not worth reporting */
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = c->data + c->used;
    c->used += bytes;
    memset(p, 0, bytes);
    return p;
}

const char *ast_strndup(ast_arena *a, const char *s, size_t n)
{
    char *d = ast_alloc(a, n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

ast_node *ast_new(ast_arena *a, ast_kind kind, ast_span span)
{
    ast_node *n = ast_alloc(a, sizeof *n);
    n->kind = kind;
    n->span = span;
    return n;
}

void ast_push(ast_arena *a, ast_list *l, ast_node *n)
{
    if (!n)
        return;
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 4;
        ast_node **items = ast_alloc(a, (size_t)cap * sizeof *items);
        if (l->n)
            memcpy(items, l->items, (size_t)l->n * sizeof *items);
        l->items = items;
        l->cap = cap;
    }
    l->items[l->n++] = n;
}

ast_span ast_join(ast_span x, ast_span y)
{
    ast_span s = x;
    s.end_line = y.end_line;
    s.end_col = y.end_col;
    return s;
}

const char *ast_kind_name(ast_kind k)
{
    static const char *const names[AST_KIND_COUNT] = {
        "int", "float", "string", "bool", "name", "binop", "unop", "call", "tuple",
        "assign", "expr", "param", "for", "if", "return",
        "import", "config", "block", "model", "extern_op", "train", "parallel",
        "arg", "entry", "sigparam", "type", "dim", "attr",
    };
    return k < AST_KIND_COUNT ? names[k] : "?";
}

const char *ast_op_name(int op)
{
    static char one[2][2];
    switch (op) {
    case AST_OP_EQ: return "==";
    case AST_OP_NE: return "!=";
    case AST_OP_LE: return "<=";
    case AST_OP_GE: return ">=";
    case AST_OP_AND: return "and";
    case AST_OP_OR: return "or";
    case AST_OP_NOT: return "not";
    case AST_OP_IDIV: return "//";
    case AST_OP_NEG: return "-";
    default:
        /* single characters: a small fixed table, no global mutation needed */
        switch (op) {
        case '+': return "+";
        case '-': return "-";
        case '*': return "*";
        case '/': return "/";
        case '%': return "%";
        case '<': return "<";
        case '>': return ">";
        default: (void)one; return "?";
        }
    }
}

static void ast_dump_list(const char *label, const ast_list *l, int depth, FILE *out);

static void ast_dump_node(const ast_node *n, int depth, FILE *out)
{
    if (!n)
        return;
    fprintf(out, "%*s%s @%d:%d", depth * 2, "", ast_kind_name(n->kind), n->span.line, n->span.col);
    switch (n->kind) {
    case AST_INT: fprintf(out, " %" PRId64, n->i); break;
    case AST_FLOAT: fprintf(out, " %.9g", n->f); break;
    case AST_BOOL: fprintf(out, " %s", n->i ? "true" : "false"); break;
    case AST_STRING: fprintf(out, " \"%s\"", n->name); break;
    case AST_BINOP: case AST_UNOP: fprintf(out, " %s", ast_op_name(n->op)); break;
    default:
        if (n->name)
            fprintf(out, " %s", n->name);
        break;
    }
    if (n->str)
        fprintf(out, " from \"%s\"", n->str);
    if (n->flags & AST_F_NOGRAD)
        fprintf(out, " nograd");
    if (n->flags & AST_F_SAVED)
        fprintf(out, " saved");
    fputc('\n', out);
    ast_dump_node(n->a, depth + 1, out);
    ast_dump_node(n->b, depth + 1, out);
    ast_dump_node(n->c, depth + 1, out);
    const char *l1 = NULL, *l2 = NULL, *l3 = NULL;
    switch (n->kind) {
    case AST_ASSIGN: l1 = "targets"; break;
    case AST_BLOCK: case AST_MODEL: l1 = "params"; l2 = "body"; break;
    case AST_IF: l1 = "then"; l2 = "else"; break;
    case AST_EXTERN_OP: l1 = "inputs"; l2 = "outputs"; l3 = "body"; break;
    case AST_TYPE: l1 = "dims"; break;
    default: break;
    }
    ast_dump_list(l1, &n->list, depth + 1, out);
    ast_dump_list(l2, &n->list2, depth + 1, out);
    ast_dump_list(l3, &n->list3, depth + 1, out);
}

static void ast_dump_list(const char *label, const ast_list *l, int depth, FILE *out)
{
    if (!l->n)
        return;
    if (label) {
        fprintf(out, "%*s%s:\n", depth * 2, "", label);
        depth++;
    }
    for (int i = 0; i < l->n; i++)
        ast_dump_node(l->items[i], depth, out);
}

void ast_dump(const ast_file *f, FILE *out)
{
    fprintf(out, "file %s\n", f->path);
    ast_dump_list(NULL, &f->decls, 1, out);
}
