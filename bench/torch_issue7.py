"""PyTorch twins of bench/models/*.moe for the issue-7 GPU benchmark
(bench/gpu_issue7.sh).  Not a test.

  python3 bench/torch_issue7.py --model moe_gpt2s --variant loop    [--steps 20 --warmup 3]
  python3 bench/torch_issue7.py --model moe_gpt2s --variant grouped --compile
  python3 bench/torch_issue7.py --model gpt2_124m --variant dense [--compile]
  python3 bench/torch_issue7.py --count --model moe_fine         # params, active, FLOPs/token
  python3 bench/torch_issue7.py --table results.jsonl            # the one table

Models (the same shapes as the .moe files): gpt2_124m (LayerNorm, GELU MLP
with bias, RoPE, tied lm_head), moe_gpt2s (8 SwiGLU experts d_ff 2048,
top-2), moe_fine (64 experts d_ff 512, top-6, 2 shared experts).  All:
12 layers, d 768, 12 heads, seq 1024, vocab 50304 (50257 padded as llm.c).
Softmax router, renormalised top-k gates, dropless, Switch balance loss 0.01.

MoE variants:
  loop     Hugging Face Mixtral style: one-hot mask, torch.where per expert
           (a host sync each), gather, three matmuls, index_add_.
  grouped  tokens sorted by expert, torch._grouped_mm over the sorted rows
           (no host sync), scatter back and a gate-weighted sum; falls back
           to bmm over zero-padded [E, max_rows, D] blocks when
           torch._grouped_mm is missing or fails its self-check.
  --compile wraps the model in torch.compile (the optimizer stays fused AdamW).
Precision: --dtype bf16 is torch.autocast(bfloat16) over fp32 weights (the
usual PyTorch recipe); fp32 turns autocast off.  --tiny shrinks every model
(d 64, 2 layers, seq 64, vocab 512) to check the script on a CPU; the same
sizes as `bench/gpu_issue7.sh --tiny`.

Each run appends one JSON line (--out) with ms/step (median of the timed
steps), tokens/s, peak memory and the FLOP count: 6 N_active + 6 L C T per
token, N_active = non-expert params + routed expert params x top_k / E.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK_TFLOPS = 989.0   # H100 SXM dense bf16

MODELS = {
    "gpt2_124m": dict(V=50304, D=768, H=12, L=12, T=1024, FF=3072, E=0, K=0, S=0),
    "moe_gpt2s": dict(V=50304, D=768, H=12, L=12, T=1024, FF=2048, E=8, K=2, S=0),
    "moe_fine":  dict(V=50304, D=768, H=12, L=12, T=1024, FF=512, E=64, K=6, S=2),
}
TINY = {"gpt2_124m": dict(FF=256), "moe_gpt2s": dict(FF=128), "moe_fine": dict(FF=32)}
TINY_ALL = dict(V=512, D=64, H=4, L=2, T=64)


def config(name, tiny):
    c = dict(MODELS[name])
    if tiny:
        c.update(TINY_ALL)
        c.update(TINY[name])
    return c


class RMSNorm(nn.Module):
    def __init__(self, d, dev):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=dev))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


def rope(x, cos, sin):   # x [B, H, T, Dh]; pairs (2i, 2i+1), as moec's rope kernel
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


def attend(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # torch < 2.0 (the Debian CPU torch): masked softmax
    T = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def lin(i, o, dev, bias=False):
    m = nn.Linear(i, o, bias=bias, device=dev)
    if dev != "meta":
        nn.init.normal_(m.weight, std=0.02)
        if bias:
            nn.init.zeros_(m.bias)
    return m


class Attention(nn.Module):
    def __init__(self, c, dev):
        super().__init__()
        D = c["D"]
        self.H = c["H"]
        self.wq, self.wk, self.wv, self.wo = (lin(D, D, dev) for _ in range(4))

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        sh = lambda t: t.view(B, T, self.H, D // self.H).transpose(1, 2)
        q, k, v = sh(self.wq(x)), sh(self.wk(x)), sh(self.wv(x))
        o = attend(rope(q, cos, sin), rope(k, cos, sin), v)
        return self.wo(o.transpose(1, 2).reshape(B, T, D))


def expert_param(E, o, i, dev):
    w = torch.empty(E, o, i, device=dev)
    if dev != "meta":
        nn.init.normal_(w, std=0.02)
    return nn.Parameter(w)


def grouped_mm_ok():
    """torch._grouped_mm exists, runs, and matches a per-expert matmul."""
    gm = getattr(torch, "_grouped_mm", None)
    if gm is None or not torch.cuda.is_available():
        return False, "no torch._grouped_mm" if gm is None else "no CUDA"
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        E, D, O = 4, 64, 96
        counts = [40, 0, 24, 8]
        x = torch.randn(sum(counts), D, device="cuda", generator=g).bfloat16()
        w = torch.randn(E, O, D, device="cuda", generator=g).bfloat16()
        offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        x.requires_grad_(True)
        w.requires_grad_(True)
        y = gm(x, w.transpose(-2, -1), offs=offs)
        y.float().square().sum().backward()   # the backward must exist too
        if x.grad is None or w.grad is None or not bool(torch.isfinite(w.grad).all()):
            return False, "torch._grouped_mm has no usable backward"
        x, w = x.detach(), w.detach()
        ref, s = [], 0
        for e, n in enumerate(counts):
            ref.append(x[s:s + n].float() @ w[e].float().t())
            s += n
        err = (y.float() - torch.cat(ref)).norm() / torch.cat(ref).norm()
        return bool(err < 1e-2), f"self-check rel err {err.item():.1e}"
    except Exception as ex:   # an API change: fall back, and say so
        return False, f"torch._grouped_mm failed: {str(ex).splitlines()[0][:120]}"


class MoE(nn.Module):
    def __init__(self, c, dev, variant, use_gmm, dt):
        super().__init__()
        D, FF, self.E, self.K = c["D"], c["FF"], c["E"], c["K"]
        self.variant, self.use_gmm, self.dt = variant, use_gmm, dt
        self.router = lin(D, self.E, dev)
        self.w1 = expert_param(self.E, FF, D, dev)
        self.w3 = expert_param(self.E, FF, D, dev)
        self.w2 = expert_param(self.E, D, FF, dev)
        self.shared = None
        if c["S"]:
            self.shared = nn.ModuleDict(dict(w1=lin(D, c["S"] * FF, dev), w3=lin(D, c["S"] * FF, dev),
                                             w2=lin(c["S"] * FF, D, dev)))

    def experts_loop(self, h, idx, gates):
        # Hugging Face Mixtral's sparse block: a host sync (torch.where) per expert
        out = torch.zeros_like(h)
        mask = F.one_hot(idx, self.E).permute(2, 1, 0)   # [E, K, N]
        for e in range(self.E):
            k, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            xe = h[tok]
            ye = F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e])
            out.index_add_(0, tok, (ye * gates[tok, k, None]).to(out.dtype))
        return out

    def experts_grouped(self, h, idx, gates):
        N, D = h.shape
        flat = idx.reshape(-1)
        order = torch.sort(flat, stable=True).indices      # slots grouped by expert, token order kept
        tok = order // self.K
        counts = torch.zeros(self.E, dtype=torch.int32, device=h.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        dt = self.dt   # autocast's compute dtype (it does not cast _grouped_mm's inputs)
        xs = h.index_select(0, tok).to(dt)
        w1, w3, w2 = self.w1.to(dt), self.w3.to(dt), self.w2.to(dt)
        if self.use_gmm:
            offs = counts.cumsum(0).to(torch.int32)
            mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
            ys = mm(F.silu(mm(xs, w1)) * mm(xs, w3), w2)
        else:
            # zero-padded blocks [E, cap, D]: one host sync for the largest expert
            cap = int(counts.max().item())
            start = counts.cumsum(0) - counts
            srt = flat[order]
            pos = torch.arange(flat.numel(), device=h.device) - start[srt] + srt * cap
            xp = xs.new_zeros(self.E * cap, D).index_copy(0, pos, xs).view(self.E, cap, D)
            hp = F.silu(torch.bmm(xp, w1.transpose(1, 2))) * torch.bmm(xp, w3.transpose(1, 2))
            ys = torch.bmm(hp, w2.transpose(1, 2)).reshape(self.E * cap, D).index_select(0, pos)
        y = torch.empty_like(ys).index_copy(0, order, ys)  # back to (token, choice) order
        return (y.view(N, self.K, D).float() * gates.unsqueeze(-1)).sum(1).to(dt)

    def forward(self, h):
        probs = F.softmax(self.router(h).float(), -1)
        gates, idx = probs.topk(self.K, -1)
        gates = gates / gates.sum(-1, keepdim=True)
        frac = torch.zeros(self.E, device=h.device).scatter_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=h.device)) / idx.numel()
        bal = self.E * (frac * probs.mean(0)).sum()
        run = self.experts_loop if self.variant == "loop" else self.experts_grouped
        y = run(h, idx, gates)
        if self.shared is not None:
            s = self.shared
            y = y + s["w2"](F.silu(s["w1"](h)) * s["w3"](h))
        return y, bal


class Block(nn.Module):
    def __init__(self, c, dev, variant, use_gmm, dt):
        super().__init__()
        D = c["D"]
        self.dense = c["E"] == 0
        self.attn = Attention(c, dev)
        if self.dense:   # GPT-2: LayerNorm, GELU (tanh) MLP with bias
            self.n1, self.n2 = nn.LayerNorm(D, device=dev), nn.LayerNorm(D, device=dev)
            self.fc, self.proj = lin(D, c["FF"], dev, bias=True), lin(c["FF"], D, dev, bias=True)
        else:
            self.n1, self.n2 = RMSNorm(D, dev), RMSNorm(D, dev)
            self.moe = MoE(c, dev, variant, use_gmm, dt)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.n1(x), cos, sin)
        if self.dense:
            return x + self.proj(F.gelu(self.fc(self.n2(x)), approximate="tanh")), None
        B, T, D = x.shape
        y, bal = self.moe(self.n2(x).reshape(B * T, D))
        return x + y.view(B, T, D), bal


class Model(nn.Module):
    def __init__(self, c, dev, variant="dense", use_gmm=False, dt=torch.float32):
        super().__init__()
        self.c = c
        V, D, H, T = c["V"], c["D"], c["H"], c["T"]
        self.emb = nn.Embedding(V, D, device=dev)
        if dev != "meta":
            nn.init.normal_(self.emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c, dev, variant, use_gmm, dt) for _ in range(c["L"]))
        self.norm = nn.LayerNorm(D, device=dev) if c["E"] == 0 else RMSNorm(D, dev)
        inv = 1.0 / (10000.0 ** (torch.arange(0, D // H, 2, dtype=torch.float64) / (D // H)))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos().float().to(dev), persistent=False)
        self.register_buffer("sin", ang.sin().float().to(dev), persistent=False)

    def forward(self, tokens, targets):
        x = self.emb(tokens)
        aux = 0.0
        for b in self.blocks:
            x, bal = b(x, self.cos, self.sin)
            if bal is not None:
                aux = aux + 0.01 * bal
        logits = F.linear(self.norm(x), self.emb.weight)   # tied, as the .moe files
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)) + aux


def count(model):
    """(total, active) parameters, tied weights once; routed experts x K/E."""
    c, total, active = model.c, 0, 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        routed = name.endswith((".moe.w1", ".moe.w2", ".moe.w3"))
        active += p.numel() * (c["K"] / c["E"] if routed else 1)
    return total, int(round(active))


def flops_per_token(c, active):
    return 6 * active + 6 * c["L"] * c["D"] * c["T"]


class Shard:
    """llm.c token shard: 256 int32 header (20240520, 1, n), then n uint16."""
    def __init__(self, path):
        import array
        with open(path, "rb") as f:
            hdr = array.array("i")
            hdr.fromfile(f, 256)
            if hdr[0] != 20240520 or hdr[1] != 1:
                sys.exit(f"{path}: not an llm.c uint16 shard (magic {hdr[0]}, version {hdr[1]})")
            toks = array.array("H")
            toks.fromfile(f, hdr[2])
        self.tokens = torch.tensor(toks, dtype=torch.int32)   # small for a benchmark shard


def batches(c, B, n, data, dev):
    g = torch.Generator().manual_seed(1)
    if data:
        toks = Shard(data).tokens
        if toks.numel() < c["T"] + 2:
            sys.exit(f"{data}: {toks.numel()} tokens, need > {c['T'] + 1}")
        if int(toks.max()) >= c["V"]:
            sys.exit(f"{data}: token {int(toks.max())} >= vocab {c['V']}")
        off = torch.randint(0, toks.numel() - c["T"] - 1, (n, B), generator=g)
        rows = off[..., None] + torch.arange(c["T"] + 1)
        out = toks[rows]
    else:   # synthetic: uniform ids below GPT-2's 50257 (or the tiny vocab)
        out = torch.randint(0, min(c["V"], 50257), (n, B, c["T"] + 1), generator=g, dtype=torch.int32)
    return out.long().to(dev)


def make_opt(model, dev):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)]
    kw = dict(lr=6e-4, betas=(0.9, 0.95))
    if dev == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (TypeError, RuntimeError):
            pass
    return torch.optim.AdamW(groups, **kw), "foreach"


def bench(a):
    c = config(a.model, a.tiny)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variant = "dense" if c["E"] == 0 else a.variant
    if variant == "dense" and c["E"]:
        sys.exit("--variant dense is for gpt2_124m; use loop or grouped")
    use_gmm, gmm_note = False, ""
    if variant == "grouped":
        use_gmm, gmm_note = grouped_mm_ok() if dev == "cuda" else (False, "CPU: padded bmm")
        if not use_gmm and dev == "cuda":
            print(f"note: grouped falls back to padded bmm ({gmm_note})", file=sys.stderr)
    torch.manual_seed(1)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = Model(c, dev, variant, use_gmm, dt)
    total, active = count(model)
    opt, opt_kind = make_opt(model, dev)
    fwd = model
    if a.compile:
        if not hasattr(torch, "compile"):
            sys.exit(f"torch {torch.__version__} has no torch.compile")
        fwd = torch.compile(model)
    if a.dtype == "bf16":
        amp = lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)
    else:
        import contextlib
        amp = contextlib.nullcontext
    n = a.warmup + a.steps
    data = batches(c, a.batch, n, a.data, dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_start = time.perf_counter()
    for s in range(n):
        sync()
        t0 = time.perf_counter()
        with amp():
            loss = fwd(data[s, :, :-1], data[s, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            sys.exit(f"step {s + 1}: loss {losses[-1]}")
    timed = times[a.warmup:]
    ms = statistics.median(timed) * 1e3
    tok = a.batch * c["T"]
    fpt = flops_per_token(c, active)
    r = dict(model=a.model, impl="torch-" + variant + ("+compile" if a.compile else ""),
             device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
             torch=torch.__version__, dtype=a.dtype, batch=a.batch, seq=c["T"],
             steps=a.steps, warmup=a.warmup, ms=round(ms, 3), tok_s=round(tok / ms * 1e3, 1),
             ms_min=round(min(timed) * 1e3, 3), ms_max=round(max(timed) * 1e3, 3),
             warmup_s=round(sum(times[:a.warmup]), 2), wall_s=round(time.perf_counter() - t_start, 2),
             params=total, active=active, flops_per_token=fpt,
             mfu=round(tok / ms * 1e3 * fpt / (PEAK_TFLOPS * 1e12), 4),
             loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), optimizer=opt_kind)
    if variant == "grouped":
        r["grouped"] = "torch._grouped_mm" if use_gmm else "padded bmm"
        r["grouped_note"] = gmm_note
    if dev == "cuda":
        r["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        r["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    print(json.dumps(r))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")


def table(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    dev = next((r["device"] for r in rows if r.get("device")), "?")
    print(f"device {dev}; MFU = tokens/s x (6 N_active + 6 L C T) / {PEAK_TFLOPS:.0f} TFLOP/s; "
          "ms/step = median of the timed steps")
    hdr = ("model", "implementation", "B x T", "ms/step", "tokens/s", "MFU", "peak GPU MiB (smi)",
           "peak alloc MiB", "N active", "note")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join([" --- "] * 3 + [" ---: "] * 6 + [" --- "]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['impl']} | | | | | | | | {r['error']} |")
            continue
        alloc = r.get("peak_alloc_mib", r.get("pools_mib", ""))
        note = []
        if r.get("grouped"):
            note.append(r["grouped"])
        if "explain_mib" in r:
            note.append(f"explain predicts {r['explain_mib']} MiB")
        if r.get("warmup_s") is not None and "compile" in r["impl"]:
            note.append(f"warm-up incl. compile {r['warmup_s']} s")
        note.append(f"loss {r.get('loss_first', '?')} -> {r.get('loss_last', '?')}")
        print(f"| {r['model']} | {r['impl']} | {r['batch']} x {r['seq']} | {r['ms']:.1f} | "
              f"{r['tok_s']:.0f} | {100 * r['mfu']:.1f}% | {r.get('smi_peak_mib', '')} | {alloc} | "
              f"{r['active']} | {'; '.join(note)} |")
    # speed-ups against the targets
    by = {(r["model"], r["impl"]): r for r in rows if "error" not in r}
    for m in ("moe_gpt2s", "moe_fine", "gpt2_124m"):
        me = by.get((m, "moec"))
        if not me:
            continue
        for impl in ("torch-loop", "torch-grouped", "torch-grouped+compile", "torch-dense",
                     "torch-dense+compile"):
            t = by.get((m, impl))
            if t:
                print(f"{m}: moec / {impl} = {me['tok_s'] / t['tok_s']:.2f}x tokens/s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="moe_gpt2s")
    p.add_argument("--variant", choices=("dense", "loop", "grouped"), default="grouped")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--data", help="llm.c uint16 token shard (default: synthetic ids)")
    p.add_argument("--tiny", action="store_true", help="d 64, 2 layers, seq 64, vocab 512 (CPU check)")
    p.add_argument("--out", help="append the result line to this JSONL")
    p.add_argument("--count", action="store_true", help="print params, active params, FLOPs/token")
    p.add_argument("--table", metavar="JSONL", help="print the table of a results file and exit")
    a = p.parse_args()
    if a.table:
        return table(a.table)
    if a.count:
        c = config(a.model, a.tiny)
        total, active = count(Model(c, "meta"))
        print(json.dumps(dict(model=a.model, params=total, active=active,
                              flops_per_token=flops_per_token(c, active))))
        return
    bench(a)


if __name__ == "__main__":
    main()
