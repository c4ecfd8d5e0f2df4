/* myops.c - a user kernel library: the squared ReLU, y = max(x, 0)^2
 * (So et al., "Primer", 2021), which the standard library does not have.
 *
 * It follows kernels/moek.h: every kernel is void f(const moek_ctx *ctx, ...)
 * with only pointers, int64_t, float or double after ctx; kernels overwrite
 * their outputs, never allocate, print or exit.  fp32 storage and math.
 * Built by `make` into build/examples/libmyops.so; declared to the language
 * in myops.moe. */
#include <stdint.h>

#include "moek.h"

/* y[i] = relu(x[i])^2 */
void my_sqrelu_fwd(const moek_ctx *ctx, const float *x, float *y, int64_t n)
{
    (void)ctx; /* elementwise and cheap: one thread is enough here */
    for (int64_t i = 0; i < n; i++) {
        float r = x[i] > 0.0f ? x[i] : 0.0f;
        y[i] = r * r;
    }
}

/* dy/dx = 2 relu(x): continuous at 0, so the gradient there is 0 from both
 * sides and a finite-difference check needs no special case. */
void my_sqrelu_bwd(const moek_ctx *ctx, const float *dy, const float *x, float *dx, int64_t n)
{
    (void)ctx;
    for (int64_t i = 0; i < n; i++)
        dx[i] = x[i] > 0.0f ? 2.0f * x[i] * dy[i] : 0.0f;
}
