"""Prefill MFU with the Pallas attention kernel off and on (issue 12, deliverable 4).

    python bench/bench_prefill.py --out $OUT/prefill.json            # GPU: 1B and 8B shapes
    python bench/bench_prefill.py --tiny --out /tmp/prefill.json     # CPU smoke (XLA only)
    python bench/bench_prefill.py --modes on --quantize ,fp8,w8a8   # quantized prefill vs bf16

Per model (random weights at the real shape, bf16 on a GPU) and per `JAXRT_KERNELS` mode,
one executable; per prompt length n, one step prefilling an n-token prompt (one sequence,
`bench_suite.prefill_mfu`: the median of 5 timed steps, MFU against the bf16 matmul peak
measured in the same run, FLOPs as bench_suite's docstring counts them). The last
position's logits of the two modes are compared (max |diff| over max |logit|, argmax).
A prompt of n tokens is one row of n queries; with the kernel on, the lowering splits it
into kernel rows of 64 / (heads / kv_heads) queries, each reading its context only up to
its own last query (`lowering.pallas._paged_attention`).

`--quantize` (comma-separated `-q` modes; the empty mode is float) repeats every model
per mode and prints each quantized mode's prefill tok/s as a multiple of float's at the
same kernel mode and length (issue 13: fp8 W8A8 prefill of 2,048 tokens >= 1.5x bf16).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def last_logits(exe, config, n: int) -> np.ndarray:
    import jax
    from bench.bench_gpu import prefill_args
    return np.asarray(jax.device_get(exe.run(*prefill_args(exe, config, n))), np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--modes", default="off,on")
    p.add_argument("--tokens", default="512,2048")
    p.add_argument("--quantize", default="", help="comma-separated -q modes ('' = float)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on any backend (CPU)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "prefill.json"))
    args = p.parse_args(argv)
    from bench.bench_kernels import build, compare_logits
    from bench.bench_suite import TINY, copy_bandwidth, matmul_peak, prefill_mfu
    import jax
    models = ["tiny"] if args.tiny else args.models.split(",")
    tokens = [64] if args.tiny else [int(n) for n in args.tokens.split(",")]
    peak = matmul_peak(TINY.matmul if args.tiny else 8192)
    report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "matmul_peak_flop_s": peak,
              "copy_bytes_s": copy_bandwidth(TINY.copy_mib if args.tiny else 1024),
              "models": []}
    print(f"{report['device']}: matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    quants = [q.strip() for q in args.quantize.split(",")]
    for name, quant in [(m, q) for m in models for q in quants]:
        row = {"model": name, "quantize": quant, "modes": {}}
        report["models"].append(row)
        logits = {}
        label = f"{name}{' -q ' + quant if quant else ''}"
        for mode in args.modes.split(","):
            os.environ["JAXRT_KERNELS"] = mode
            t0 = time.perf_counter()
            try:
                exe, config = build(name, max(tokens) + 64, 8, quant)
                cell = {"backends": list(exe.backends), "load_s": time.perf_counter() - t0}
                for n in tokens:
                    cell[str(n)] = prefill_mfu(exe, config, n, peak)
                    print(f"{label} kernels={mode} n={n}: {cell[str(n)]['tok_s']:,.0f} tok/s "
                          f"MFU {cell[str(n)]['mfu']:.1%} (step {cell[str(n)]['step_s'] * 1e3:.2f}"
                          f" ms, compile {cell[str(n)]['compile_s']:.1f} s)", flush=True)
                logits[mode] = last_logits(exe, config, max(tokens))
            except Exception as e:  # noqa: BLE001 - report what a GPU run could measure
                cell = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
                print(f"{label} kernels={mode}: {cell['error'][:300]}", flush=True)
            row["modes"][mode] = cell
            exe = None
            gc.collect()
        if len(logits) == 2:
            row["last_logits"] = compare_logits(*logits.values())
            print(f"{label} last-position logits off vs on: {row['last_logits']}", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    for row in report["models"]:
        base = next((r for r in report["models"] if r["model"] == row["model"]
                     and not r["quantize"]), None)
        if not row["quantize"] or base is None:
            continue
        row["speedup_vs_float"] = {}
        for mode, cell in row["modes"].items():
            for n in map(str, tokens):
                ref = base["modes"].get(mode, {}).get(n)
                if n in cell and ref:
                    x = cell[n]["tok_s"] / ref["tok_s"]
                    row["speedup_vs_float"][f"{mode}/{n}"] = x
                    print(f"{row['model']} -q {row['quantize']} kernels={mode} n={n}: "
                          f"{x:.2f}x float's prefill tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
