/* parser.y - the whole .moe language.
 *
 *   file    := { import STRING | config {entries} | train {entries}
 *              | parallel {entries} | block NAME(sig) {stmts}
 *              | model NAME(sig) {stmts}
 *              | extern op NAME(sig) -> (sig) [from STRING] {entries | NAME {stmts}} }
 *   stmt    := targets = expr | call | param NAME: type = init {attr}
 *              | for NAME in expr..expr {stmts} | if expr {stmts} [else ...]
 *              | return expr {, expr}
 *
 * A pure parser with locations.  Errors recover at the statement and the
 * declaration level (the `error` rules), so one run reports several. */
%require "3.8"
%define api.pure full
%define parse.error custom
%define parse.lac full
%define api.location.type {diag_span}
%locations
%expect 0
%param {yyscan_t scanner}
%parse-param {parse_state *ps}

%code requires {
#include "ast.h"
#ifndef YY_TYPEDEF_YY_SCANNER_T
#define YY_TYPEDEF_YY_SCANNER_T
typedef void *yyscan_t;
#endif
typedef struct parse_state {
    ast_arena *arena;
    diag_ctx *d;
    const char *file;
    int line, col;
    ast_file *out;
} parse_state;
}

%code provides {
int yylex(YYSTYPE *yylval, YYLTYPE *yylloc, yyscan_t scanner);
}

%code {
#include <string.h>

#define YYLLOC_DEFAULT(Cur, Rhs, N)                                  \
    do {                                                             \
        if (N) {                                                     \
            (Cur) = YYRHSLOC(Rhs, 1);                                \
            (Cur).end_line = YYRHSLOC(Rhs, N).end_line;              \
            (Cur).end_col = YYRHSLOC(Rhs, N).end_col;                \
        } else {                                                     \
            (Cur) = YYRHSLOC(Rhs, 0);                                \
            (Cur).line = (Cur).end_line;                             \
            (Cur).col = (Cur).end_col + 1;                           \
        }                                                            \
    } while (0)

#define N(kind, loc) ast_new(ps->arena, (kind), (loc))

static ast_node *mk_bin(parse_state *ps, int op, ast_node *l, ast_node *r, diag_span at)
{
    ast_node *n = N(AST_BINOP, ast_join(l->span, r->span));
    (void)at;
    n->op = op;
    n->a = l;
    n->b = r;
    return n;
}
static void yyerror(YYLTYPE *loc, yyscan_t scanner, parse_state *ps, const char *msg)
{
    (void)scanner;
    diag_error(ps->d, *loc, NULL, "%s", msg);
}
static ast_node *mk_name(parse_state *ps, const char *s, diag_span at)
{
    ast_node *n = N(AST_NAME, at);
    n->name = s;
    return n;
}
}

%union {
    int64_t ival;
    double fval;
    const char *sval;
    ast_node *node;
    ast_list list;
    int flags;
}

%token IMPORT "import" CONFIG "config" BLOCK "block" EXTERN "extern" OP "op"
%token PARAM "param" MODEL "model" TRAIN "train" PARALLEL "parallel"
%token FOR "for" IN "in" IF "if" ELSE "else" RETURN "return" FROM "from"
%token AND "and" OR "or" NOT "not" NOGRAD "nograd" SAVED "saved"
%token EXPERT "expert" NODECAY "nodecay" FROZEN "frozen" ACTIVE "active"
%token DOTDOT ".." ARROW "->" EQ "==" NE "!=" LE "<=" GE ">=" IDIV "//"
%token <ival> INT "integer" BOOL "boolean"
%token <fval> FLOAT "number"
%token <sval> IDENT "name" STRING "string"

%type <node> decl stmt expr primary arg entry sigparam type dim pattr else_opt
%type <list> stmts entries op_entries sigparams sig_opt args args_opt dims targets exprs pattrs
%type <flags> sigflags
%type <sval> key

%left OR
%left AND
%precedence NOT
%nonassoc EQ NE '<' '>' LE GE
%left '+' '-'
%left '*' '/' IDIV '%'
%precedence NEG

%%

file:
    %empty
  | file decl               { ast_push(ps->arena, &ps->out->decls, $2); }
  ;

decl:
    IMPORT STRING           { $$ = N(AST_IMPORT, @$); $$->name = $2; }
  | CONFIG '{' entries '}'  { $$ = N(AST_CONFIG, @1); $$->list = $3; }
  | TRAIN '{' entries '}'   { $$ = N(AST_TRAIN, @1); $$->list = $3; }
  | PARALLEL '{' entries '}' { $$ = N(AST_PARALLEL, @1); $$->list = $3; }
  | BLOCK IDENT '(' sig_opt ')' '{' stmts '}'
                            { $$ = N(AST_BLOCK, @2); $$->name = $2; $$->list = $4; $$->list2 = $7; }
  | MODEL IDENT '(' sig_opt ')' '{' stmts '}'
                            { $$ = N(AST_MODEL, @2); $$->name = $2; $$->list = $4; $$->list2 = $7; }
  | EXTERN OP IDENT '(' sig_opt ')' ARROW '(' sig_opt ')' '{' op_entries '}'
                            { $$ = N(AST_EXTERN_OP, @3); $$->name = $3; $$->list = $5; $$->list2 = $9;
                              $$->list3 = $12; }
  | EXTERN OP IDENT '(' sig_opt ')' ARROW '(' sig_opt ')' FROM STRING '{' op_entries '}'
                            { $$ = N(AST_EXTERN_OP, @3); $$->name = $3; $$->list = $5; $$->list2 = $9;
                              $$->str = $12; $$->list3 = $14; }
  | error '}'               { $$ = NULL; yyerrok; }
  ;

entries:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | entries entry           { $$ = $1; ast_push(ps->arena, &$$, $2); }
  ;

/* an extern op's body also takes `name { stmts }`: `fuses { }`, the
 * pattern a fused op replaces (compiler/fuse.h); entry a = NULL, list = body */
op_entries:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | op_entries entry        { $$ = $1; ast_push(ps->arena, &$$, $2); }
  | op_entries IDENT '{' stmts '}'
                            { ast_node *e = N(AST_ENTRY, @2); e->name = $2; e->list = $4;
                              $$ = $1; ast_push(ps->arena, &$$, e); }
  ;

entry:
    key '=' expr            { $$ = N(AST_ENTRY, @1); $$->name = $1; $$->a = $3; }
  ;

/* keys may reuse the attribute keywords (parallel { expert = 4 }) */
key:
    IDENT                   { $$ = $1; }
  | EXPERT                  { $$ = "expert"; }
  | ACTIVE                  { $$ = "active"; }
  | FROZEN                  { $$ = "frozen"; }
  | NODECAY                 { $$ = "nodecay"; }
  ;

sig_opt:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | sigparams               { $$ = $1; }
  | sigparams ','           { $$ = $1; }
  ;

sigparams:
    sigparam                { memset(&$$, 0, sizeof $$); ast_push(ps->arena, &$$, $1); }
  | sigparams ',' sigparam  { $$ = $1; ast_push(ps->arena, &$$, $3); }
  ;

sigparam:
    IDENT                   { $$ = N(AST_SIGPARAM, @1); $$->name = $1; }
  | IDENT '=' expr          { $$ = N(AST_SIGPARAM, @1); $$->name = $1; $$->b = $3; }
  | IDENT ':' type sigflags { $$ = N(AST_SIGPARAM, @1); $$->name = $1; $$->a = $3; $$->flags = $4; }
  | IDENT ':' type sigflags '=' expr
                            { $$ = N(AST_SIGPARAM, @1); $$->name = $1; $$->a = $3; $$->flags = $4; $$->b = $6; }
  ;

sigflags:
    %empty                  { $$ = 0; }
  | sigflags NOGRAD         { $$ = $1 | AST_F_NOGRAD; }
  | sigflags SAVED          { $$ = $1 | AST_F_SAVED | AST_F_NOGRAD; }
  ;

type:
    IDENT                   { $$ = N(AST_TYPE, @1); $$->name = $1; }
  | IDENT '[' dims ']'      { $$ = N(AST_TYPE, @$); $$->name = $1; $$->list = $3; $$->flags = AST_F_HAS_TYPE; }
  ;

dims:
    dim                     { memset(&$$, 0, sizeof $$); ast_push(ps->arena, &$$, $1); }
  | dims ',' dim            { $$ = $1; ast_push(ps->arena, &$$, $3); }
  ;

dim:
    expr                    { $$ = N(AST_DIM, @1); $$->a = $1; }
  | '*' IDENT               { $$ = N(AST_DIM, @$); $$->name = $2; $$->flags = AST_F_STAR; }
  ;

stmts:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | stmts stmt              { $$ = $1; ast_push(ps->arena, &$$, $2); }
  ;

stmt:
    targets '=' expr        { $$ = N(AST_ASSIGN, @$); $$->list = $1; $$->a = $3; }
  | IDENT '(' args_opt ')'  { ast_node *c = N(AST_CALL, @$); c->name = $1; c->list = $3;
                              $$ = N(AST_EXPR_STMT, @$); $$->a = c; }
  | PARAM IDENT ':' type '=' expr pattrs
                            { $$ = N(AST_PARAM, @2); $$->name = $2; $$->a = $4; $$->b = $6; $$->list = $7; }
  | FOR IDENT IN expr DOTDOT expr '{' stmts '}'
                            { $$ = N(AST_FOR, @1); $$->name = $2; $$->a = $4; $$->b = $6; $$->list = $8; }
  | IF expr '{' stmts '}' else_opt
                            { $$ = N(AST_IF, @1); $$->a = $2; $$->list = $4;
                              if ($6) $$->list2 = $6->list; }
  | RETURN exprs            { $$ = N(AST_RETURN, @$); $$->list = $2; }
  | error                   { $$ = NULL; }
  ;

else_opt:
    %empty                  { $$ = NULL; }
  | ELSE '{' stmts '}'      { $$ = N(AST_IF, @1); $$->list = $3; }
  | ELSE stmt               { $$ = N(AST_IF, @1); memset(&$$->list, 0, sizeof $$->list);
                              if ($2 && $2->kind == AST_IF) ast_push(ps->arena, &$$->list, $2);
                              else if ($2) diag_error(ps->d, $2->span, "write `else { ... }` or `else if`",
                                                      "expected `{` or `if` after `else`"); }
  ;

targets:
    IDENT                   { memset(&$$, 0, sizeof $$); ast_push(ps->arena, &$$, mk_name(ps, $1, @1)); }
  | targets ',' IDENT       { $$ = $1; ast_push(ps->arena, &$$, mk_name(ps, $3, @3)); }
  ;

pattrs:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | pattrs pattr            { $$ = $1; ast_push(ps->arena, &$$, $2); }
  ;

pattr:
    EXPERT                  { $$ = N(AST_ATTR, @1); $$->name = "expert"; }
  | NODECAY                 { $$ = N(AST_ATTR, @1); $$->name = "nodecay"; }
  | FROZEN                  { $$ = N(AST_ATTR, @1); $$->name = "frozen"; }
  | ACTIVE '(' expr ')'     { $$ = N(AST_ATTR, @$); $$->name = "active"; $$->a = $3; }
  ;

exprs:
    expr                    { memset(&$$, 0, sizeof $$); ast_push(ps->arena, &$$, $1); }
  | exprs ',' expr          { $$ = $1; ast_push(ps->arena, &$$, $3); }
  ;

expr:
    primary
  | expr '+' expr           { $$ = mk_bin(ps, '+', $1, $3, @2); }
  | expr '-' expr           { $$ = mk_bin(ps, '-', $1, $3, @2); }
  | expr '*' expr           { $$ = mk_bin(ps, '*', $1, $3, @2); }
  | expr '/' expr           { $$ = mk_bin(ps, '/', $1, $3, @2); }
  | expr IDIV expr          { $$ = mk_bin(ps, AST_OP_IDIV, $1, $3, @2); }
  | expr '%' expr           { $$ = mk_bin(ps, '%', $1, $3, @2); }
  | expr EQ expr            { $$ = mk_bin(ps, AST_OP_EQ, $1, $3, @2); }
  | expr NE expr            { $$ = mk_bin(ps, AST_OP_NE, $1, $3, @2); }
  | expr '<' expr           { $$ = mk_bin(ps, '<', $1, $3, @2); }
  | expr '>' expr           { $$ = mk_bin(ps, '>', $1, $3, @2); }
  | expr LE expr            { $$ = mk_bin(ps, AST_OP_LE, $1, $3, @2); }
  | expr GE expr            { $$ = mk_bin(ps, AST_OP_GE, $1, $3, @2); }
  | expr AND expr           { $$ = mk_bin(ps, AST_OP_AND, $1, $3, @2); }
  | expr OR expr            { $$ = mk_bin(ps, AST_OP_OR, $1, $3, @2); }
  | '-' expr %prec NEG      { $$ = N(AST_UNOP, @$); $$->op = AST_OP_NEG; $$->a = $2; }
  | NOT expr                { $$ = N(AST_UNOP, @$); $$->op = AST_OP_NOT; $$->a = $2; }
  ;

primary:
    INT                     { $$ = N(AST_INT, @1); $$->i = $1; }
  | FLOAT                   { $$ = N(AST_FLOAT, @1); $$->f = $1; }
  | BOOL                    { $$ = N(AST_BOOL, @1); $$->i = $1; }
  | STRING                  { $$ = N(AST_STRING, @1); $$->name = $1; }
  | IDENT                   { $$ = mk_name(ps, $1, @1); }
  | IDENT '(' args_opt ')'  { $$ = N(AST_CALL, @$); $$->name = $1; $$->list = $3; }
  | '(' expr ')'            { $$ = $2; }
  | '(' expr ',' exprs ')'  { $$ = N(AST_TUPLE, @$); memset(&$$->list, 0, sizeof $$->list);
                              ast_push(ps->arena, &$$->list, $2);
                              for (int i = 0; i < $4.n; i++) ast_push(ps->arena, &$$->list, $4.items[i]); }
  ;

args_opt:
    %empty                  { memset(&$$, 0, sizeof $$); }
  | args                    { $$ = $1; }
  | args ','                { $$ = $1; }
  ;

args:
    arg                     { memset(&$$, 0, sizeof $$); ast_push(ps->arena, &$$, $1); }
  | args ',' arg            { $$ = $1; ast_push(ps->arena, &$$, $3); }
  ;

arg:
    expr                    { $$ = N(AST_ARG, @1); $$->a = $1; }
  | IDENT '=' expr          { $$ = N(AST_ARG, @$); $$->name = $1; $$->a = $3; }
  ;

%%

/* "expected `)` or `,`, got `name`": token names as the user writes them. */
static void tok_name(char *buf, size_t n, yysymbol_kind_t k)
{
    const char *s = yysymbol_name(k);
    if (k == YYSYMBOL_YYEOF) {
        snprintf(buf, n, "end of file");
        return;
    }
    size_t len = strlen(s);
    static const char *const classes[] = {"name", "integer", "number", "string", "boolean"};
    for (size_t i = 0; i < sizeof classes / sizeof *classes; i++)
        if (strcmp(s, classes[i]) == 0) {
            snprintf(buf, n, "%s", s);
            return;
        }
    if (len >= 2 && (s[0] == '"' || s[0] == '\'') && s[len - 1] == s[0])
        snprintf(buf, n, "`%.*s`", (int)(len - 2), s + 1);
    else
        snprintf(buf, n, "`%s`", s);
}

static int yyreport_syntax_error(const yypcontext_t *ctx, yyscan_t scanner, parse_state *ps)
{
    (void)scanner;
    enum { MAXEXP = 6 };
    yysymbol_kind_t exp[YYNTOKENS];
    int n = yypcontext_expected_tokens(ctx, exp, YYNTOKENS);
    char got[64], msg[512];
    yysymbol_kind_t la = yypcontext_token(ctx);
    tok_name(got, sizeof got, la);
    size_t off = 0;
    off += (size_t)snprintf(msg + off, sizeof msg - off, "syntax error: ");
    if (n > 0) {
        off += (size_t)snprintf(msg + off, sizeof msg - off, "expected ");
        int shown = n < MAXEXP ? n : MAXEXP - 1;
        for (int i = 0; i < shown && off < sizeof msg; i++) {
            char e[64];
            tok_name(e, sizeof e, exp[i]);
            off += (size_t)snprintf(msg + off, sizeof msg - off, "%s%s", i == 0 ? "" : (i == shown - 1 && n < MAXEXP ? " or " : ", "), e);
        }
        if (n >= MAXEXP && off < sizeof msg)
            off += (size_t)snprintf(msg + off, sizeof msg - off, ", ...");
        if (off < sizeof msg)
            snprintf(msg + off, sizeof msg - off, ", got %s", got);
    } else {
        snprintf(msg + off, sizeof msg - off, "unexpected %s", got);
    }
    const char *hint = NULL;
    if (la == YYSYMBOL_YYEOF)
        hint = "a `{` or `(` is probably not closed";
    else if (la == YYSYMBOL_EQ)
        hint = "`==` compares; `=` assigns, and only at the start of a statement";
    diag_error(ps->d, *yypcontext_location(ctx), hint, "%s", msg);
    return 0;
}
