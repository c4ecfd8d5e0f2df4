"""PyTorch fp32 twin of bench/gpu_train.sh's big_moe, for an honest speed
comparison on the same GPU: same shapes (d_model 512, 8 layers, 8 heads,
8 experts top-2 with d_ff 1024 SwiGLU experts, seq 256, batch 16, vocab 256),
pre-norm RMSNorm, RoPE, causal attention, softmax router with renormalised
top-k gates and the Switch balance loss, AdamW, global-norm clip 1.0.  TF32
is off, as in moec's fp32 kernels.  The MoE is the usual hand-written eager
loop over experts (token gather per expert).  Not a test.

usage: python3 bench/torch_train.py [--steps N] [--compile]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--compile", action="store_true", help="also wrap the model in torch.compile")
a = p.parse_args()
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(1)
V, D, H, L, T, B, E, K, FF = 256, 512, 8, 8, 256, 16, 8, 2, 1024
dev = "cuda"


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w


def rope(x, cos, sin):  # x [B, H, T, Dh], pairs (2i, 2i+1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = RMSNorm(D), RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, FF, D) * 0.02)
        self.w3 = nn.Parameter(torch.randn(E, FF, D) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, D, FF) * 0.02)

    def forward(self, x, cos, sin):
        h = self.n1(x)
        q, k, v = self.qkv(h).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, D))
        h = self.n2(x).view(-1, D)
        probs = F.softmax(self.router(h), -1)
        gates, idx = probs.topk(K, -1)
        gates = gates / gates.sum(-1, keepdim=True)
        frac = F.one_hot(idx, E).float().sum((0, 1)) / (h.shape[0] * K)
        bal = E * (frac * probs.mean(0)).sum()
        out = torch.zeros_like(h)
        flat = idx.view(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()   # one host sync, as in eager MoE code
        tok = order // K
        start = 0
        for e in range(E):
            n = counts[e]
            if n == 0:
                continue
            t = tok[start:start + n]
            g = gates.view(-1)[order[start:start + n]].unsqueeze(1)
            xe = h[t]
            ye = (F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())) @ self.w2[e].t()
            out.index_add_(0, t, ye * g)
            start += n
        return x + out.view(B, T, D), bal


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.layers = nn.ModuleList(Layer() for _ in range(L))
        self.norm = RMSNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        inv = 1.0 / (10000.0 ** (torch.arange(0, D // H, 2, dtype=torch.float64) / (D // H)))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())

    def forward(self, tokens, targets):
        x = self.emb(tokens)
        aux = 0.0
        for layer in self.layers:
            x, bal = layer(x, self.cos, self.sin)
            aux = aux + 0.01 * bal
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)) + aux


model = Model().to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                        fused=True)
step_fn = torch.compile(model) if a.compile else model
data = torch.randint(0, V, (a.steps + 5, B, T + 1), device=dev)
times = []
for s in range(a.steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step_fn(data[s, :, :-1], data[s, :, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss_v = loss.item()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
ms = sorted(times[5:])[len(times[5:]) // 2] * 1e3
nparam = sum(p.numel() for p in model.parameters())
print(f"torch {torch.__version__} {torch.cuda.get_device_name()} params {nparam} "
      f"{'compiled' if a.compile else 'eager'}: median {ms:.2f} ms/step, "
      f"{B * T / ms * 1e3:.0f} tokens/s, last loss {loss_v:.4f}")
