"""The PyTorch side of bench/cpu_train.sh: examples/tiny_moe.moe, written out
by hand in eager PyTorch (fp32, CPU), trained with the same batch, sequence,
sizes and optimizer settings, and timed step by step.

Model (stdlib/nn.moe + examples/tiny_moe.moe): byte embedding 256 x 64;
2 pre-norm decoder layers, each with RMSNorm -> causal attention (4 heads,
interleaved-pair RoPE, theta 10000, no biases) and RMSNorm -> MoE (softmax
router over 4 experts, top-2 renormalised, dropless, SwiGLU experts d_ff 128,
Switch balance loss x 0.01); final RMSNorm; untied lm_head 64 -> 256; cross
entropy.  AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1 on matrices
only, warmup 20 + cosine to 3e-4 over 300 steps, clip_grad_norm_ 1.0.
Batches: 8 rows of 65 consecutive bytes at random offsets of the data file.

Two MoE implementations:
  loop        one expert at a time, the way Hugging Face's Mixtral block does
              it: a one-hot mask, torch.where per expert, index_add_ back;
  vectorised  tokens sorted by expert, packed into a zero-padded
              [experts, max rows, d_model] block, three torch.bmm calls.

A step, as ./run times it: draw a batch, forward, backward, clip, optimizer
step.  Prints one JSON object: per-step milliseconds of the timed steps and
their losses.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear_weight(out_f, in_f):
    return nn.Parameter(torch.randn(out_f, in_f) * 0.02)


class Attention(nn.Module):
    def __init__(self, d, heads, seq, theta=10000.0):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.wq, self.wk, self.wv, self.wo = (linear_weight(d, d) for _ in range(4))
        i = torch.arange(self.dh // 2, dtype=torch.float64)
        ang = torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / self.dh)
        self.register_buffer("cos", torch.cos(ang).float()[None, :, None, :])
        self.register_buffer("sin", torch.sin(ang).float()[None, :, None, :])
        self.register_buffer("future", torch.ones(seq, seq, dtype=torch.bool).triu(1))

    def rope(self, x):
        B, T, _ = x.shape
        x = x.view(B, T, self.h, self.dh // 2, 2)
        x0, x1 = x[..., 0], x[..., 1]
        c, s = self.cos[:, :T], self.sin[:, :T]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).view(B, T, self.h, self.dh)

    def forward(self, x):
        B, T, C = x.shape
        q = self.rope(F.linear(x, self.wq)).transpose(1, 2)
        k = self.rope(F.linear(x, self.wk)).transpose(1, 2)
        v = F.linear(x, self.wv).view(B, T, self.h, self.dh).transpose(1, 2)
        # torch 1.13 (Debian's) has no scaled_dot_product_attention: the
        # eager form, as Hugging Face models write it
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh))
        s = s.masked_fill(self.future[:T, :T], float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        return F.linear(o.transpose(1, 2).reshape(B, T, C), self.wo)


class MoE(nn.Module):
    def __init__(self, d, experts, top_k, d_ff, balance, vectorised):
        super().__init__()
        self.e, self.k, self.balance, self.vectorised = experts, top_k, balance, vectorised
        self.router = linear_weight(experts, d)
        self.w1 = nn.Parameter(torch.randn(experts, d_ff, d) * 0.02)   # gate
        self.w3 = nn.Parameter(torch.randn(experts, d_ff, d) * 0.02)   # up
        self.w2 = nn.Parameter(torch.randn(experts, d, d_ff) * 0.02)   # down

    def experts_loop(self, x, idx, gates):
        """Mixtral-style: per expert, find its (token, choice) pairs and run it."""
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.e).permute(2, 1, 0)        # [E, k, N]
        for e in range(self.e):
            choice, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
            y = F.linear(h, self.w2[e]) * gates[tok, choice, None]
            out.index_add_(0, tok, y)
        return out

    def experts_bmm(self, x, idx, gates):
        """Sort the N*k slots by expert, pad each expert's block to the
        largest, and run all experts with batched matmuls."""
        N, D = x.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        e_sorted = flat[order]
        tok = order // self.k
        counts = torch.bincount(flat, minlength=self.e)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(flat.numel()) - starts[e_sorted]
        rows = int(counts.max())
        xs = x.new_zeros(self.e, rows, D)
        xs = xs.index_put((e_sorted, pos), x[tok])
        h = F.silu(torch.bmm(xs, self.w1.transpose(1, 2))) * torch.bmm(xs, self.w3.transpose(1, 2))
        ys = torch.bmm(h, self.w2.transpose(1, 2))
        y = ys[e_sorted, pos] * gates.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, y)

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        probs = torch.softmax(F.linear(x, self.router), dim=-1)
        top, idx = torch.topk(probs, self.k, dim=-1)
        gates = top / top.sum(-1, keepdim=True)
        run = self.experts_bmm if self.vectorised else self.experts_loop
        out = run(x, idx, gates).view(B, T, D)
        # Switch balance loss: E * sum_e f_e P_e, f_e (share of routed slots) constant
        f = torch.bincount(idx.reshape(-1), minlength=self.e).float() / idx.numel()
        aux = self.balance * self.e * (f * probs.mean(0)).sum()
        return out, aux


class TinyMoE(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(a.vocab, a.d_model) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(a.layers):
            layer = nn.Module()
            layer.attn_norm = RMSNorm(a.d_model)
            layer.attn = Attention(a.d_model, a.heads, a.seq)
            layer.ffn_norm = RMSNorm(a.d_model)
            layer.moe = MoE(a.d_model, a.experts, a.top_k, a.d_ff, a.balance, a.moe == "bmm")
            self.layers.append(layer)
        self.final_norm = RMSNorm(a.d_model)
        self.lm_head = linear_weight(a.vocab, a.d_model)

    def forward(self, tokens, targets):
        x = self.embed[tokens]
        aux = 0.0
        for layer in self.layers:
            x = x + layer.attn(layer.attn_norm(x))
            y, a = layer.moe(layer.ffn_norm(x))
            x = x + y
            aux = aux + a
        logits = F.linear(self.final_norm(x), self.lm_head)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1)) + aux


def lr_at(step, a):
    """Warmup then cosine, as docs/runtime.md (1-based step)."""
    if step <= a.warmup:
        return a.lr * step / a.warmup
    q = min(1.0, (step - a.warmup) / (a.total_steps - a.warmup))
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + math.cos(math.pi * q))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--moe", choices=["loop", "bmm"], default="loop")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    # examples/tiny_moe.moe
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--balance", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--total-steps", type=int, default=300)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.data, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    n_train = int(data.numel() * 0.9)          # the runtime's default val_fraction 0.1
    model = TinyMoE(a)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    gen = torch.Generator().manual_seed(a.seed)
    span = torch.arange(a.seq + 1)
    ms, losses = [], []
    for step in range(1, a.warmup_steps + a.steps + 1):
        t0 = time.perf_counter()
        off = torch.randint(0, n_train - a.seq - 1, (a.batch,), generator=gen)
        rows = data[off[:, None] + span]
        tokens, targets = rows[:, :-1], rows[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        loss = model(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss)
        t1 = time.perf_counter()
        if step > a.warmup_steps:
            ms.append((t1 - t0) * 1e3)
            losses.append(lv)
    print(json.dumps({"impl": "torch-" + a.moe, "tokens_per_step": a.batch * a.seq,
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "ms": ms, "loss": losses}))


if __name__ == "__main__":
    main()
