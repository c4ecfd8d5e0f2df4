#!/usr/bin/env python3
"""expert_heatmap.py - expert load over training as a PNG heat map.

    tools/expert_heatmap.py metrics.jsonl out.png

Reads the JSONL metrics `run` writes (one object per step; each MoE layer's
per-expert load under "routing" -> "<layer>" -> "load") and draws, for every
MoE layer, a band of rows (one per expert) over columns (one per step); the
colour is the expert's share of the layer's routed slots relative to a
uniform share (1.0 = balanced, 0 = dead).  With matplotlib (Debian
python3-matplotlib) the plot has axes and a colour bar; without it a plain
PNG is written by this script itself (no labels) and a note says so.
"""
import json
import struct
import sys
import zlib


def read_loads(path):
    steps, layers = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"expert_heatmap: {path}:{n}: not JSON ({e})")
            routing = rec.get("routing")
            if not routing:
                continue
            steps.append(rec.get("step", len(steps) + 1))
            for name, r in routing.items():
                layers.setdefault(name, []).append(r["load"])
    if not steps:
        sys.exit(f"expert_heatmap: {path} has no \"routing\" entries; train a plan with MoE layers "
                 "(each step's line then carries the per-expert load)")
    return steps, layers


def relative(loads):
    """rows = experts, columns = steps; load / (total / experts)"""
    experts = len(loads[0])
    cols = []
    for l in loads:
        total = sum(l)
        cols.append([x * experts / total if total > 0 else 0.0 for x in l])
    return [[cols[s][e] for s in range(len(cols))] for e in range(experts)]


def colour(v, vmax):
    t = max(0.0, min(1.0, v / vmax))
    # dark blue (dead) -> white (balanced, t = 0.5) -> dark red (overloaded)
    if t < 0.5:
        u = t / 0.5
        return (int(20 + 235 * u), int(40 + 215 * u), int(120 + 135 * u))
    u = (t - 0.5) / 0.5
    return (255, int(255 - 215 * u), int(255 - 235 * u))


def write_png(path, rows, cell=6, gap=4):
    """rows: list of bands (one per layer), each a list of expert rows of values"""
    vmax = 2.0
    width = max(len(r[0]) for r in rows) * cell
    lines = []
    for b, band in enumerate(rows):
        if b:
            lines += [[(0, 0, 0)] * width] * gap
        for er in band:
            px = []
            for v in er:
                px += [colour(v, vmax)] * cell
            px += [(0, 0, 0)] * (width - len(px))
            lines += [px] * cell
    raw = b"".join(b"\x00" + bytes(c for p in line for c in p) for line in lines)

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, len(lines), 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: expert_heatmap.py metrics.jsonl out.png")
    steps, layers = read_loads(argv[1])
    names = sorted(layers)
    bands = [relative(layers[n]) for n in names]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(argv[2], bands)
        print(f"expert_heatmap: matplotlib is not installed (Debian: python3-matplotlib); wrote a "
              f"plain heat map without labels to {argv[2]}: {len(names)} layers top to bottom "
              f"({', '.join(names)}), one row per expert, one column per logged step "
              f"({steps[0]}..{steps[-1]}); white = balanced, blue = underused, red = overloaded")
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1 + 0.25 * sum(len(b) for b in bands)),
                             squeeze=False)
    for ax, name, band in zip(axes[:, 0], names, bands):
        im = ax.imshow(band, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, len(band) - 0.5, -0.5))
        ax.set_ylabel(f"{name}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / uniform share")
    fig.savefig(argv[2], dpi=100)
    print(f"expert_heatmap: wrote {argv[2]} ({len(names)} layers, {len(steps)} steps)")


if __name__ == "__main__":
    main(sys.argv)
