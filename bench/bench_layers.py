"""Layer stack compiled once (outline-layers + scan) vs unrolled: compile and run times.

    python bench/bench_layers.py --models llama-3.1-8b --modes scan,unrolled --out $OUT/x.json

Per model and mode, with random weights at the real shapes (speed does not depend on the
values): module build + passes, weight placement, the compile time of a decode bucket at
batch 1 and 64 and of a 512-token prefill bucket, and the decode step time at batch 1 and
64 with every sequence 256 tokens into its context (the StepExecutable alone: no engine
or sampler, so the difference is the layer stack's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_gpu import config_for  # noqa: E402


class ViewWeights(dict):
    """Every weight a view of one shared random f32 buffer: real shapes, no 32 GB of
    random numbers to draw for the 8B model."""

    def __init__(self, config):
        from jaxrt.frontends.loaded import expected_weight_shapes
        shapes = expected_weight_shapes(config)
        biggest = max(int(np.prod(s)) for s in shapes.values())
        buf = np.random.default_rng(0).standard_normal(biggest, dtype=np.float32)
        buf *= 0.02
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            w = np.ones(shape, np.float32) if name.endswith("norm.weight") else \
                buf[:n].reshape(shape)
            super().__setitem__(name, w)


def decode_args(exe, batch: int, context: int, mp: int):
    ps = exe.page_size
    per_seq = -(-(context + 1) // ps)
    table = np.zeros((batch, mp), np.int32)
    for s in range(batch):
        table[s, :per_seq] = np.arange(s * per_seq, (s + 1) * per_seq)
    pos = np.full(batch, context, np.int32)
    slots = table[np.arange(batch), context // ps] * ps + context % ps
    return (np.full(batch, 7, np.int32), pos, slots.astype(np.int32), table,
            np.full(batch, context + 1, np.int32), np.arange(batch, dtype=np.int32)[:, None],
            np.arange(batch, dtype=np.int32))


def time_steps(exe, args, n: int = 30) -> float:
    for _ in range(3):
        exe.run(*args)
    exe.run(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(n):
        out = exe.run(*args)
    out.block_until_ready()
    return (time.perf_counter() - t) / n


def bench(name: str, mode: str, max_len: int, weights=None) -> dict:
    from jaxrt.compiler import compile_loaded
    config = config_for(name, max_len)
    weights = weights if weights is not None else ViewWeights(config)
    loaded = SimpleNamespace(config=config, weights=weights, tokenizer=None,
                             chat_template=None, source=f"random:{name}")
    t0 = time.perf_counter()
    model = compile_loaded(loaded, max_model_len=max_len, page_size=16, max_num_seqs=64,
                           max_num_batched_tokens=512, outline_layers=(mode == "scan"))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exe = model.executable()
    place_s = time.perf_counter() - t0
    mp = -(-max_len // 16)
    out = {"model": name, "mode": mode, "build_and_passes_s": build_s, "place_weights_s": place_s,
           "num_pages": exe.num_pages, "compile_s": {}, "decode": {}}
    for b in (1, 64):
        out["compile_s"][f"decode_b{b}"] = exe.compile_for(b, b, 1, mp, b)
    out["compile_s"]["prefill_t512"] = exe.compile_for(512, 32, 16, mp, 32)
    for b in (1, 64):
        step = time_steps(exe, decode_args(exe, b, 256, mp))
        out["decode"][f"b{b}"] = {"step_ms": step * 1e3, "tok_s": b / step}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--modes", default="scan,unrolled")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = []
    for name in args.models.split(","):
        weights = None
        for mode in args.modes.split(","):
            if weights is None:
                weights = ViewWeights(config_for(name, args.max_len))
            results.append(bench(name, mode, args.max_len, weights))
    rows = [f"{'model':14} {'mode':9} {'compile b1/b64/p512 s':>24} {'decode b1 tok/s':>16} "
            f"{'decode b64 tok/s':>17}"]
    for r in results:
        c = r["compile_s"]
        rows.append(f"{r['model']:14} {r['mode']:9} "
                    f"{c['decode_b1']:7.1f} {c['decode_b64']:7.1f} {c['prefill_t512']:7.1f}  "
                    f"{r['decode']['b1']['tok_s']:16.0f} {r['decode']['b64']['tok_s']:17.0f}")
    print("\n".join(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
