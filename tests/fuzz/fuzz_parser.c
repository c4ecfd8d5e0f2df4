/* fuzz_parser.c - libFuzzer harness for the front end: every input is a .moe
 * source, parsed and then elaborated (imports resolve against the stdlib) into
 * a forward ir_graph.  Any input may be rejected with diagnostics; none may
 * crash, leak, read out of bounds or hit undefined behaviour.
 *
 * Build (tests/fuzz/run.sh does this):
 *   clang -fsanitize=fuzzer,address,undefined -DFUZZ_STDLIB='"/abs/stdlib"' ...
 * The stdlib directory can be overridden at run time with $MOEC_FUZZ_STDLIB. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ast.h"
#include "diag.h"
#include "elaborate.h"
#include "ir.h"

#ifndef FUZZ_STDLIB
#define FUZZ_STDLIB "stdlib"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Diagnostics are formatted in full (that code must not crash either) but go
 * to /dev/null so a run does not flood the terminal.  Opened per input: the
 * harness keeps no state between inputs. */
static FILE *quiet_sink(void)
{
    FILE *f = fopen("/dev/null", "w");
    return f ? f : stderr;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the lexer gets exactly `size` bytes; a copy without slack lets ASan
     * catch any read past the end */
    char *text = malloc(size ? size : 1);
    if (!text)
        return 0;
    for (size_t i = 0; i < size; i++)
        text[i] = (char)data[i];
    FILE *sink = quiet_sink();

    /* 1. the parser alone, as `moec --dump=ast` runs it; dump the tree when
     * it parsed, so every node kind the parser builds is walked once */
    diag_ctx *d = diag_new(sink, 20);
    ast_arena *arena = ast_arena_new();
    if (d && arena) {
        ast_file *af = ast_parse(arena, d, "fuzz.moe", text, size);
        if (af && diag_count(d) == 0)
            ast_dump(af, sink);
    }
    ast_arena_free(arena);
    diag_free(d);

    /* 2. the whole front end: imports, blocks, loops, shapes */
    const char *stdlib_dir = getenv("MOEC_FUZZ_STDLIB");
    elab_options opt = {.stdlib_dir = stdlib_dir ? stdlib_dir : FUZZ_STDLIB,
                        .text = text, .text_len = size};
    d = diag_new(sink, 20);
    if (d) {
        ir_graph *g = elaborate("fuzz.moe", &opt, d);
        ir_graph_free(g);
        diag_free(d);
    }
    if (sink != stderr)
        fclose(sink);
    free(text);
    return 0;
}
