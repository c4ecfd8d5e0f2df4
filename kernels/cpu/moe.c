/* moe.c - dispatch (tokens stably sorted into per-expert row blocks) and
 * combine (expert rows scattered back, weighted by the gates).
 * The expert matrices themselves run in matmul.c (grouped matmul). */
#include "kcpu.h"

/* Slot order: for each expert, its (token t, choice j) slots in t then j
 * order -- a stable sort by expert -- which is also the drop order under a
 * capacity: the first C slots of an expert in token order are kept.
 * expert_rows doubles as the counting scratch: [2e+1] first counts slots,
 * then is reset and counts them again while they are placed. */
void moek_dispatch_fwd(const moek_ctx *ctx, const float *x, const int32_t *idx, float *xs,
                       int32_t *slot_row, int32_t *expert_rows,
                       int64_t N, int64_t D, int64_t E, int64_t k, int64_t C)
{
    if (C < 0) {
        kcpu_fail(ctx, MOEK_E_SHAPE);
        return;
    }
    int64_t R = C > 0 ? E * C : N * k;
    for (int64_t e = 0; e < E; e++)
        expert_rows[2 * e + 1] = 0;
    for (int64_t s = 0; s < N * k; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E)
            kcpu_fail(ctx, MOEK_E_INDEX);
        else
            expert_rows[2 * e + 1]++;
    }
    int64_t next = 0;
    for (int64_t e = 0; e < E; e++) {
        expert_rows[2 * e] = (int32_t)(C > 0 ? e * C : next);
        next += expert_rows[2 * e + 1];
        expert_rows[2 * e + 1] = 0;
    }
    for (int64_t s = 0; s < N * k; s++) {
        int64_t e = idx[s];
        if (e < 0 || e >= E || (C > 0 && expert_rows[2 * e + 1] >= C)) {
            slot_row[s] = -1; /* bad id or over capacity: dropped */
            continue;
        }
        slot_row[s] = expert_rows[2 * e] + expert_rows[2 * e + 1]++;
    }
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * k * D))
    for (int64_t s = 0; s < N * k; s++)
        if (slot_row[s] >= 0)
            memcpy(xs + (int64_t)slot_row[s] * D, x + (s / k) * D, (size_t)D * sizeof *xs);
    /* zero the rows no slot filled: capacity slack, or rows a bad id left */
    for (int64_t e = 0; e < E; e++) {
        int64_t used_end = (int64_t)expert_rows[2 * e] + expert_rows[2 * e + 1];
        int64_t blk_end = C > 0 ? (e + 1) * C : (e + 1 < E ? expert_rows[2 * e + 2] : used_end);
        if (blk_end > used_end)
            memset(xs + used_end * D, 0, (size_t)((blk_end - used_end) * D) * sizeof *xs);
    }
    if (C == 0 && next < R)
        memset(xs + next * D, 0, (size_t)((R - next) * D) * sizeof *xs);
}

/* dx[t] = sum_j dxs[slot_row[t,j]] over the slots that were kept */
void moek_dispatch_bwd(const moek_ctx *ctx, const float *dxs, const int32_t *slot_row, float *dx,
                       int64_t N, int64_t D, int64_t k, int64_t R)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * k * D))
    for (int64_t t = 0; t < N; t++) {
        float *d = dx + t * D;
        memset(d, 0, (size_t)D * sizeof *d);
        for (int64_t j = 0; j < k; j++) {
            int64_t r = slot_row[t * k + j];
            if (r < 0)
                continue;
            if (r >= R) {
                kcpu_fail(ctx, MOEK_E_INDEX);
                continue;
            }
            const float *src = dxs + r * D;
            for (int64_t i = 0; i < D; i++)
                d[i] += src[i];
        }
    }
}

/* out[t] = sum_j gates[t,j] ys[slot_row[t,j]]; a dropped slot adds nothing,
 * so a token every choice of which was dropped gets 0 (the residual carries it). */
void moek_combine_fwd(const moek_ctx *ctx, const float *ys, const int32_t *slot_row,
                      const float *gates, float *out, int64_t N, int64_t D, int64_t k, int64_t R)
{
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, N * k * D))
    for (int64_t t = 0; t < N; t++) {
        float *o = out + t * D;
        memset(o, 0, (size_t)D * sizeof *o);
        for (int64_t j = 0; j < k; j++) {
            int64_t r = slot_row[t * k + j];
            if (r < 0)
                continue;
            if (r >= R) {
                kcpu_fail(ctx, MOEK_E_INDEX);
                continue;
            }
            float g = gates[t * k + j];
            const float *y = ys + r * D;
            for (int64_t i = 0; i < D; i++)
                o[i] += g * y[i];
        }
    }
}

/* dys[slot_row[t,j]] = gates[t,j] dout[t] (rows no slot uses: 0);
 * dgates[t,j] = dout[t] . ys[slot_row[t,j]] (dropped: 0).  Dispatch gives
 * each row to at most one slot, so threads over tokens never share a row. */
void moek_combine_bwd(const moek_ctx *ctx, const float *dout, const float *ys,
                      const int32_t *slot_row, const float *gates, float *dys, float *dgates,
                      int64_t N, int64_t D, int64_t k, int64_t R)
{
    if (dys && R * D > 0)
        memset(dys, 0, (size_t)(R * D) * sizeof *dys);
#pragma omp parallel for schedule(static) num_threads(kcpu_team(ctx, 2 * N * k * D))
    for (int64_t t = 0; t < N; t++) {
        const float *d = dout + t * D;
        for (int64_t j = 0; j < k; j++) {
            int64_t s = t * k + j, r = slot_row[s];
            if (r < 0 || r >= R) {
                if (r >= R)
                    kcpu_fail(ctx, MOEK_E_INDEX);
                if (dgates)
                    dgates[s] = 0.0f;
                continue;
            }
            const float *y = ys + r * D;
            if (dgates) {
                double acc = 0.0;
                for (int64_t i = 0; i < D; i++)
                    acc += (double)d[i] * y[i];
                dgates[s] = (float)acc;
            }
            if (dys) {
                float g = gates[s];
                float *dy = dys + r * D;
                for (int64_t i = 0; i < D; i++)
                    dy[i] = g * d[i];
            }
        }
    }
}
