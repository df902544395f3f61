"""XLA's memory statistics of the decode-loop program, per attention mode: does the
compiled loop copy the KV cache (temp bytes near the cache's size, `copy` ops of its
shape in the optimized HLO) instead of updating it in place?

    python bench/decode_memory.py --models smollm2-135m --rows 1,32 --steps 8

Random weights at real shapes; a cache of --pages pages so a copy is easy to see."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_gpu import config_for  # noqa: E402
from bench.bench_layers import ViewWeights  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--rows", default="1,32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default="dynamic,dense")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--pages", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    from jaxrt.compiler import compile_loaded
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for name in args.models.split(","):
        config = config_for(name, args.max_model_len)
        loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                                 chat_template=None, source=f"random:{name}")
        model = compile_loaded(loaded, max_model_len=args.max_model_len,
                               max_num_seqs=max(rows_list), max_num_batched_tokens=512,
                               num_pages=args.pages)
        exe = model.executable()
        kv = exe._kv_struct
        kv_bytes = kv.size * kv.dtype.itemsize
        dims = ",".join(str(d) for d in kv.shape)
        mp = -(-args.max_model_len // exe.page_size)
        for rows in rows_list:
            for mode in args.modes.split(","):
                os.environ["JAXRT_DECODE_ATTENTION"] = mode
                exe._programs._compiled.pop(("decode", rows, mp, args.steps), None)
                start = time.perf_counter()
                exe.compile_decode(rows, mp, args.steps)
                seconds = time.perf_counter() - start
                compiled = exe._programs._compiled[("decode", rows, mp, args.steps)]
                m = compiled.memory_analysis()
                hlo = compiled.as_text()
                kv_copies = len(re.findall(r"\[" + dims + r"\][^=]*= *copy\(|"
                                           r"= *\w+\[" + dims + r"\][^ ]* copy\(", hlo))
                row = {"model": name, "rows": rows, "steps": args.steps, "mode": mode,
                       "compile_s": round(seconds, 2), "kv_MiB": kv_bytes / 2**20,
                       "temp_MiB": m.temp_size_in_bytes / 2**20,
                       "alias_MiB": m.alias_size_in_bytes / 2**20,
                       "kv_shape_copies": kv_copies, "whiles": hlo.count(" while("),
                       "xla_flags": os.environ.get("XLA_FLAGS", "")}
                results.append(row)
                print(json.dumps(row), flush=True)
        del exe, model
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
