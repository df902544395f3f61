"""Engine start-up at real shapes on one GPU: load, weight placement, bucket warm-up.

    JAXRT_CACHE_DIR=/tmp/jc python bench/bench_warmup.py --model llama-3.1-8b \
        --max-num-seqs 256 --max-num-batched-tokens 4096 --out $OUT/warmup_cold.json

Run it twice with the same JAXRT_CACHE_DIR: the first run compiles every bucket (cold),
the second loads them from JAX's persistent compilation cache (warm). Random weights at
the real shapes (bench_layers.ViewWeights); `--layers unrolled` measures the unrolled
stack for comparison.
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
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--bucket-growth", type=int, default=None)
    p.add_argument("--compile-threads", type=int, default=None,
                   help="threads compiling buckets (default: the Engine's)")
    p.add_argument("--decode-batches", default="1,64",
                   help="after warm-up, decode tok/s at these batch sizes ('' for none)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from jaxrt.compiler import compile_loaded, layers_choice
    from jaxrt.runtime.engine import Engine
    t0 = time.perf_counter()
    config = config_for(args.model, args.max_model_len)
    loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{args.model}")
    model = compile_loaded(loaded, max_model_len=args.max_model_len,
                           max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           outline_layers=layers_choice(args.layers))
    passes_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exe = model.executable()
    place_s = time.perf_counter() - t0
    kwargs = {} if args.bucket_growth is None else {"bucket_growth": args.bucket_growth}
    t0 = time.perf_counter()
    engine = Engine(exe, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=args.max_model_len, log=sys.stderr, warmup=True,
                    compile_threads=args.compile_threads, **kwargs)
    engine_s = time.perf_counter() - t0
    st = engine.stats()
    out = {"model": args.model, "layers": args.layers,
           "outlined": any(op.opdef.name == "scan" for op in model.module.functions["step"].ops), "max_num_seqs": args.max_num_seqs,
           "max_num_batched_tokens": args.max_num_batched_tokens,
           "max_model_len": args.max_model_len, "num_buckets": st.num_buckets,
           "buckets": [list(b) for b in exe.compiled_shapes],
           "passes_s": passes_s, "place_weights_s": place_s, "engine_init_s": engine_s,
           "warmup_s": st.warmup_seconds, "compile_s": st.compile_seconds,
           "compile_threads": engine._compile_threads,
           "device": str(__import__("jax").devices()[0].device_kind),
           "xla_cache": os.environ.get("JAXRT_CACHE_DIR", "~/.cache/jaxrt")}
    from jaxrt.runtime.engine import SamplingParams
    decode = {}
    for b in [int(x) for x in args.decode_batches.split(",") if x]:
        prompts = [[(7 * i + j) % 1000 + 10 for j in range(128)] for i in range(b)]
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        # decode rate: tokens after each request's first, over the time after its first
        steps = [(len(o.token_times) - 1) / (o.token_times[-1] - o.token_times[0]) for o in outs]
        decode[str(b)] = {"decode_tok_s": b * sum(steps) / len(steps), "wall_s": wall}
    out["decode"] = decode
    out["compiles_after_warmup"] = engine.stats().compiles_after_warmup
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
