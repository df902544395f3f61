"""Where a bucket's compile time goes: Python tracing, lowering to StableHLO, XLA compile
(or the persistent cache's load), per bucket, sequentially.

    JAXRT_CACHE_DIR=/tmp/jc python bench/bench_compile_stages.py --model llama-3.1-8b \
        --layers unrolled --out $OUT/stages.json

Run it twice with one JAXRT_CACHE_DIR: the second run shows the warm start, where tracing
and lowering (which hold the GIL, so threads do not overlap them) are all that is left
besides loading. Random weights at the real shapes; no weights are placed (compiling
needs only their types).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_gpu import config_for  # noqa: E402
from bench.bench_layers import ViewWeights  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--buckets", default="1x1x1,64x64x1,512x32x16",
                   help="TxSxQ per bucket (N = S, MP from max-model-len)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    from jaxrt.compiler import compile_loaded, layers_choice
    config = config_for(args.model, args.max_model_len)
    loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{args.model}")
    model = compile_loaded(loaded, max_model_len=args.max_model_len, max_num_seqs=64,
                           max_num_batched_tokens=512, num_pages=1024,
                           outline_layers=layers_choice(args.layers))
    exe = model.executable(wait=False)
    mp = -(-args.max_model_len // exe.page_size)
    rows = []
    for spec in args.buckets.split(","):
        T, S, Q = (int(x) for x in spec.split("x"))
        t0 = time.perf_counter()
        traced = exe._programs.trace_step((T, S, Q, mp, S), exe._weight_structs,
                                          exe._kv_struct)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
        rows.append({"bucket": [T, S, Q, mp, S], "trace_s": t1 - t0, "lower_s": t2 - t1,
                     "compile_s": t3 - t2})
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.model, "layers": args.layers,
           "device": jax.devices()[0].device_kind, "rows": rows,
           "xla_cache": os.environ.get("JAXRT_CACHE_DIR", "~/.cache/jaxrt")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
