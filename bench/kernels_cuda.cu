/* kernels_cuda.cu - times the bf16 grouped expert product and attention of
 * one or more builds of libmoek_cuda.so on the same inputs, next to the two
 * floors of the device (bf16 GEMM rate through cuBLAS, device-to-device copy
 * bandwidth) and to cuBLAS on the same products.
 *
 *   nvcc -O2 -std=c++17 -arch=sm_90 -o kb bench/kernels_cuda.cu -lcublas -ldl
 *   ./kb path/to/libmoek_cuda.so [another/libmoek_cuda.so ...]
 *
 * Shapes: a GPT-2-small MoE layer (N = 8192 tokens, d_model 768, d_ff 2048,
 * 8 experts, top-2, so R = 16384 rows, with skewed routing), both the up
 * (K 768 -> M 2048) and the down (K 2048 -> M 768) product; attention with
 * B 8, T 1024, H 12, Dh 64, causal.  Each time is the median of REPS runs,
 * each between two CUDA events, after warm-up, rotating among NSET input
 * sets so no run reads what the one before left in L2.  Outputs of every
 * library after the first are compared with the first's (relative L2), and
 * the grouped products with cuBLAS run expert by expert. */
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

extern "C" {
#include "../kernels/moek.h"
}

#define NSET 3
#define REPS 30

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));    \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)
#define CB(x)                                                                              \
    do {                                                                                   \
        cublasStatus_t s_ = (x);                                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                 \
            fprintf(stderr, "%s:%d: cublas %d\n", __FILE__, __LINE__, (int)s_);            \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

typedef __nv_bfloat16 bf;

struct lib {
    const char *path;
    int (*init)(moek_ctx *, int64_t, int64_t, char *, int64_t);
    int (*sync)(const moek_ctx *, char *, int64_t);
    void (*gfwd)(const moek_ctx *, const moek_bf16 *, const moek_bf16 *, const int32_t *, moek_bf16 *,
                 int64_t, int64_t, int64_t, int64_t);
    void (*gbwd)(const moek_ctx *, const moek_bf16 *, const moek_bf16 *, const moek_bf16 *,
                 const int32_t *, moek_bf16 *, moek_bf16 *, int64_t, int64_t, int64_t, int64_t);
    void (*afwd)(const moek_ctx *, const moek_bf16 *, const moek_bf16 *, const moek_bf16 *,
                 moek_bf16 *, float *, int64_t, int64_t, int64_t, int64_t);
    void (*abwd)(const moek_ctx *, const moek_bf16 *, const moek_bf16 *, const moek_bf16 *,
                 const moek_bf16 *, const moek_bf16 *, const float *, moek_bf16 *, moek_bf16 *,
                 moek_bf16 *, int64_t, int64_t, int64_t, int64_t);
    int (*gbegin)(const moek_ctx *, char *, int64_t);
    int (*gend)(const moek_ctx *, void **, char *, int64_t);
    int (*glaunch)(const moek_ctx *, void *, char *, int64_t);
    moek_ctx ctx;
    int status;
};

static void *sym(void *h, const char *n)
{
    void *p = dlsym(h, n);
    if (!p) {
        fprintf(stderr, "missing %s\n", n);
        exit(1);
    }
    return p;
}

static void lib_open(lib *L, const char *path)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "%s\n", dlerror());
        exit(1);
    }
    L->path = path;
    *(void **)&L->init = sym(h, "moek_device_init");
    *(void **)&L->sync = sym(h, "moek_device_sync");
    *(void **)&L->gfwd = sym(h, "moek_grouped_matmul_fwd_bf16");
    *(void **)&L->gbwd = sym(h, "moek_grouped_matmul_bwd_bf16");
    *(void **)&L->afwd = sym(h, "moek_attention_fwd_bf16");
    *(void **)&L->abwd = sym(h, "moek_attention_bwd_bf16");
    *(void **)&L->gbegin = sym(h, "moek_graph_begin");
    *(void **)&L->gend = sym(h, "moek_graph_end");
    *(void **)&L->glaunch = sym(h, "moek_graph_launch");
    char err[256];
    memset(&L->ctx, 0, sizeof L->ctx);
    L->status = 0;
    if (L->init(&L->ctx, 0, 0, err, sizeof err) != 0) {
        fprintf(stderr, "%s: init: %s\n", path, err);
        exit(1);
    }
    L->ctx.status = &L->status;
}

static void lib_check(lib *L, const char *what)
{
    char err[256];
    if (L->sync(&L->ctx, err, sizeof err) != 0 || L->status != 0) {
        fprintf(stderr, "%s: %s failed (status %d): %s\n", L->path, what, L->status, err);
        exit(1);
    }
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static double urand()
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static bf *dev_rand(int64_t n, float lo, float hi)
{
    std::vector<bf> h((size_t)n);
    for (int64_t i = 0; i < n; i++)
        h[(size_t)i] = __float2bfloat16((float)(lo + (hi - lo) * urand()));
    bf *d;
    CK(cudaMalloc(&d, (size_t)n * sizeof(bf)));
    CK(cudaMemcpy(d, h.data(), (size_t)n * sizeof(bf), cudaMemcpyHostToDevice));
    return d;
}

static bf *dev_out(int64_t n)
{
    bf *d;
    CK(cudaMalloc(&d, (size_t)n * sizeof(bf)));
    CK(cudaMemset(d, 0xff, (size_t)n * sizeof(bf)));   /* NaN poison */
    return d;
}

static std::vector<float> host_of(const bf *d, int64_t n)
{
    std::vector<bf> h((size_t)n);
    CK(cudaMemcpy(h.data(), d, (size_t)n * sizeof(bf), cudaMemcpyDeviceToHost));
    std::vector<float> f((size_t)n);
    for (int64_t i = 0; i < n; i++)
        f[(size_t)i] = __bfloat162float(h[(size_t)i]);
    return f;
}

/* ||a - b|| / ||b||; NaN anywhere gives NaN */
static double rel(const std::vector<float> &a, const std::vector<float> &b)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* median ms of REPS runs of f(rep) on stream s, after 3 warm-up runs */
template <typename F> static double time_ms(cudaStream_t s, F f)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++)
        f(i);
    CK(cudaStreamSynchronize(s));
    std::vector<float> t;
    for (int i = 0; i < REPS; i++) {
        CK(cudaEventRecord(a, s));
        f(i);
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return t[t.size() / 2];
}

static double peak_tflops, peak_gbs;   /* measured ceilings */

static void row(const char *name, double ms, double flops, double bytes)
{
    double tf = flops / ms / 1e9, ffloor = flops / (peak_tflops * 1e9), bfloor = bytes / (peak_gbs * 1e6);
    double fl = ffloor > bfloor ? ffloor : bfloor;
    printf("%-44s %9.3f ms %8.1f TFLOP/s  floor %7.3f ms (%s)  %5.1fx floor\n", name, ms, tf, fl,
           ffloor > bfloor ? "flops" : "bytes", ms / fl);
}

/* row-major C[m,n] = A[m,k] . B^T (B [n,k]) via column-major: C^T = B . A^T */
static void gemm_abt(cublasHandle_t hb, const bf *A, const bf *B, bf *C, int m, int n, int k)
{
    const float one = 1, zero = 0;
    CB(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, B, CUDA_R_16BF, k, A, CUDA_R_16BF,
                    k, &zero, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
/* row-major C[m,n] = A[m,k] . B[k,n] */
static void gemm_ab(cublasHandle_t hb, const bf *A, const bf *B, bf *C, int m, int n, int k)
{
    const float one = 1, zero = 0;
    CB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, &one, B, CUDA_R_16BF, n, A, CUDA_R_16BF,
                    k, &zero, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
/* row-major C[m,n] = A^T . B, A [k,m], B [k,n] */
static void gemm_atb(cublasHandle_t hb, const bf *A, const bf *B, bf *C, int m, int n, int k)
{
    const float one = 1, zero = 0;
    CB(cublasGemmEx(hb, CUBLAS_OP_N, CUBLAS_OP_T, n, m, k, &one, B, CUDA_R_16BF, n, A, CUDA_R_16BF,
                    m, &zero, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static void ceilings(cublasHandle_t hb, cudaStream_t s)
{
    const int n = 8192;
    bf *a = dev_rand((int64_t)n * n, -1, 1), *b = dev_rand((int64_t)n * n, -1, 1), *c = dev_out((int64_t)n * n);
    double ms = time_ms(s, [&](int) { gemm_ab(hb, a, b, c, n, n, n); });
    peak_tflops = 2.0 * n * n * (double)n / ms / 1e9;
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
    size_t bytes = (size_t)1 << 30;
    void *x, *y;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMalloc(&y, bytes));
    CK(cudaMemset(x, 1, bytes));
    ms = time_ms(s, [&](int) { CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, s)); });
    peak_gbs = 2.0 * bytes / ms / 1e6;
    CK(cudaFree(x));
    CK(cudaFree(y));
    printf("ceilings: cuBLAS bf16 8192^3 %.1f TFLOP/s; D2D copy %.0f GB/s (read + write)\n",
           peak_tflops, peak_gbs);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s libmoek_cuda.so [more.so ...]\n", argv[0]);
        return 2;
    }
    int nl = argc - 1;
    std::vector<lib> libs((size_t)nl);
    for (int i = 0; i < nl; i++)
        lib_open(&libs[(size_t)i], argv[i + 1]);
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasHandle_t hb;
    CB(cublasCreate(&hb));
    CB(cublasSetStream(hb, s));
    ceilings(hb, s);

    /* ---- routing: 8192 tokens, top-2 of 8 experts, skewed (p_e ~ 1/(e+1)) */
    const int64_t N = 8192, E = 8, R = 2 * N, DM = 768, DF = 2048;
    std::vector<int64_t> cnt((size_t)E, 0);
    {
        double w[8], tot = 0;
        for (int e = 0; e < E; e++)
            tot += w[e] = 1.0 / (e + 1);
        for (int64_t n = 0; n < N; n++) {
            int first = -1;
            for (int j = 0; j < 2; j++) {
                int e;
                do {
                    double u = urand() * tot;
                    for (e = 0; e < E - 1 && u >= w[e]; e++)
                        u -= w[e];
                } while (e == first);
                first = e;
                cnt[(size_t)e]++;
            }
        }
    }
    std::vector<int32_t> er_h((size_t)(2 * E));
    int64_t off = 0;
    printf("expert rows:");
    for (int64_t e = 0; e < E; e++) {
        er_h[(size_t)(2 * e)] = (int32_t)off;
        er_h[(size_t)(2 * e + 1)] = (int32_t)cnt[(size_t)e];
        off += cnt[(size_t)e];
        printf(" %lld", (long long)cnt[(size_t)e]);
    }
    printf(" (R = %lld)\n", (long long)off);
    int32_t *er;
    CK(cudaMalloc(&er, sizeof(int32_t) * er_h.size()));
    CK(cudaMemcpy(er, er_h.data(), sizeof(int32_t) * er_h.size(), cudaMemcpyHostToDevice));

    printf("\n%-44s %12s %16s\n", "grouped GEMM (bf16)", "median", "achieved");
    for (int shape = 0; shape < 2; shape++) {
        int64_t K = shape == 0 ? DM : DF, M = shape == 0 ? DF : DM;
        const char *sn = shape == 0 ? "up K768->M2048" : "down K2048->M768";
        bf *xs[NSET], *w[NSET], *dys[NSET];
        for (int i = 0; i < NSET; i++) {
            xs[i] = dev_rand(R * K, -1, 1);
            w[i] = dev_rand(E * M * K, -0.05f, 0.05f);
            dys[i] = dev_rand(R * M, -1, 1);
        }
        bf *ys = dev_out(R * M), *dxs = dev_out(R * K), *dw = dev_out(E * M * K);
        double fl = 2.0 * R * K * M;
        double by = 2.0 * (R * K + E * M * K + R * M);
        char name[96];
        /* cuBLAS references: the same work as one dense GEMM, and expert by expert */
        snprintf(name, sizeof name, "%s cuBLAS dense RxKxM", sn);
        row(name, time_ms(s, [&](int i) { gemm_abt(hb, xs[i % NSET], w[i % NSET], ys, (int)R, (int)M, (int)K); }), fl, by);
        auto ref_fwd = [&](int i) {
            for (int64_t e = 0; e < E; e++)
                if (cnt[(size_t)e])
                    gemm_abt(hb, xs[i] + er_h[(size_t)(2 * e)] * K, w[i] + e * M * K,
                             ys + er_h[(size_t)(2 * e)] * M, (int)cnt[(size_t)e], (int)M, (int)K);
        };
        auto ref_dx = [&](int i) {
            for (int64_t e = 0; e < E; e++)
                if (cnt[(size_t)e])
                    gemm_ab(hb, dys[i] + er_h[(size_t)(2 * e)] * M, w[i] + e * M * K,
                            dxs + er_h[(size_t)(2 * e)] * K, (int)cnt[(size_t)e], (int)K, (int)M);
        };
        auto ref_dw = [&](int i) {
            for (int64_t e = 0; e < E; e++)
                if (cnt[(size_t)e])
                    gemm_atb(hb, dys[i] + er_h[(size_t)(2 * e)] * M, xs[i] + er_h[(size_t)(2 * e)] * K,
                             dw + e * M * K, (int)M, (int)K, (int)cnt[(size_t)e]);
        };
        snprintf(name, sizeof name, "%s cuBLAS per expert fwd", sn);
        row(name, time_ms(s, [&](int i) { ref_fwd(i % NSET); }), fl, by);
        snprintf(name, sizeof name, "%s cuBLAS per expert dxs", sn);
        row(name, time_ms(s, [&](int i) { ref_dx(i % NSET); }), fl, by);
        snprintf(name, sizeof name, "%s cuBLAS per expert dw", sn);
        row(name, time_ms(s, [&](int i) { ref_dw(i % NSET); }), fl, by);
        ref_fwd(0);
        ref_dx(0);
        ref_dw(0);
        CK(cudaStreamSynchronize(s));
        std::vector<float> rys = host_of(ys, R * M), rdx = host_of(dxs, R * K), rdw = host_of(dw, E * M * K);
        for (int l = 0; l < nl; l++) {
            lib *L = &libs[(size_t)l];
            const moek_ctx *c = &L->ctx;
            cudaStream_t ls = (cudaStream_t)c->stream;
            double t;
            t = time_ms(ls, [&](int i) {
                L->gfwd(c, (moek_bf16 *)xs[i % NSET], (moek_bf16 *)w[i % NSET], er, (moek_bf16 *)ys, R, K, M, E);
            });
            snprintf(name, sizeof name, "%s lib%d fwd", sn, l);
            row(name, t, fl, by);
            t = time_ms(ls, [&](int i) {
                L->gbwd(c, (moek_bf16 *)dys[i % NSET], (moek_bf16 *)xs[i % NSET], (moek_bf16 *)w[i % NSET], er,
                        (moek_bf16 *)dxs, nullptr, R, K, M, E);
            });
            snprintf(name, sizeof name, "%s lib%d bwd dxs", sn, l);
            row(name, t, fl, by);
            t = time_ms(ls, [&](int i) {
                L->gbwd(c, (moek_bf16 *)dys[i % NSET], (moek_bf16 *)xs[i % NSET], (moek_bf16 *)w[i % NSET], er,
                        nullptr, (moek_bf16 *)dw, R, K, M, E);
            });
            snprintf(name, sizeof name, "%s lib%d bwd dw", sn, l);
            row(name, t, fl, by);
            lib_check(L, "grouped timing");
            /* correctness on set 0, outputs poisoned first */
            CK(cudaMemset(ys, 0xff, R * M * 2));
            CK(cudaMemset(dxs, 0xff, R * K * 2));
            CK(cudaMemset(dw, 0xff, E * M * K * 2));
            L->gfwd(c, (moek_bf16 *)xs[0], (moek_bf16 *)w[0], er, (moek_bf16 *)ys, R, K, M, E);
            L->gbwd(c, (moek_bf16 *)dys[0], (moek_bf16 *)xs[0], (moek_bf16 *)w[0], er, (moek_bf16 *)dxs,
                    (moek_bf16 *)dw, R, K, M, E);
            lib_check(L, "grouped check");
            std::vector<float> gys = host_of(ys, R * M), gdx = host_of(dxs, R * K), gdw = host_of(dw, E * M * K);
            printf("  lib%d vs cuBLAS per expert: ys %.2e  dxs %.2e  dw %.2e\n", l, rel(gys, rys),
                   rel(gdx, rdx), rel(gdw, rdw));
            /* the same calls captured as a CUDA graph must replay bit for bit */
            char err[256];
            void *g = nullptr;
            if (L->gbegin(c, err, sizeof err) != 0) {
                fprintf(stderr, "graph_begin: %s\n", err);
                exit(1);
            }
            L->gfwd(c, (moek_bf16 *)xs[0], (moek_bf16 *)w[0], er, (moek_bf16 *)ys, R, K, M, E);
            L->gbwd(c, (moek_bf16 *)dys[0], (moek_bf16 *)xs[0], (moek_bf16 *)w[0], er, (moek_bf16 *)dxs,
                    (moek_bf16 *)dw, R, K, M, E);
            if (L->gend(c, &g, err, sizeof err) != 0) {
                fprintf(stderr, "graph_end: %s\n", err);
                exit(1);
            }
            CK(cudaMemset(ys, 0xff, R * M * 2));
            CK(cudaMemset(dxs, 0xff, R * K * 2));
            CK(cudaMemset(dw, 0xff, E * M * K * 2));
            if (L->glaunch(c, g, err, sizeof err) != 0) {
                fprintf(stderr, "graph_launch: %s\n", err);
                exit(1);
            }
            lib_check(L, "grouped graph");
            printf("  lib%d graph replay == eager: %s\n", l,
                   host_of(ys, R * M) == gys && host_of(dxs, R * K) == gdx && host_of(dw, E * M * K) == gdw
                       ? "yes" : "NO");
        }
        for (int i = 0; i < NSET; i++) {
            CK(cudaFree(xs[i]));
            CK(cudaFree(w[i]));
            CK(cudaFree(dys[i]));
        }
        CK(cudaFree(ys));
        CK(cudaFree(dxs));
        CK(cudaFree(dw));
    }

    /* ---- attention */
    const int64_t B = 8, T = 1024, H = 12, Dh = 64, n = B * T * H * Dh;
    printf("\n%-44s %12s %16s\n", "attention (bf16, causal, B8 T1024 H12 Dh64)", "median", "achieved");
    bf *q[NSET], *k[NSET], *v[NSET], *dout[NSET];
    for (int i = 0; i < NSET; i++) {
        q[i] = dev_rand(n, -1, 1);
        k[i] = dev_rand(n, -1, 1);
        v[i] = dev_rand(n, -1, 1);
        dout[i] = dev_rand(n, -1, 1);
    }
    bf *o = dev_out(n), *dq = dev_out(n), *dk = dev_out(n), *dv = dev_out(n);
    float *lse;
    CK(cudaMalloc(&lse, sizeof(float) * B * H * T));
    double pairs = (double)B * H * T * (T + 1) / 2;
    double ffl = 4.0 * Dh * pairs, bfl = 10.0 * Dh * pairs;
    double fby = 2.0 * 4 * n + 4.0 * B * H * T, bby = 2.0 * 8 * n + 4.0 * B * H * T;
    std::vector<float> o0, dq0, dk0, dv0;
    for (int l = 0; l < nl; l++) {
        lib *L = &libs[(size_t)l];
        const moek_ctx *c = &L->ctx;
        cudaStream_t ls = (cudaStream_t)c->stream;
        char name[96];
        double t = time_ms(ls, [&](int i) {
            int j = i % NSET;
            L->afwd(c, (moek_bf16 *)q[j], (moek_bf16 *)k[j], (moek_bf16 *)v[j], (moek_bf16 *)o, lse, B, T, H, Dh);
        });
        snprintf(name, sizeof name, "attention lib%d fwd", l);
        row(name, t, ffl, fby);
        /* o and lse of set 0 feed the backward */
        CK(cudaMemset(o, 0xff, n * 2));
        L->afwd(c, (moek_bf16 *)q[0], (moek_bf16 *)k[0], (moek_bf16 *)v[0], (moek_bf16 *)o, lse, B, T, H, Dh);
        lib_check(L, "attention fwd");
        std::vector<float> oh = host_of(o, n);
        t = time_ms(ls, [&](int i) {
            (void)i;
            L->abwd(c, (moek_bf16 *)dout[0], (moek_bf16 *)q[0], (moek_bf16 *)k[0], (moek_bf16 *)v[0],
                    (moek_bf16 *)o, lse, (moek_bf16 *)dq, (moek_bf16 *)dk, (moek_bf16 *)dv, B, T, H, Dh);
        });
        snprintf(name, sizeof name, "attention lib%d bwd", l);
        row(name, t, bfl, bby);
        lib_check(L, "attention bwd");
        std::vector<float> dqh = host_of(dq, n), dkh = host_of(dk, n), dvh = host_of(dv, n);
        if (l == 0) {
            o0 = oh;
            dq0 = dqh;
            dk0 = dkh;
            dv0 = dvh;
        } else {
            printf("  lib%d vs lib0: o %.2e  dq %.2e  dk %.2e  dv %.2e\n", l, rel(oh, o0), rel(dqh, dq0),
                   rel(dkh, dk0), rel(dvh, dv0));
        }
    }
    printf("\nlegend: lib0 = %s", libs[0].path);
    for (int l = 1; l < nl; l++)
        printf(", lib%d = %s", l, libs[(size_t)l].path);
    printf("\n");
    return 0;
}
