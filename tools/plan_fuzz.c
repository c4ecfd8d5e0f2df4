/* plan_fuzz.c - libFuzzer harness for the plan reader: any input must be
 * rejected with a message or accepted and then be safe to print in full.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iruntime \
 *         tools/plan_fuzz.c runtime/plan_load.c runtime/inspect.c -lm -o plan_fuzz
 *   ./plan_fuzz -max_total_time=60 CORPUS_DIR
 *
 * The checksum would stop nearly every mutation at the first check, so the
 * harness reseals it when the input's first byte is odd: half the inputs
 * then reach the structural checks behind it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "inspect.h"
#include "plan_load.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    static FILE *devnull;
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    uint8_t *buf = aligned_alloc(8, (n + 8) / 8 * 8);
    if (!buf)
        return 0;
    memcpy(buf, data, n);
    if (n >= sizeof(plan_header) && (buf[n - 1] & 1)) {
        plan_header h;
        memcpy(&h, buf, sizeof h);
        h.checksum = plan_fnv1a(buf + sizeof h, n - sizeof h, PLAN_FNV_OFFSET);
        memcpy(buf, &h, sizeof h);
    }
    plan_file pf;
    char err[1024];
    if (plan_parse(buf, n, &pf, err, sizeof err) == 0)
        inspect_plan(&pf, devnull);
    else if (!err[0] || strchr(err, '\n'))
        abort();   /* every rejection is one non-empty line */
    free(buf);
    return 0;
}
