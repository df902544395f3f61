"""Decode on one GPU as a newcomer gets it: `Engine(exe)` with default arguments except
`decode_steps`, random weights at real shapes (speed does not depend on values).

    python bench/bench_decode.py --models smollm2-135m,llama-3.2-1b,llama-3.1-8b \
        --decode-steps 1,8 --offline llama-3.1-8b --out $OUT/decode.json

Per model and decode_steps value:
- batch-1 decode tok/s of one 128-token prompt generating 128 tokens, against the
  roofline (weight bytes / measured copy bandwidth);
- the per-step profile at batch 1: wall time per token through the engine, the device's
  time per step (the same step program dispatched back to back, no host work between),
  the host's share of the critical path (their difference) and the dispatch call alone;
- warm-up seconds (the step buckets compile once per runner: the first engine pays them).
With --offline, the offline throughput of 512 requests of 128/128 tokens
(max_num_seqs=256, a 4,096-token budget); --profile-offline traces that engine's steps.
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

from bench.bench_gpu import config_for, copy_bandwidth  # noqa: E402
from bench.bench_layers import ViewWeights  # noqa: E402


def device_step_seconds(exe, context: int, mp: int, n: int = 50) -> tuple[float, float]:
    """(device seconds per batch-1 decode step with sampling, host seconds per dispatch):
    the step program dispatched `n` times back to back (the cache is donated, so each
    step waits for the last on the device, not on the host)."""
    import jax
    from jaxrt.runtime.programs import greedy_sampling
    table = np.zeros((1, mp), np.int32)
    table[0, :-(-(context + 1) // exe.page_size)] = np.arange(-(-(context + 1) //
                                                              exe.page_size))
    ps = exe.page_size
    args = (np.asarray([7], np.int32), np.asarray([context], np.int32),
            np.asarray([table[0, context // ps] * ps + context % ps], np.int32), table,
            np.asarray([context + 1], np.int32), np.zeros((1, 1), np.int32),
            np.zeros(1, np.int32), greedy_sampling(1))
    jax.block_until_ready(exe.run_sampled(*args))
    dispatch = 0.0
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        out = exe.run_sampled(*args)
        dispatch += time.perf_counter() - t
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n, dispatch / n


def bench_model(name: str, args, bw: float) -> dict:
    from jaxrt.compiler import compile_loaded
    from jaxrt.runtime.benchmark import Workload, format_table, run_workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    config = config_for(name, args.max_model_len)
    loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{name}")
    t0 = time.perf_counter()
    offline = name in args.offline.split(",")
    model = compile_loaded(loaded, max_model_len=args.max_model_len,
                           max_num_seqs=256 if offline else 32,
                           max_num_batched_tokens=4096 if offline else 512,
                           fuse={"on": True, "off": False}[args.fuse],
                           num_pages=args.num_pages, quantize=args.quantize)
    exe = model.executable()
    from jaxrt.ir.weights import resident_weights
    # what a decode step reads: the weights on the device, at their compute dtype
    weight_bytes = sum(exe.module.weights[n].nbytes() for n in resident_weights(exe.module))
    out = {"model": name, "fuse": args.fuse, "quantize": args.quantize,
           "num_pages": exe.num_pages,
           "weight_bytes": weight_bytes,
           "load_s": time.perf_counter() - t0,
           "roofline_tok_s": bw / weight_bytes, "runs": []}
    prompt = Workload(1, args.input_len, args.output_len).prompts(config.vocab_size)
    mp = -(-args.max_model_len // exe.page_size)
    dev, dispatch = device_step_seconds(exe, args.input_len + args.output_len // 2, mp)
    out["device_step_us"], out["dispatch_us"] = dev * 1e6, dispatch * 1e6
    for k in (int(x) for x in args.decode_steps.split(",")):
        eng = Engine(exe, decode_steps=k, warmup=True, log=sys.stderr)
        warm = eng.stats().warmup_seconds
        eng.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        rates = []
        for _ in range(3):
            (o,) = eng.generate(prompt, SamplingParams(max_tokens=args.output_len,
                                                       ignore_eos=True))
            rates.append((len(o.ids) - 1) / (o.token_times[-1] - o.token_times[0]))
        rate = float(np.median(rates))
        profile = None
        if args.profile:
            from bench.profile_trace import profile_steps
            with profile_steps(eng) as prof:
                eng.generate(prompt, SamplingParams(max_tokens=args.output_len,
                                                    ignore_eos=True))
            profile = prof.analyze()
            print(json.dumps({"model": name, "decode_steps": k, "profile": profile}),
                  flush=True)
        row = {"decode_steps": k, "warmup_s": warm, "decode_tok_s_b1": rate,
               "fraction_of_roofline": rate / out["roofline_tok_s"],
               "wall_per_token_us": 1e6 / rate,
               "host_per_token_us": 1e6 / rate - dev * 1e6, "ttft_s": o.ttft,
               "compiles_after_warmup": eng.stats().compiles_after_warmup,
               "profile": profile}
        if offline:
            eng = Engine(exe, decode_steps=k, max_num_seqs=256, max_num_batched_tokens=4096,
                         warmup=True, log=sys.stderr)
            w = run_workload(eng, Workload(args.offline_requests, 128, 128))
            print(format_table([w]), flush=True)
            row["offline"] = w
            if args.profile_offline:  # the offline engine's steps, traced: which kernels
                from bench.profile_trace import profile_steps  # a batch-256 step runs
                with profile_steps(eng) as prof:
                    run_workload(eng, Workload(256, 128, 16))
                row["offline_profile"] = prof.analyze()
                print(json.dumps({"model": name, "decode_steps": k,
                                  "offline_profile": row["offline_profile"]}), flush=True)
        out["runs"].append(row)
        print(json.dumps({"model": name, **row}, default=str), flush=True)
        del eng
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b,llama-3.1-8b")
    p.add_argument("--decode-steps", default="1,8")
    p.add_argument("--offline", default="", help="models that also run 512 x 128/128")
    p.add_argument("--offline-requests", type=int, default=512)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--fuse", default="on", choices=["on", "off"],
                   help="the fusion passes (fuse-qkv, fuse-gate-up, fuse-add-rmsnorm)")
    p.add_argument("--num-pages", type=int, default=0,
                   help="KV cache pages (0: planned from device memory)")
    p.add_argument("--quantize", default="",
                   help="a quantize mode (e.g. int8-weight): the roofline reads its weights")
    p.add_argument("--profile", action="store_true",
                   help="trace one batch-1 generation per run (bench/profile_trace.py)")
    p.add_argument("--profile-offline", action="store_true",
                   help="with --offline: trace 256 requests of 128/16 tokens on the offline "
                        "engine (256 rows a decode step; bench/profile_trace.py). XLA runs "
                        "kernels one by one while a trace is on: kernel times hold, the "
                        "host's share does not")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "decode.json"))
    args = p.parse_args()
    import jax
    report = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "copy_bandwidth_GBps": (bw := copy_bandwidth()) / 1e9, "models": []}
    print(json.dumps({k: v for k, v in report.items() if k != "models"}), flush=True)
    for name in args.models.split(","):
        report["models"].append(bench_model(name, args, bw))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"{'model':<14} {'steps':>5} {'tok/s b1':>9} {'roofline':>9} {'wall us':>8} "
          f"{'device us':>9} {'host us':>8} {'warmup s':>8} {'offline tok/s':>13}")
    for m in report["models"]:
        for r in m["runs"]:
            off = r.get("offline", {}).get("output_tok_s")
            print(f"{m['model']:<14} {r['decode_steps']:>5} {r['decode_tok_s_b1']:>9.0f} "
                  f"{r['fraction_of_roofline']:>9.0%} {r['wall_per_token_us']:>8.0f} "
                  f"{m['device_step_us']:>9.0f} {r['host_per_token_us']:>8.0f} "
                  f"{r['warmup_s']:>8.1f} {'-' if off is None else round(off):>13}")


if __name__ == "__main__":
    main()
