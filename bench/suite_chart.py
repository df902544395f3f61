"""The GPU suite's chart (bench/bench_suite.py): output tok/s against batch size, log-log,
one line per model for jaxrt, each model's roofline, and the peers' points.

    python bench/bench_suite.py --chart-only --results suite.json --peers peer_jax.json \
        --chart bench/results/suite_chart.png

Needs matplotlib (the `bench` extra) and nothing from the GPU: the chart redraws on a CPU
from saved JSON. Peers come from `shared/peers/peer_gpu.py`: the JSON list it writes to
$OUT/peer_<part>.json, or its stdout (JSON lines, other lines skipped). Their records
`{model, peer, batch, tok_s}` are points; records without them (copy bandwidth, weight
bytes, a peer's error) are not.
"""
from __future__ import annotations

import json
import math
import os

PEER_MARKERS = {"hf-eager": "x", "hf-static-compile": "^", "jax-plain-scan": "s"}
PEER_LABELS = {"hf-eager": "transformers eager", "hf-static-compile":
               "transformers static cache + compile", "jax-plain-scan": "plain JAX loop"}


def load_peer_records(path: str) -> list[dict]:
    """Every JSON object in `path`: a JSON list or object (peer_<part>.json, or a suite
    result carrying "peers"), else one object per line where a line parses as one."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a log line that happens to start with a brace
    if isinstance(data, dict):
        data = data.get("peers", [data])
    return [r for r in data if isinstance(r, dict)]


def peer_points(records: list[dict]) -> list[dict]:
    """The records that are measurements: {model, peer, batch, tok_s} with a positive
    batch and a finite positive rate, in the order given."""
    points = []
    for r in records:
        batch, rate = r.get("batch"), r.get("tok_s")
        if not (isinstance(r.get("model"), str) and isinstance(r.get("peer"), str)):
            continue
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            continue
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not math.isfinite(rate) or rate <= 0:
            continue
        points.append({"model": r["model"], "peer": r["peer"], "batch": batch,
                       "tok_s": float(rate)})
    return points


def load_peers(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        out += peer_points(load_peer_records(p))
    return out


def roofline(batch: float, model: dict) -> float:
    """Output tok/s bound at `batch` running sequences: the weights streamed once per step
    (batch x copy bandwidth / weight bytes), capped by the matmul peak (peak / 2 FLOPs per
    weight parameter per token). KV-cache reads and attention are left out: an upper
    bound."""
    return min(batch * model["roofline_tok_s_b1"], model["compute_ceiling_tok_s"])


def draw(results: dict, peers: list[dict], path: str) -> str:
    """Write the chart to `path` (PNG); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = [m for m in results.get("models", []) if m.get("decode")]
    batches = sorted({d["batch"] for m in models for d in m["decode"]} |
                     {p["batch"] for p in peers}) or [1]
    lo, hi = min(batches), max(batches)
    xs = [lo * (hi / lo) ** (i / 64) for i in range(65)] if hi > lo else [lo]
    names = [m["model"] for m in models]
    names += sorted({p["model"] for p in peers} - set(names))
    color = {n: colors[i % len(colors)] for i, n in enumerate(names)}
    for m in models:
        c = color[m["model"]]
        rows = sorted((d for d in m["decode"] if d.get("output_tok_s")),
                      key=lambda d: d["batch"])
        ax.plot([d["batch"] for d in rows], [d["output_tok_s"] for d in rows], "o-",
                color=c, lw=2, label=f"jaxrt {m['model']}")
        if "roofline_tok_s_b1" in m and "compute_ceiling_tok_s" in m:
            ax.plot(xs, [roofline(x, m) for x in xs], "--", color=c, lw=1, alpha=0.7)
        off = (m.get("offline") or {}).get("output_tok_s")
        if off:
            ax.plot([m["offline"]["max_num_seqs"]], [off], "*", color=c, ms=12, mfc="none")
    for p in peers:
        ax.plot([p["batch"]], [p["tok_s"]], PEER_MARKERS.get(p["peer"], "d"),
                color=color[p["model"]], ms=8, mfc="none", mew=1.5)
    # the legend's second part: what the line styles and markers mean
    from matplotlib.lines import Line2D
    shapes = results.get("shapes", {})
    il, ol = shapes.get("input_len", 128), shapes.get("output_len", 128)
    keys = [Line2D([], [], ls="--", color="gray", label="roofline (weights / copy bandwidth,"
                   " capped by matmul peak)")]
    if any((m.get("offline") or {}).get("output_tok_s") for m in models):
        keys.append(Line2D([], [], marker="*", ls="", color="gray", mfc="none", ms=10,
                           label=f"jaxrt offline {shapes.get('offline_requests', 512)} x "
                                 f"{il}/{ol}"))
    for peer in dict.fromkeys(p["peer"] for p in peers):
        keys.append(Line2D([], [], marker=PEER_MARKERS.get(peer, "d"), ls="", color="gray",
                           mfc="none", label=PEER_LABELS.get(peer, peer)))
    first = ax.legend(loc="upper left", fontsize=8)
    ax.add_artist(first)
    ax.legend(handles=keys, loc="lower right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("concurrent requests (batch)")
    ax.set_ylabel(f"output tok/s ({il}-token prompts, {ol} new tokens)")
    dev = results.get("device", "?")
    bw, peak = results.get("copy_bandwidth_GBps"), results.get("bf16_matmul_TFLOPs")
    sub = f" (copy {bw:.4g} GB/s, bf16 matmul {peak:.3g} TFLOP/s)" if bw and peak else ""
    ax.set_title(f"jaxrt decode on {dev}{sub}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
