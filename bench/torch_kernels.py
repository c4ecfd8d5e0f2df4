"""PyTorch twins of bench/kernels_cuda.cu's shapes, for comparison on the same
GPU: a loop of bf16 matmuls per expert (forward, dxs, dw) with the same skewed
routing sizes, and scaled_dot_product_attention (causal, bf16) forward and
forward+backward.  Median of 30 CUDA-event timings after warm-up.

    python3 bench/torch_kernels.py 2742 2018 ...   # the 8 expert row counts
"""
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    counts = [int(c) for c in sys.argv[1:]] or [2048] * 8
    dev = "cuda"
    R = sum(counts)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for K, M, sn in ((768, 2048, "up K768->M2048"), (2048, 768, "down K2048->M768")):
        xs = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(len(counts), M, K, device=dev, dtype=torch.bfloat16) * 0.05
        dys = torch.randn(R, M, device=dev, dtype=torch.bfloat16)
        xsp = list(torch.split(xs, counts))
        dysp = list(torch.split(dys, counts))
        fl = 2.0 * R * K * M

        def fwd():
            return [x @ w[e].t() for e, x in enumerate(xsp)]

        def dx():
            return [d @ w[e] for e, d in enumerate(dysp)]

        def dw():
            return [d.t() @ x for d, x in zip(dysp, xsp)]

        for name, fn in (("fwd", fwd), ("dxs", dx), ("dw", dw)):
            ms = median_ms(fn)
            print(f"{sn} torch per-expert {name:4s} {ms:8.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s")
    B, T, H, Dh = 8, 1024, 12, 64
    q, k, v = (torch.randn(B, H, T, Dh, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, H, T, Dh, device=dev, dtype=torch.bfloat16)
    pairs = B * H * T * (T + 1) / 2
    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"attention torch sdpa fwd      {ms:8.3f} ms {4 * Dh * pairs / ms / 1e9:7.1f} TFLOP/s")

    def fb():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    ms2 = median_ms(fb)
    print(f"attention torch sdpa fwd+bwd  {ms2:8.3f} ms (bwd alone ~{ms2 - ms:.3f} ms, "
          f"{10 * Dh * pairs / (ms2 - ms) / 1e9:.1f} TFLOP/s)")


if __name__ == "__main__":
    main()
