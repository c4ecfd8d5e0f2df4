/* norm.c - RMSNorm and rotary position embedding. */
#include <math.h>

#include "kcpu.h"

void moek_rmsnorm_fwd(const moek_ctx *ctx, const float *x, const float *w, float *y, float *rstd,
                      int64_t N, int64_t D, float eps)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * D))
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * D;
        float *yr = y + n * D;
        double ss = 0.0; /* the statistic in double: cheap, and D can be large */
        for (int64_t d = 0; d < D; d++)
            ss += (double)xr[d] * xr[d];
        float r = (float)(1.0 / sqrt(ss / (double)(D > 0 ? D : 1) + (double)eps));
        rstd[n] = r;
        for (int64_t d = 0; d < D; d++)
            yr[d] = xr[d] * r * w[d];
    }
}

/* y_i = x_i r w_i, r = (mean x^2 + eps)^-1/2, dr/dx_j = -r^3 x_j / D:
 *   dx_j = r (w_j dy_j - x_j r^2 mean_i(dy_i w_i x_i)),  dw_i = sum_n dy x r.
 * dw is a column sum over rows: threads split the columns, so there is no
 * reduction between threads and the result does not depend on their count. */
void moek_rmsnorm_bwd(const moek_ctx *ctx, const float *dy, const float *x, const float *w,
                      const float *rstd, float *dx, float *dw, int64_t N, int64_t D)
{
    int team = kcpu_team(ctx, N * D);
    if (dx) {
#pragma omp parallel for schedule(static) num_threads(team)
        for (int64_t n = 0; n < N; n++) {
            const float *xr = x + n * D, *dyr = dy + n * D;
            float *dxr = dx + n * D;
            double r = rstd[n], dot = 0.0;
            for (int64_t d = 0; d < D; d++)
                dot += (double)dyr[d] * w[d] * xr[d];
            double c = r * r * dot / (double)(D > 0 ? D : 1);
            for (int64_t d = 0; d < D; d++)
                dxr[d] = (float)(r * ((double)w[d] * dyr[d] - xr[d] * c));
        }
    }
    if (dw) {
        enum { CH = 64 };
        int64_t nchunks = (D + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(team)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t d0 = c * CH, d1 = d0 + CH < D ? d0 + CH : D;
            double acc[CH] = {0};
            for (int64_t n = 0; n < N; n++) {
                const float *xr = x + n * D, *dyr = dy + n * D;
                double r = rstd[n];
                for (int64_t d = d0; d < d1; d++)
                    acc[d - d0] += (double)dyr[d] * xr[d] * r;
            }
            for (int64_t d = d0; d < d1; d++)
                dw[d] = (float)acc[d - d0];
        }
    }
}

/* Rotates each pair (2i, 2i+1) of every head by angle t * theta^(-2i/Dh),
 * t = position within the sequence; sign -1 rotates back (the backward of a
 * rotation is its transpose).  An odd Dh leaves the last element as is.
 * The angle depends only on (t, i): each position computes its cos/sin for
 * a chunk of pairs once and applies them to all B rows and H heads at that
 * position, so there are T * Dh/2 trig calls instead of B * T * Dh/2 (the
 * values, and so the results, are the same as computing them per row). */
static void kcpu_rope(const moek_ctx *ctx, const float *x, float *y, int64_t B, int64_t T,
                      int64_t H, int64_t Dh, float theta, double sign)
{
    enum { CH = 64 };
    int64_t half = Dh / 2, W = H * Dh;
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 4 * B * T * W))
    for (int64_t t = 0; t < T; t++) {
        double pos = (double)t;
        float cs[CH], sn[CH];
        for (int64_t i0 = 0; i0 < half; i0 += CH) {
            int64_t n = half - i0 < CH ? half - i0 : CH;
            for (int64_t i = 0; i < n; i++) {
                double ang = sign * pos * pow((double)theta, -2.0 * (double)(i0 + i) / (double)Dh);
                cs[i] = (float)cos(ang);
                sn[i] = (float)sin(ang);
            }
            for (int64_t b = 0; b < B; b++) {
                const float *xr = x + (b * T + t) * W;
                float *yr = y + (b * T + t) * W;
                for (int64_t h = 0; h < H; h++) {
                    const float *xp = xr + h * Dh + 2 * i0;
                    float *yp = yr + h * Dh + 2 * i0;
                    for (int64_t i = 0; i < n; i++) {
                        float a = xp[2 * i], c = xp[2 * i + 1]; /* read both first: x may be y */
                        yp[2 * i] = a * cs[i] - c * sn[i];
                        yp[2 * i + 1] = a * sn[i] + c * cs[i];
                    }
                }
            }
        }
        if (Dh % 2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t h = 0; h < H; h++)
                    y[(b * T + t) * W + h * Dh + Dh - 1] = x[(b * T + t) * W + h * Dh + Dh - 1];
    }
}

void moek_rope_fwd(const moek_ctx *ctx, const float *x, float *y,
                   int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kcpu_rope(ctx, x, y, B, T, H, Dh, theta, 1.0);
}

void moek_rope_bwd(const moek_ctx *ctx, const float *dy, float *dx,
                   int64_t B, int64_t T, int64_t H, int64_t Dh, float theta)
{
    kcpu_rope(ctx, dy, dx, B, T, H, Dh, theta, -1.0);
}
