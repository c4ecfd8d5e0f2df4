/* check.h - the assertions every C test uses.  A test program prints one
 * line per check: "PASS name", "FAIL name: why" or "SKIP name: why";
 * tests/run.sh counts them.  A program that dies without printing its lines
 * is counted as a failure by the runner. */
#ifndef MOEC_CHECK_H
#define MOEC_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static int check_failures;

#define CHECK(name, cond, ...)                                            \
    do {                                                                  \
        if (cond) {                                                       \
            printf("PASS %s\n", (name));                                  \
        } else {                                                          \
            printf("FAIL %s: ", (name));                                  \
            printf(__VA_ARGS__);                                          \
            printf(" (%s:%d)\n", __FILE__, __LINE__);                     \
            check_failures++;                                             \
        }                                                                 \
        fflush(stdout);                                                   \
    } while (0)

#define SKIP(name, ...)                                                   \
    do {                                                                  \
        printf("SKIP %s: ", (name));                                      \
        printf(__VA_ARGS__);                                              \
        printf("\n");                                                     \
        fflush(stdout);                                                   \
    } while (0)

/* |a - b| <= atol + rtol * |b| */
static inline int check_close(double a, double b, double atol, double rtol)
{
    return isfinite(a) && fabs(a - b) <= atol + rtol * fabs(b);
}

#define CHECK_DONE() return check_failures ? 1 : 0

#endif
