"""Accuracy of the quantize pass's modes against float, on real models (CPU, float32).

For each model and mode: perplexity over bench/data/english.txt (jaxrt.perplexity, one
window when the text fits the context), and greedy agreement with the float model over
the first 32 new tokens of a few prompts (tokens equal before the first divergence, and
how many prompts agree on all 32). Prints a table and writes JSON.

w8a8-smoothquant calibrates data-free (the model's own samples, jaxrt/calibration.py);
`w8a8-smoothquant:text` calibrates on --calib-text (bench/data/calibration.txt, other
prose than the evaluated text).

    PYTHONPATH=. python bench/bench_quant_accuracy.py [--models smollm2-135m gemma3-270m]
        [--modes int8-weight fp8-weight w8a8 fp8 w8a8-smoothquant w8a8-smoothquant:text]
        [--out bench/results/quant_accuracy_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

NEW_TOKENS = 32
PROMPTS = ["The capital of France is", "In a small village by the sea, there lived",
           "The three primary colors are", "Water boils at a temperature of",
           "def fibonacci(n):\n    "]
HERE = os.path.dirname(os.path.abspath(__file__))


def measure(spec: str, modes: list[str], text: str, calib_text: str) -> list[dict]:
    import tempfile

    from jaxrt.calibration import calibrate_loaded
    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.frontends.sources import load_model
    from jaxrt.lowering.executable import greedy_generate
    from jaxrt.perplexity import perplexity
    loaded = load_model(spec)
    tok = loaded.tokenizer
    ids = tok.encode_text(text)
    prompts = [tok.encode_text(p) for p in PROMPTS]
    window = min(len(ids), loaded.config.max_position)
    need = max(window, max(len(p) for p in prompts) + NEW_TOKENS)
    rows, float_out = [], None
    for mode in ["", *modes]:
        start = time.perf_counter()
        quantize, _, calib_on = mode.partition(":")
        calib = ""
        if calib_on == "text":
            calib = tempfile.mkdtemp(prefix="calib-")
            calibrate_loaded(loaded, calib, data=calib_text)
        model = compile_loaded(loaded, target=Target("cpu", 4 << 30, "f32"),
                               max_model_len=need, num_pages=math.ceil(need / 16),
                               max_num_seqs=1, quantize=quantize, calib=calib)
        exe = model.executable()
        ppl = perplexity(exe, ids, context=window)
        outs = [greedy_generate(exe, p, NEW_TOKENS) for p in prompts]
        if not mode:
            float_out = outs
        prefix = [next((k for k, (a, b) in enumerate(zip(o, f)) if a != b), len(f))
                  for o, f in zip(outs, float_out)]
        rows.append({"model": spec, "mode": mode or "float", "ppl": ppl.ppl, "nll": ppl.nll,
                     "tokens": ppl.tokens, "windows": ppl.windows,
                     "greedy_prefix_mean": sum(prefix) / len(prefix),
                     "greedy_all_32": sum(p == NEW_TOKENS for p in prefix),
                     "prompts": len(prompts), "seconds": round(time.perf_counter() - start, 1)})
        base = rows[0]["ppl"]
        r = rows[-1]
        print(f"{spec:14s} {r['mode']:12s} ppl {r['ppl']:9.4f} ({(r['ppl'] / base - 1) * 100:+6.2f}%)"
              f"  greedy prefix {r['greedy_prefix_mean']:5.1f}/{NEW_TOKENS}, "
              f"{r['greedy_all_32']}/{len(prompts)} identical  [{r['seconds']} s]",
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--modes", nargs="+", default=["int8-weight", "fp8-weight", "w8a8", "fp8",
                                                  "w8a8-smoothquant", "w8a8-smoothquant:text"])
    p.add_argument("--text", default=os.path.join(HERE, "data", "english.txt"))
    p.add_argument("--calib-text", default=os.path.join(HERE, "data", "calibration.txt"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quant_accuracy_cpu.json"))
    args = p.parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    with open(args.calib_text, encoding="utf-8") as f:
        calib_text = f.read()
    rows = []
    for spec in args.models:
        rows += measure(spec, args.modes, text, calib_text)
    print("\n| model | mode | perplexity | vs float | greedy prefix (of 32) | identical |")
    print("|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        base.setdefault(r["model"], r["ppl"])
        print(f"| {r['model']} | {r['mode']} | {r['ppl']:.3f} | "
              f"{(r['ppl'] / base[r['model']] - 1) * 100:+.2f}% | "
              f"{r['greedy_prefix_mean']:.1f} | {r['greedy_all_32']}/{r['prompts']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"text": os.path.relpath(args.text, os.path.dirname(HERE)),
                   "device": "cpu", "dtype": "f32", "granularity": "channel",
                   "calibration_text": os.path.relpath(args.calib_text, os.path.dirname(HERE)),
                   "new_tokens": NEW_TOKENS, "prompts": PROMPTS, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
