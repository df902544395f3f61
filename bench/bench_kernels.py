"""The Pallas kernels inside an engine, on against off (issue 12): one process builds the
same model twice, with `JAXRT_KERNELS=off` (XLA only) and `=on` (the Mosaic GPU ragged
paged attention where it applies), and compares what a user sees.

    python bench/bench_kernels.py --models llama-3.2-1b,smollm2-135m --out $OUT/kernels.json

Per model and mode:
- logits of one 256-token prefill step (every row) and of one decode step after it,
  compared between the modes (max |diff| / max |logit|, and argmax agreement);
- `Engine(exe)` construction with its blocking warm-up (seconds, buckets);
- greedy token ids of 8 prompts x 32 tokens, batched, compared between the modes
  (identical rows; the first divergence);
- batch-1 and batch-64 output tok/s (128/128; bench_suite's decode_point);
- one 2,048-token prefill step as MFU against the matmul peak measured in the run.
A model name is a random-weights shape of bench/bench_gpu.py, or `real:SPEC` for a model
`jaxrt.load` reads (e.g. real:smollm2-135m), in bf16.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_suite import FULL, TINY, copy_bandwidth, decode_point, matmul_peak, \
    prefill_mfu  # noqa: E402


def build(name: str, max_len: int, max_num_seqs: int, quantize: str = ""):
    """(executable, config) of `name` with the current JAXRT_KERNELS (and `quantize`, a
    `-q` mode, for the random-weight shapes)."""
    from jaxrt.compiler import compile_loaded, load
    if name.startswith("real:"):
        model = load(name[5:], dtype="bfloat16", max_model_len=max_len,
                     max_num_seqs=max_num_seqs)
    else:
        from bench.bench_layers import ViewWeights
        from bench.bench_suite import model_config
        config = model_config(name, max_len)
        loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                                 chat_template=None, source=f"random:{name}")
        model = compile_loaded(loaded, max_model_len=max_len, max_num_seqs=max_num_seqs,
                               quantize=quantize)
    exe = model.executable()
    return exe, model.config


def step_logits(exe, config, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(f32 logits of every row of an n-token prefill step, of one decode step after it)."""
    import jax
    rng = np.random.default_rng(1)
    tokens = rng.integers(16, config.vocab_size, n + 1).astype(np.int32)
    pos = np.arange(n, dtype=np.int32)
    pages = np.arange(-(-(n + 1) // exe.page_size), dtype=np.int32)[None]
    prefill = exe.run(tokens[:n], pos, pos, pages, np.asarray([n], np.int32), pos[None],
                      pos)
    prefill = np.asarray(jax.device_get(prefill), np.float32)
    one = np.asarray([n], np.int32)
    decode = exe.run(tokens[n:], one, one, pages, np.asarray([n + 1], np.int32),
                     np.zeros((1, 1), np.int32), np.zeros(1, np.int32))
    return prefill, np.asarray(jax.device_get(decode), np.float32)


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_diff_over_max_abs": float(np.abs(a - b).max() / np.abs(a).max()),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def run_mode(name: str, mode: str, args, bw: float, peak: float) -> tuple[dict, dict]:
    from jaxrt.lowering.pallas import default_backends
    from jaxrt.runtime.benchmark import Workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams
    os.environ["JAXRT_KERNELS"] = mode
    s = args.shapes
    row: dict = {"model": name, "kernels": mode, "backends": list(default_backends())}
    t0 = time.perf_counter()
    batches = (1, 16) if args.tiny else (1, 64)
    exe, config = build(name, s.max_model_len, max(batches))
    row["load_s"] = time.perf_counter() - t0
    keep: dict = {}
    keep["prefill_logits"], keep["decode_logits"] = step_logits(exe, config,
                                                                s.prefill_len // 8)
    t0 = time.perf_counter()
    eng = Engine(exe, max_num_seqs=max(batches), warmup=True, log=sys.stderr,
                 max_num_batched_tokens=s.engine_budget)
    st = eng.stats()
    row.update(construct_s=time.perf_counter() - t0, engine_warmup_s=st.warmup_seconds,
               buckets=st.num_buckets)
    prompts = Workload(8, s.input_len // 2, 32, seed=3).prompts(config.vocab_size)
    outs = eng.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True,
                                                temperature=0.0))
    keep["greedy"] = [list(o.ids) for o in outs]
    from jaxrt.ir.weights import resident_weights
    wbytes = sum(exe.module.weights[n].nbytes() for n in resident_weights(exe.module))
    roof_b1 = bw / wbytes  # decode reads every resident weight once a step
    for b in batches:
        row[f"decode_b{b}"] = decode_point(eng, b, s, 1, roof_b1, float("inf"))
    row["compiles_after_warmup"] = eng.stats().compiles_after_warmup
    del eng
    gc.collect()
    row["prefill"] = prefill_mfu(exe, config, s.prefill_len, peak)
    del exe
    gc.collect()
    return row, keep


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.2-1b")
    p.add_argument("--modes", default="off,on")
    p.add_argument("--tiny", action="store_true",
                   help="bench_suite's tiny shapes (a CPU smoke run; --models tiny)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "kernels.json"))
    args = p.parse_args(argv)
    import jax
    args.shapes = s = TINY if args.tiny else FULL
    bw, peak = copy_bandwidth(s.copy_mib), matmul_peak(s.matmul)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": peak / 1e12,
              "models": []}
    print(json.dumps(report), flush=True)
    for name in args.models.split(","):
        rows, kept = [], []
        for mode in args.modes.split(","):
            try:
                row, keep = run_mode(name, mode, args, bw, peak)
            except Exception as e:  # noqa: BLE001 - report the other mode anyway
                import traceback
                traceback.print_exc()
                row, keep = {"model": name, "kernels": mode,
                             "error": f"{type(e).__name__}: {str(e)[:1500]}"}, None
            rows.append(row)
            kept.append(keep)
            print(json.dumps(row, default=str)[:1500], flush=True)
        entry = {"model": name, "modes": rows}
        if len(kept) == 2 and all(kept):
            a, b = kept
            entry["prefill_logits"] = compare_logits(a["prefill_logits"], b["prefill_logits"])
            entry["decode_logits"] = compare_logits(a["decode_logits"], b["decode_logits"])
            div = [first_divergence(x, y) for x, y in zip(a["greedy"], b["greedy"])]
            entry["greedy"] = {"identical_rows": sum(d is None for d in div),
                               "rows": len(div), "first_divergence": div}
            print(json.dumps({k: v for k, v in entry.items() if k != "modes"}), flush=True)
        report["models"].append(entry)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"\n{report['device']}: copy {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s")
    print(f"{'model':<20} {'kernels':>7} {'warmup s':>8} {'buckets':>7} {'b1 tok/s':>9} "
          f"{'bN tok/s':>9} {'prefill MFU':>11}")
    for m in report["models"]:
        for r in m["modes"]:
            if "error" in r:
                print(f"{m['model']:<20} {r['kernels']:>7} error: {r['error'][:120]}")
                continue
            widest = [k for k in r if k.startswith("decode_b")][-1]  # b16 tiny, b64 full
            print(f"{m['model']:<20} {r['kernels']:>7} {r['engine_warmup_s']:>8.1f} "
                  f"{r['buckets']:>7} {r['decode_b1']['output_tok_s']:>9.0f} "
                  f"{r[widest]['output_tok_s']:>9.0f} {r['prefill']['mfu']:>11.1%}")
        if "greedy" in m:
            print(f"  parity: prefill logits {m['prefill_logits']}, decode logits "
                  f"{m['decode_logits']}, greedy {m['greedy']['identical_rows']}/"
                  f"{m['greedy']['rows']} rows identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
