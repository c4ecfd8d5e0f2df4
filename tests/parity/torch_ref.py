"""PyTorch reference for moec's stdlib transformer (tests/parity/test_parity.sh).

An independent implementation of the maths of stdlib/nn.moe in plain PyTorch
(fp32, CPU, autograd).  It reads the trace that `run --trace DIR` writes:

  DIR/trace.jsonl        line 1: training config and each param's weight
                         decay; then one line per step: loss, lr, grad norm
  DIR/batches.bin        int32 tokens[B*T] then targets[B*T], per micro-step
  DIR/init.safetensors   the weights before step 1
  DIR/grads.safetensors  step 1's accumulated gradients (param names)

and checks (a) the step-1 loss, (b) every parameter's gradient after step 1,
(c) the loss (and lr, grad norm) of every traced step under torch's own AdamW
with the plan's hyper-parameters, warmup + cosine schedule and
clip_grad_norm_.

Nothing here reads the plan's op list: the model is written out by hand from
the .moe description (the command line says which block and its options), so
a wrong compiler lowering, gradient rule or kernel shows up as a mismatch.
Prints PASS/FAIL lines and a final `RESULT {json}` line with the worst errors.
"""
import argparse
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
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        dt, _ = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        t = torch.frombuffer(bytearray(raw[base + b:base + e]), dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out, meta


# ---- the blocks of stdlib/nn.moe ------------------------------------------
def rmsnorm(x, w, eps=1e-5):
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd * w


def rope(x, B, T, H, theta):
    """Rotate interleaved pairs (2i, 2i+1) of each head by t * theta^(-2i/Dh)."""
    Dh = x.shape[-1] // H
    x = x.view(B, T, H, Dh // 2, 2)
    i = torch.arange(Dh // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / Dh)[None, :]
    cos = torch.cos(ang).float()[None, :, None, :]
    sin = torch.sin(ang).float()[None, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).view(B * T, H * Dh)


def attention(x, p, pre, B, T, H, theta=10000.0):
    D = x.shape[-1]
    Dh = D // H
    q = x @ p[pre + "wq.weight"].T
    k = x @ p[pre + "wk.weight"].T
    v = x @ p[pre + "wv.weight"].T
    q, k = rope(q, B, T, H, theta), rope(k, B, T, H, theta)
    q, k, v = (t.reshape(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    return o.transpose(1, 2).reshape(B * T, D) @ p[pre + "wo.weight"].T


def swiglu_mlp(x, w1, w3, w2):
    """w2(silu(w1 x) * w3 x), weights [out, in]."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def select(key, k):
    """top-k indices of key per row, ties to the lower expert (stable sort)"""
    _, order = torch.sort(key, dim=-1, descending=True, stable=True)
    return order[:, :k]


def route(logits, p, pre, cfg):
    """stdlib/moe.moe routers: returns (probs for the balance losses, idx, gates)"""
    E, k = logits.shape[1], cfg.top_k
    if cfg.router == "topk_softmax":
        idx = select(logits.detach(), k)
        gates = torch.softmax(torch.gather(logits, 1, idx), dim=-1)
        return torch.softmax(logits, dim=-1), idx, gates
    probs = torch.sigmoid(logits) if cfg.router == "sigmoid" else torch.softmax(logits, dim=-1)
    bias = p.get(pre + "bias")
    key = probs.detach() + bias if bias is not None else probs.detach()
    if cfg.groups > 1:
        gsize = E // cfg.groups
        kg = key.view(-1, cfg.groups, gsize)
        top2 = torch.sort(kg, dim=-1, descending=True).values
        gscore = top2[..., 0] + top2[..., 1] if gsize > 1 else top2[..., 0]
        keep = select(gscore, cfg.topk_groups)
        mask = torch.zeros_like(gscore, dtype=torch.bool).scatter(1, keep, True)
        key = torch.where(mask.repeat_interleave(gsize, dim=1), key, torch.full_like(key, -math.inf))
    idx = select(key, k)
    chosen = torch.gather(probs, 1, idx)
    gates = chosen / chosen.sum(-1, keepdim=True) if cfg.renorm else chosen
    return probs, idx, gates * cfg.gate_scale


def moe_block(x, p, pre, cfg, B, aux, stats, loads):
    """The general stdlib/moe.moe block: router (route), capacity by position,
    SwiGLU or GELU experts, balance / z / per-sequence balance losses, shared
    experts (optionally gated by sigmoid(x . w)); the per-expert load (before
    capacity) goes to loads[pre] for the aux-loss-free bias update."""
    N, _ = x.shape
    E, k = p[pre + "router.weight"].shape[0], cfg.top_k
    logits = x @ p[pre + "router.weight"].T
    probs, idx, gates = route(logits, p, pre, cfg)
    loads[pre] = torch.bincount(idx.reshape(-1), minlength=E).double()
    cap = math.ceil(cfg.capacity * N * k / E) if cfg.capacity > 0 else 0
    out = torch.zeros_like(x)
    dropped = 0
    for e in range(E):
        sel = (idx == e).nonzero(as_tuple=False)
        if cap > 0 and sel.shape[0] > cap:
            stats["dropped"] = stats.get("dropped", 0) + sel.shape[0] - cap
            dropped += sel.shape[0] - cap
            sel = sel[:cap]
        if sel.shape[0] == 0:
            continue
        t, j = sel[:, 0], sel[:, 1]
        if cfg.expert_act == "gelu":
            y = F.gelu(x[t] @ p[pre + "w1"][e].T, approximate="tanh") @ p[pre + "w2"][e].T
        else:
            y = swiglu_mlp(x[t], p[pre + "w1"][e], p[pre + "w3"][e], p[pre + "w2"][e])
        out = out.index_add(0, t, y * gates[t, j][:, None])
    # the layer's expert load as `run` logs it (the last micro-batch's): slots
    # per expert before capacity, then the dropped slots
    stats.setdefault("routing", {})[pre[:-1]] = loads[pre].tolist() + [float(dropped)]
    named = stats.setdefault("named", {})
    if cfg.balance > 0:
        f = torch.bincount(idx.reshape(-1), minlength=E).float() / (N * k)
        aux.append(cfg.balance * (E * (f * probs.mean(0)).sum()))
        named[pre + "balance"] = named.get(pre + "balance", 0.0) + float(aux[-1])
    if cfg.zloss > 0:
        aux.append(cfg.zloss * torch.logsumexp(logits, -1).pow(2).mean())
        named[pre + "zloss"] = named.get(pre + "zloss", 0.0) + float(aux[-1])
    if cfg.seq_balance > 0:
        T = N // B
        oh = F.one_hot(idx, E).sum(1).view(B, T, E).sum(1).float() / (T * k)   # f per sequence
        P = probs.view(B, T, E).mean(1)
        aux.append(cfg.seq_balance * (E * (oh * P).sum(-1)).mean())
        named[pre + "seq_balance"] = named.get(pre + "seq_balance", 0.0) + float(aux[-1])
    if cfg.shared > 0:
        if cfg.expert_act == "gelu":
            s = F.gelu(x @ p[pre + "shared_w1.weight"].T, approximate="tanh") @ p[pre + "shared_w2.weight"].T
        else:
            s = swiglu_mlp(x, p[pre + "shared.w1.weight"], p[pre + "shared.w3.weight"],
                           p[pre + "shared.w2.weight"])
        if cfg.shared_gate:
            s = s * torch.sigmoid(x @ p[pre + "shared_gate.weight"].T)
        out = out + s
    return out


def moe(x, p, pre, top_k, capacity, balance, zloss, aux, stats):
    """Softmax router, top-k of the probabilities (ties to the lower expert),
    gates renormalised over the k chosen; capacity > 0 keeps the first
    ceil(capacity N k / E) slots of each expert in (token, choice) order and
    drops the rest; SwiGLU experts w1 (gate), w3 (up), w2 (down), [E, out, in].
    Balance loss E sum_i f_i P_i (f_i = share of all N k routed slots, a
    constant), z-loss mean(logsumexp(logits)^2); both scaled and appended to aux."""
    N, _ = x.shape
    w_router = p[pre + "router.weight"]
    w1, w3, w2 = p[pre + "w1"], p[pre + "w3"], p[pre + "w2"]
    E = w_router.shape[0]
    logits = x @ w_router.T
    probs = torch.softmax(logits, dim=-1)
    _, order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)
    idx = order[:, :top_k]
    chosen = torch.gather(probs, 1, idx)
    gates = chosen / chosen.sum(-1, keepdim=True)
    cap = math.ceil(capacity * N * top_k / E) if capacity > 0 else 0
    out = torch.zeros_like(x)
    dropped = 0
    for e in range(E):
        sel = (idx == e).nonzero(as_tuple=False)   # rows in (token, choice) order
        if cap > 0 and sel.shape[0] > cap:
            stats["dropped"] = stats.get("dropped", 0) + sel.shape[0] - cap
            dropped += sel.shape[0] - cap
            sel = sel[:cap]
        if sel.shape[0] == 0:
            continue
        t, j = sel[:, 0], sel[:, 1]
        y = swiglu_mlp(x[t], w1[e], w3[e], w2[e])
        out = out.index_add(0, t, y * gates[t, j][:, None])
    stats.setdefault("routing", {})[pre[:-1]] = (
        torch.bincount(idx.reshape(-1), minlength=E).double().tolist() + [float(dropped)])
    named = stats.setdefault("named", {})
    if balance > 0:
        f = torch.bincount(idx.reshape(-1), minlength=E).float() / (N * top_k)
        aux.append(balance * (E * (f * probs.mean(0)).sum()))
        named[pre + "balance"] = named.get(pre + "balance", 0.0) + float(aux[-1])
    if zloss > 0:
        aux.append(zloss * torch.logsumexp(logits, -1).pow(2).mean())
        named[pre + "zloss"] = named.get(pre + "zloss", 0.0) + float(aux[-1])
    return out


def forward(p, tokens, targets, cfg, stats, loads=None):
    """The total training loss: cross entropy + every add_loss term."""
    B, T = tokens.shape
    H = cfg.heads
    aux = []
    x = p["embed.weight"][tokens.long().reshape(-1)]
    for l in range(cfg.layers):
        pre = "layers.%d." % l
        x = x + attention(rmsnorm(x, p[pre + "attn_norm.weight"]), p, pre + "attn.", B, T, H)
        h = rmsnorm(x, p[pre + "ffn_norm.weight"])
        if cfg.router and l not in cfg.moe_layers:   # a dense layer of an interleaved model
            x = x + swiglu_mlp(h, p[pre + "mlp.w1.weight"], p[pre + "mlp.w3.weight"],
                               p[pre + "mlp.w2.weight"])
        elif cfg.router:
            x = x + moe_block(h, p, pre + "moe.", cfg, B, aux, stats, loads if loads is not None else {})
        elif cfg.experts > 0:
            x = x + moe(h, p, pre + "moe.", cfg.top_k, cfg.capacity, cfg.balance, cfg.zloss,
                        aux, stats)
        else:
            x = x + swiglu_mlp(h, p[pre + "mlp.w1.weight"], p[pre + "mlp.w3.weight"],
                               p[pre + "mlp.w2.weight"])
    logits = rmsnorm(x, p["final_norm.weight"]) @ p["lm_head.weight"].T
    loss = F.cross_entropy(logits, targets.long().reshape(-1))
    for a in aux:
        loss = loss + a
    return loss


def expected_names(cfg):
    names = ["embed.weight", "final_norm.weight", "lm_head.weight"]
    for l in range(cfg.layers):
        pre = "layers.%d." % l
        names += [pre + "attn_norm.weight", pre + "ffn_norm.weight"]
        names += [pre + "attn.w%s.weight" % w for w in "qkvo"]
        if cfg.router and l not in cfg.moe_layers:
            names += [pre + "mlp.w%d.weight" % i for i in (1, 2, 3)]
        elif cfg.router:
            m = pre + "moe."
            names += [m + "router.weight", m + "w1", m + "w2"]
            names += [m + "w3"] if cfg.expert_act == "swiglu" else []
            names += [m + "bias"] if cfg.router == "sigmoid" or cfg.groups > 1 or cfg.bias_rate > 0 else []
            if cfg.shared > 0 and cfg.expert_act == "gelu":
                names += [m + "shared_w1.weight", m + "shared_w2.weight"]
            elif cfg.shared > 0:
                names += [m + "shared.w%d.weight" % i for i in (1, 2, 3)]
            names += [m + "shared_gate.weight"] if cfg.shared > 0 and cfg.shared_gate else []
        elif cfg.experts > 0:
            names += [pre + "moe.router.weight"] + [pre + "moe.w%d" % i for i in (1, 2, 3)]
        else:
            names += [pre + "mlp.w%d.weight" % i for i in (1, 2, 3)]
    return sorted(names)


def lr_at(h, step):
    """The schedule as docs/runtime.md states it (1-based step)."""
    s = step - 1
    lr, min_lr, warm = h["lr"], h["min_lr"], h["warmup"]
    if s < warm:
        return lr * (s + 1) / warm
    if h["schedule"] == "constant":
        return lr
    span = h["steps"] - warm
    q = min(1.0, (s - warm) / span) if span > 0 else 1.0
    if h["schedule"] == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * q))
    return lr + (min_lr - lr) * q


def rel(a, b):
    d = float(torch.linalg.vector_norm((a.double() - b.double())))
    n = float(torch.linalg.vector_norm(b.double()))
    return d / n if n > 0 else d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--label", default="parity")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity", type=float, default=0.0)
    ap.add_argument("--balance", type=float, default=0.0)
    ap.add_argument("--zloss", type=float, default=0.0)
    ap.add_argument("--expect-drops", action="store_true")
    # stdlib/moe.moe keywords (--router selects the general block)
    ap.add_argument("--router", default="")
    ap.add_argument("--renorm", type=int, default=1)
    ap.add_argument("--gate-scale", type=float, default=1.0)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--topk-groups", type=int, default=1)
    ap.add_argument("--bias-rate", type=float, default=0.0)
    ap.add_argument("--seq-balance", type=float, default=0.0)
    ap.add_argument("--expert-act", default="swiglu")
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--shared-gate", action="store_true")
    ap.add_argument("--moe-layers", default="",
                    help="comma list of the MoE layers (the rest are dense SwiGLU `mlp`); default all")
    ap.add_argument("--metrics", default="",
                    help="run's --metrics JSONL: compare every step's per-layer expert load, "
                         "dropped slots and named aux losses")
    ap.add_argument("--loss-tol", type=float, default=1e-5)
    ap.add_argument("--grad-tol", type=float, default=1e-4)
    ap.add_argument("--curve-tol", type=float, default=1e-4)
    ap.add_argument("--grad-atol", type=float, default=0.0,
                    help="also accept a gradient whose absolute error norm is <= this (for "
                         "gradients that are exactly zero mathematically: only rounding is left)")
    cfg = ap.parse_args()
    cfg.moe_layers = ([int(v) for v in cfg.moe_layers.split(",")] if cfg.moe_layers
                      else list(range(cfg.layers)))
    torch.manual_seed(0)
    L = cfg.label
    ok = True

    def check(name, good, msg):
        nonlocal ok
        print(("PASS %s.%s" % (L, name)) if good else ("FAIL %s.%s: %s" % (L, name, msg)))
        ok = ok and good

    with open(cfg.trace + "/trace.jsonl") as f:
        lines = [json.loads(s) for s in f if s.strip()]
    h, steps = lines[0], lines[1:]
    B, T, A = h["batch"], h["seq"], h["grad_accum"]
    raw = open(cfg.trace + "/batches.bin", "rb").read()
    bt = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(-1, 2, B, T)
    init, _ = load_safetensors(cfg.trace + "/init.safetensors")
    grads, _ = load_safetensors(cfg.trace + "/grads.safetensors")
    pnames = [q["name"] for q in h["params"]]
    decay = {q["name"]: q["weight_decay"] for q in h["params"]}
    check("names", sorted(pnames) == expected_names(cfg) and
          sorted(grads) == sorted(q["name"] for q in h["params"] if q.get("trained", True)),
          "plan params %s, grads %s, expected %s" % (sorted(pnames), sorted(grads),
                                                    expected_names(cfg)))
    check("batches", bt.shape[0] == A * len(steps) and h["optimizer"] == "adamw" and
          h["start"] == 0 and h["precision"] == 0 and len(steps) >= 2,
          "%d micro-batches for %d steps x grad_accum %d (optimizer %s, start %d, precision %d); "
          "trace a fresh fp32 AdamW run of 2+ steps"
          % (bt.shape[0], len(steps), A, h["optimizer"], h["start"], h["precision"]))
    if not ok:
        return 1
    trained = [q["name"] for q in h["params"] if q.get("trained", True)]
    buffers = [n for n in pnames if n not in trained]
    p = {n: init[n].clone().requires_grad_(n in trained) for n in pnames}
    groups = {}
    for n in trained:
        groups.setdefault(decay[n], []).append(p[n])
    opt = torch.optim.AdamW([{"params": v, "weight_decay": wd} for wd, v in groups.items()],
                            lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"])
    res = {"label": L}
    # run's metrics: per step the routing of each MoE layer and the named losses
    mrec, rt = None, {"steps": 0, "bad": [], "drops": 0, "aux_worst": 0.0, "aux_bad": []}
    if cfg.metrics:
        with open(cfg.metrics) as f:
            mrec = {r["step"]: r for r in (json.loads(s) for s in f if s.strip())}

    def compare_routing(step, stats, rec, A):
        """per-expert load (before capacity) and dropped slots must be equal,
        integer for integer, in every layer; the named aux losses close."""
        if rec is None:
            rt["bad"].append("step %d: no metrics line" % step)
            return
        got = rec.get("routing", {})
        want = stats.get("routing", {})
        rt["steps"] += 1
        if sorted(got) != sorted(want):
            rt["bad"].append("step %d: layers %s, torch %s" % (step, sorted(got), sorted(want)))
        for layer, ld in want.items():
            g = got.get(layer)
            if g is None:
                continue
            mine = [float(v) for v in g["load"]] + [float(g["dropped"])]
            if mine != ld:
                rt["bad"].append("step %d %s: moec load %s dropped %s, torch %s dropped %s" %
                                 (step, layer, g["load"], g["dropped"], ld[:-1], ld[-1]))
            if step == 1:
                rt["drops"] += int(ld[-1])
        for name, v in stats.get("named", {}).items():
            if name not in rec:
                rt["aux_bad"].append("step %d: %s not logged" % (step, name))
                continue
            e = abs(rec[name] - v / A) / max(abs(v / A), 1e-12)
            rt["aux_worst"] = max(rt["aux_worst"], e)
            if e > cfg.curve_tol:
                rt["aux_bad"].append("step %d %s: moec %.9g torch %.9g" % (step, name, rec[name], v / A))
    worst_curve, worst_lr, worst_norm = 0.0, 0.0, 0.0
    for i, st in enumerate(steps):
        step = st["step"]
        stats = {}
        loss_sum = 0.0
        opt.zero_grad(set_to_none=True)
        for a in range(A):
            tok, tgt = bt[i * A + a, 0], bt[i * A + a, 1]
            loads = {}
            loss = forward(p, tok, tgt, cfg, stats, loads)
            (loss / A).backward()
            loss_sum += float(loss)
        loss_t = loss_sum / A
        if mrec is not None:
            compare_routing(step, stats, mrec.get(step), A)
        err = abs(loss_t - st["loss"]) / abs(loss_t)
        if i == 0:
            res["loss1"] = loss_t
            res["loss1_rel"] = err
            res["dropped_slots_step1"] = stats.get("dropped", 0)
            check("step1_loss", err <= cfg.loss_tol,
                  "moec %.9g torch %.9g rel %.3g > %g" % (st["loss"], loss_t, err, cfg.loss_tol))
            if cfg.expect_drops:
                check("capacity_drops", stats.get("dropped", 0) > 0,
                      "no slot was dropped at step 1; the capacity path is not covered")
            worst, wname, bad = 0.0, "", []
            for n in trained:
                r = rel(grads[n], p[n].grad)
                a = float(torch.linalg.vector_norm(grads[n].double() - p[n].grad.double()))
                if a <= cfg.grad_atol:   # a gradient that is zero in exact arithmetic
                    continue
                if r > worst:
                    worst, wname = r, n
                if not r <= cfg.grad_tol:
                    bad.append("%s %.3g (|g| %.3g)" % (n, r, float(p[n].grad.norm())))
            res["grad_worst_rel"], res["grad_worst_param"] = worst, wname
            res["nparams"] = len(pnames)
            check("step1_grads", not bad,
                  "relative gradient error > %g: %s" % (cfg.grad_tol, ", ".join(bad)))
        else:
            worst_curve = max(worst_curve, err)
        lr = lr_at(h, step)
        worst_lr = max(worst_lr, abs(lr - st["lr"]) / lr)
        lr32 = float(torch.tensor(lr, dtype=torch.float32))  # the runtime's hyper is fp32
        for g in opt.param_groups:
            g["lr"] = lr32
        max_norm = h["clip_grad"] if h["clip_grad"] > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_([p[n] for n in trained], max_norm))
        if st["norm"] >= 0:
            worst_norm = max(worst_norm, abs(norm - st["norm"]) / norm)
        opt.step()
        # aux-loss-free bias: bias += rate * sign(mean load - load), last micro-batch's load
        with torch.no_grad():
            for n in buffers:
                if cfg.bias_rate > 0 and n.endswith(".bias"):
                    ld = loads[n[:-len("bias")]]
                    d = ld.mean() - ld
                    p[n] += (torch.sign(d) * cfg.bias_rate).float()
    if mrec is not None:
        res["routing_steps"], res["dropped_slots_step1_by_layer"] = rt["steps"], rt["drops"]
        res["aux_worst_rel"] = rt["aux_worst"]
        check("routing_load", rt["steps"] == len(steps) and not rt["bad"],
              "%d of %d steps compared; %s" % (rt["steps"], len(steps), "; ".join(rt["bad"][:4])))
        check("aux_losses", not rt["aux_bad"], "; ".join(rt["aux_bad"][:4]))
    res["steps"] = len(steps)
    res["curve_worst_rel"] = worst_curve
    res["lr_worst_rel"] = worst_lr
    res["norm_worst_rel"] = worst_norm
    check("lr_schedule", worst_lr <= 1e-6, "lr differs from warmup+cosine by %.3g" % worst_lr)
    check("loss_curve", worst_curve <= cfg.curve_tol,
          "steps 2..%d: worst relative loss error %.3g > %g" % (len(steps), worst_curve,
                                                                cfg.curve_tol))
    check("grad_norm", worst_norm <= cfg.curve_tol,
          "worst relative grad-norm error %.3g > %g" % (worst_norm, cfg.curve_tol))
    print("RESULT " + json.dumps(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
