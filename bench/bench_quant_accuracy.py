"""Accuracy of the quantize pass's modes against float, on real models (CPU, float32).

For each model and mode: perplexity over bench/data/english.txt (jaxrt.perplexity, one
window when the text fits the context), and greedy agreement with the float model over
the first 32 new tokens of a few prompts (tokens equal before the first divergence, and
how many prompts agree on all 32). Prints a table and writes JSON.

w8a8-smoothquant calibrates data-free (the model's own samples, jaxrt/calibration.py);
`w8a8-smoothquant:text` calibrates on --calib-text (bench/data/calibration.txt, other
prose than the evaluated text). `MODE:gptq-text` / `MODE:gptq-free` take MODE's weight
codes from GPTQ (jaxrt/gptq.py) calibrated on --calib-text / data-free; modes of one code
dtype share one calibration (a row's `calibration_seconds` is 0 when it reused one).

    PYTHONPATH=. python bench/bench_quant_accuracy.py [--models smollm2-135m gemma3-270m]
        [--modes int8-weight fp8-weight w8a8 fp8 w8a8-smoothquant w8a8-smoothquant:text
                 int8-weight:gptq-text w8a8:gptq-text fp8-weight:gptq-text fp8:gptq-text
                 fp8-weight:gptq-free]
        [--out bench/results/quant_accuracy_cpu.json] [--merge]

--merge keeps the rows already in --out and replaces (or adds) only the measured ones,
float included (its greedy tokens are every row's reference, so it always runs).
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
    from jaxrt.passes.quantize import MODES
    rows, float_out = [], None
    gptq_cals: dict[tuple, tuple[str, dict]] = {}  # (code dtype, text?) -> (dir, meta)
    for mode in ["", *modes]:
        start = time.perf_counter()
        quantize, _, calib_on = mode.partition(":")
        calib, extra = "", {}
        if calib_on == "text":
            calib = tempfile.mkdtemp(prefix="calib-")
            calibrate_loaded(loaded, calib, data=calib_text)
        elif calib_on in ("gptq-text", "gptq-free"):
            key = (MODES[quantize][0], calib_on)
            fresh = key not in gptq_cals
            if fresh:
                calib = tempfile.mkdtemp(prefix="gptq-")
                meta = calibrate_loaded(loaded, calib, gptq=quantize,
                                        data=calib_text if calib_on == "gptq-text" else None)
                gptq_cals[key] = calib, meta
            calib, meta = gptq_cals[key]
            extra = {"calibration_tokens": meta["tokens"],
                     "calibration_seconds": round(time.perf_counter() - start, 1) if fresh
                     else 0.0, "gptq_seconds": meta["gptq"]["seconds"]}
        model = compile_loaded(loaded, target=Target("cpu", 4 << 30, "f32"),
                               max_model_len=need, num_pages=math.ceil(need / 16),
                               max_num_seqs=1, quantize=quantize, calib=calib,
                               quant_method="gptq" if calib_on.startswith("gptq") else "rtn")
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
                     "prompts": len(prompts), "seconds": round(time.perf_counter() - start, 1),
                     **extra})
        base = rows[0]["ppl"]
        r = rows[-1]
        print(f"{spec:14s} {r['mode']:20s} ppl {r['ppl']:9.4f} ({(r['ppl'] / base - 1) * 100:+6.2f}%)"
              f"  greedy prefix {r['greedy_prefix_mean']:5.1f}/{NEW_TOKENS}, "
              f"{r['greedy_all_32']}/{len(prompts)} identical  [{r['seconds']} s]",
              flush=True)
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with each (model, mode) of `new` replaced in place, or added after its
    model's last row (the model's rows at the end when it had none)."""
    out = list(old)
    for r in new:
        same = [i for i, o in enumerate(out) if (o["model"], o["mode"]) == (r["model"],
                                                                            r["mode"])]
        if same:
            out[same[0]] = r
            continue
        of_model = [i for i, o in enumerate(out) if o["model"] == r["model"]]
        out.insert(of_model[-1] + 1 if of_model else len(out), r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--modes", nargs="+", default=[
        "int8-weight", "fp8-weight", "w8a8", "fp8", "w8a8-smoothquant", "w8a8-smoothquant:text",
        "int8-weight:gptq-text", "w8a8:gptq-text", "fp8-weight:gptq-text", "fp8:gptq-text",
        "fp8-weight:gptq-free"])
    p.add_argument("--text", default=os.path.join(HERE, "data", "english.txt"))
    p.add_argument("--calib-text", default=os.path.join(HERE, "data", "calibration.txt"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quant_accuracy_cpu.json"))
    p.add_argument("--merge", action="store_true",
                   help="keep --out's other rows; replace or add the measured ones")
    args = p.parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    with open(args.calib_text, encoding="utf-8") as f:
        calib_text = f.read()
    rows = []
    for spec in args.models:
        rows += measure(spec, args.modes, text, calib_text)
    if args.merge and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            rows = merge_rows(json.load(f)["rows"], rows)
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
