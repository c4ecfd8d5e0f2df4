"""PyTorch reference for moec's stdlib transformer blocks.

An independent implementation of the same maths in plain PyTorch (fp32, CPU),
used by tests/parity/test_parity.sh: it loads the weights the runtime wrote
(safetensors), replays the runtime's batches, and compares loss, every
parameter's gradient after one step, and the loss curve under AdamW.

Nothing here reads the plan's op list: the model structure is written out by
hand below, from the same description as the .moe example, so a wrong
compiler lowering or a wrong kernel shows up as a mismatch.
"""
import json
import math
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {"F32": (torch.float32, 4), "I32": (torch.int32, 4), "I64": (torch.int64, 8)}


def load_safetensors(path):
    """Minimal safetensors reader (header length, JSON, raw little-endian data)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    meta = header.pop("__metadata__", {})
    for name, info in header.items():
        dt, size = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        t = torch.frombuffer(bytearray(raw[base + b:base + e]), dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out, meta


def rmsnorm(x, w, eps):
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd * w


def rope(x, B, T, H, Dh, theta):
    # pairs (2i, 2i+1) rotated by pos * theta^(-2i/Dh)
    x = x.view(B, T, H, Dh // 2, 2)
    i = torch.arange(Dh // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * i / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    cos = torch.cos(ang).float()[None, :, None, :]
    sin = torch.sin(ang).float()[None, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack([y0, y1], dim=-1).view(B * T, H * Dh)


def attention(x, wq, wk, wv, wo, B, T, H, use_rope, theta):
    D = wq.shape[0]
    Dh = D // H
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    if use_rope:
        q, k = rope(q, B, T, H, Dh, theta), rope(k, B, T, H, Dh, theta)
    q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = s.masked_fill(mask, float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    return o.transpose(1, 2).reshape(B * T, D) @ wo.T


def swiglu_mlp(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def moe(x, w_router, w1, w3, w2, top_k, capacity_rows, balance_coef, zloss_coef, aux):
    """Top-k softmax routing with renormalised gates, optional capacity
    (slots beyond C dropped in token order), SwiGLU experts w1 gate, w3 up,
    w2 down ([E, out, in]).  aux collects (name, value) losses."""
    N, D = x.shape
    E = w_router.shape[0]
    logits = x @ w_router.T
    probs = torch.softmax(logits.float(), dim=-1)
    # top-k with ties to the lower index: a stable descending sort
    vals, idx = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)
    idx = idx[:, :top_k]
    gates = torch.gather(probs, 1, idx)
    gates = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    counts = torch.zeros(E, dtype=torch.int64)
    # token order within each expert: t ascending, then choice j
    for e in range(E):
        sel = (idx == e).nonzero(as_tuple=False)  # rows sorted by (t, j)
        if capacity_rows > 0:
            sel = sel[:capacity_rows]
        counts[e] = (idx == e).sum()
        if sel.numel() == 0:
            continue
        t, j = sel[:, 0], sel[:, 1]
        h = x[t]
        y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
        out = out.index_add(0, t, y * gates[t, j][:, None])
    if balance_coef != 0:
        f = counts.float() / (N * top_k)
        P = probs.mean(0)
        bal = E * (f * P).sum()
        aux.append(("balance", bal))
        out_loss = balance_coef * bal
    else:
        out_loss = None
    if zloss_coef != 0:
        z = torch.logsumexp(logits, -1).pow(2).mean()
        aux.append(("zloss", z))
        out_loss = zloss_coef * z if out_loss is None else out_loss + zloss_coef * z
    return out, out_loss


def cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets.long().view(-1))
