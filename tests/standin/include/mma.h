/* mma.h - WMMA (nvcuda::wmma) for the CUDA-language emulator (cuemu.h);
 * found before the toolkit's mma.h when the kernels are built for the CPU.
 *
 * A fragment's layout across lanes is unspecified by CUDA, so here every
 * lane holds the whole tile.  The calls keep what CUDA promises and no
 * more: all lanes of the warp take part (each call is a warp barrier),
 * a load reads memory as it is when the whole warp has arrived, a store
 * is written once (by the warp's lowest live lane) and visible to the
 * warp when the call returns, and mma_sync accumulates in fp32. */
#ifndef CUEMU_MMA_H
#define CUEMU_MMA_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../cuemu_rt.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

static inline float cuemu_widen(float v) { return v; }
static inline float cuemu_widen(__nv_bfloat16 v) { return __bfloat162float(v); }
static inline float cuemu_widen(__half v) { return __half2float(v); }

/* rows x cols of the logical tile: A is M x K, B is K x N, C is M x N */
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];
    T &at(int r, int c) { return x[r * cols + c]; }
    const T &at(int r, int c) const { return x[r * cols + c]; }
};

static inline void cuemu_warp_barrier() { cuemu_warp_exchange(0xffffffffu, 0, -1); }

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L> &f, const V &v)
{
    for (int i = 0; i < f.num_elements; i++)
        f.x[i] = (T)v;
}

template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const T *p, unsigned ldm)
{
    static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value,
                  "a matrix_a/matrix_b fragment names its layout");
    constexpr bool col = std::is_same<L, col_major>::value;
    cuemu_warp_barrier();
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.at(r, c) = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
    cuemu_warp_barrier();
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T, void> &f, const T *p, unsigned ldm,
                      layout_t lay)
{
    cuemu_warp_barrier();
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.at(r, c) = lay == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
    cuemu_warp_barrier();
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T, void> &f, unsigned ldm,
                       layout_t lay)
{
    cuemu_warp_barrier();
    if (cuemu_warp_leader())
        for (int r = 0; r < f.rows; r++)
            for (int c = 0; c < f.cols; c++)
                (lay == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) =
                    f.at(r, c);
    cuemu_warp_barrier();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC, void> &d,
              const fragment<matrix_a, M, N, K, TA, LA> &a,
              const fragment<matrix_b, M, N, K, TB, LB> &b,
              const fragment<accumulator, M, N, K, TC, void> &c)
{
    cuemu_warp_barrier();
    fragment<accumulator, M, N, K, TC, void> out;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = (float)c.at(i, j);
            for (int k = 0; k < K; k++)
                acc += cuemu_widen(a.at(i, k)) * cuemu_widen(b.at(k, j));
            out.at(i, j) = (TC)acc;
        }
    d = out;
    cuemu_warp_barrier();
}

} // namespace wmma
} // namespace nvcuda

#endif
