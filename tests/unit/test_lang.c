/* test_lang.c - lexer, parser and diagnostics of the .moe front end. */
#include <string.h>

#include "ast.h"
#include "check.h"
#include "diag.h"

static ast_file *parse(ast_arena *a, diag_ctx *d, const char *src)
{
    return ast_parse(a, d, "t.moe", src, strlen(src));
}

int main(void)
{
    ast_arena *a = ast_arena_new();
    FILE *sink = tmpfile();
    diag_ctx *d = diag_new(sink, 20);

    ast_file *f = parse(a, d, "# c\nconfig { n = 1_000 lr = 3e-4 s = \"x\" b = true }\n");
    CHECK("parse_config_ok", diag_count(d) == 0 && f->decls.n == 1, "%d errors", diag_count(d));
    const ast_node *c = f->decls.items[0];
    CHECK("int_underscores", c->list.items[0]->a->kind == AST_INT && c->list.items[0]->a->i == 1000, "%lld",
          (long long)c->list.items[0]->a->i);
    CHECK("float_exponent", c->list.items[1]->a->kind == AST_FLOAT && c->list.items[1]->a->f == 3e-4, "%g",
          c->list.items[1]->a->f);
    CHECK("string_literal", strcmp(c->list.items[2]->a->name, "x") == 0, "%s", c->list.items[2]->a->name);
    CHECK("bool_literal", c->list.items[3]->a->kind == AST_BOOL && c->list.items[3]->a->i == 1, "kind %d",
          c->list.items[3]->a->kind);
    CHECK("span_line_col", c->list.items[1]->span.line == 2 && c->list.items[1]->span.col == 20 &&
          c->list.items[1]->span.end_col == 21, "%d:%d-%d", c->list.items[1]->span.line, c->list.items[1]->span.col,
          c->list.items[1]->span.end_col);

    f = parse(a, d, "block b(x: f32[*N, D], k = 2) { a, c = f(x, k = k)\n for i in 0..4 { x = x + 1 * 2 }\n"
                    " if k > 1 { return x } else { return c } }\n");
    CHECK("parse_block_ok", diag_count(d) == 0, "%d errors", diag_count(d));
    const ast_node *b = f->decls.items[0];
    CHECK("block_shape", b->kind == AST_BLOCK && b->list.n == 2 && b->list2.n == 3, "params %d body %d", b->list.n,
          b->list2.n);
    CHECK("star_dim", b->list.items[0]->a->list.items[0]->flags & AST_F_STAR, "flags %d",
          b->list.items[0]->a->list.items[0]->flags);
    CHECK("tuple_assign", b->list2.items[0]->kind == AST_ASSIGN && b->list2.items[0]->list.n == 2, "n %d",
          b->list2.items[0]->list.n);
    const ast_node *sum = b->list2.items[1]->list.items[0]->a;
    CHECK("precedence", sum->kind == AST_BINOP && sum->op == '+' && sum->b->op == '*', "op %d", sum->op);

    /* recovery: two independent syntax errors in one run */
    diag_ctx *d2 = diag_new(sink, 20);
    parse(a, d2, "block a(x) { y = (x +\n return y }\nblock b(x) { z = x )\n return z }\n");
    CHECK("recovers_two_errors", diag_count(d2) == 2, "%d errors", diag_count(d2));
    diag_free(d2);

    /* the printed form: location, source line, underline, hint */
    FILE *mem = tmpfile();
    diag_ctx *d3 = diag_new(mem, 20);
    diag_add_source(d3, "m.moe", "abc\n  hello world\n", 18);
    diag_span sp = {"m.moe", 2, 3, 2, 7};
    diag_error(d3, sp, "try `help`", "bad %s", "thing");
    rewind(mem);
    char buf[512] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, mem);
    buf[n] = 0;
    const char *want = "m.moe:2:3: error: bad thing\n    2 |   hello world\n      |   ^~~~~\n  hint: try `help`\n";
    CHECK("diag_format", strcmp(buf, want) == 0, "got [%s]", buf);
    diag_free(d3);
    fclose(mem);

    /* error cap */
    FILE *mem2 = tmpfile();
    diag_ctx *d4 = diag_new(mem2, 3);
    for (int i = 0; i < 10; i++)
        diag_error(d4, sp, NULL, "e%d", i);
    CHECK("error_cap_full", diag_full(d4) && diag_count(d4) == 10, "count %d", diag_count(d4));
    diag_free(d4);
    fclose(mem2);

    CHECK("edit_distance", diag_edit_distance("d_modle", "d_model") == 2 && diag_edit_distance("", "abc") == 3,
          "%d", diag_edit_distance("d_modle", "d_model"));
    const char *cands[] = {"embedding", "linear", "rmsnorm"};
    CHECK("closest", diag_closest("embeding", cands, 3) && strcmp(diag_closest("embeding", cands, 3), "embedding") == 0,
          "none");
    CHECK("closest_none", diag_closest("qqqqqq", cands, 3) == NULL, "found one");

    /* hostile input never crashes: NUL bytes, unterminated things */
    diag_ctx *d5 = diag_new(sink, 20);
    const char bad[] = "block \0 x( { \"abc\n ]]] model";
    ast_parse(a, d5, "bad.moe", bad, sizeof bad - 1);
    CHECK("hostile_input_reports", diag_count(d5) > 0, "no errors");
    diag_free(d5);

    diag_free(d);
    fclose(sink);
    ast_arena_free(a);
    CHECK_DONE();
}
