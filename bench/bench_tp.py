"""Tensor parallelism: decode tok/s at tp = 1..N on one host's GPUs, random weights at
real shapes (speed does not depend on values), and greedy equality across tp.

    python bench/bench_tp.py --model llama-3.1-8b --tp 1,2,4,8 --out $OUT/tp.json
    python bench/bench_tp.py --model tiny --tp 1,2,4 --fake-devices 4   # CPU check

Per tp: weights and KV cache bytes per device, warm-up seconds, batch-1 decode tok/s
(one prompt), batch-B decode tok/s (B prompts at once: generated tokens / decode time
after the first token), and the share of the batch's greedy tokens equal to tp=1's
(random weights in bf16 have near-ties, so a split reduction order may flip a few late
tokens; in f32 on the tiny model every token matches). tp=1 runs without the shard pass:
the single-device path, today's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b",
                   help="smollm2-135m, llama-3.2-1b, llama-3.1-8b (bench/bench_gpu.py) or "
                        "tiny (a 2-layer model for a CPU check)")
    p.add_argument("--tp", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto")
    p.add_argument("--fake-devices", type=int, default=0,
                   help="run on N fake CPU devices (XLA_FLAGS, set before JAX starts)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "tp.json"))
    return p.parse_args()


def _config(name: str, max_len: int):
    from jaxrt.frontends.config import ModelConfig
    if name == "tiny":
        return ModelConfig(arch="llama", vocab_size=256, hidden_size=64,
                           intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                           head_dim=8, max_position=max_len, model_type="tiny")
    from bench.bench_gpu import config_for
    return config_for(name, max_len)


def _decode_rate(outputs) -> float:
    """Generated tokens after each request's first / the span from the first first token
    to the last token: the decode rate of the whole batch."""
    start = min(o.token_times[0] for o in outputs)
    end = max(o.token_times[-1] for o in outputs)
    return sum(len(o.ids) - 1 for o in outputs) / max(end - start, 1e-9)


def run_tp(tp: int, args, config, weights, prompts) -> tuple[dict, list[list[int]]]:
    from jaxrt.compiler import compile_loaded, layers_choice
    from jaxrt.ir.sharding import device_bytes, mesh_of, spec_of
    from jaxrt.ir.weights import resident_weights
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    loaded = SimpleNamespace(config=config, weights=weights, tokenizer=None,
                             chat_template=None, source=f"random:{args.model}")
    model = compile_loaded(loaded, max_model_len=args.max_model_len,
                           max_num_seqs=max(args.batch, 1), tensor_parallel=tp,
                           max_num_batched_tokens=max(512, args.input_len),
                           outline_layers=layers_choice(args.layers))
    m = model.module
    mesh = mesh_of(m)
    weight_bytes = sum(device_bytes(m.weights[n], spec_of(m, n), mesh)
                       for n in resident_weights(m))
    plan = model.kv_plan
    exe = model.executable()
    engine = Engine(exe, eos_token_ids=(), max_num_seqs=max(args.batch, 1),
                    decode_steps=args.decode_steps, warmup=True, log=None)
    warm = engine.stats().warmup_seconds
    greedy = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))
    b1 = _decode_rate(engine.generate(prompts[:1], greedy))
    t0 = time.perf_counter()
    outs = engine.generate(prompts, greedy)
    wall = time.perf_counter() - t0
    row = {"tp": tp, "device_weight_bytes": weight_bytes,
           "device_kv_cache_bytes": plan.get("device_cache_bytes", plan["cache_bytes"]),
           "num_pages": plan["num_pages"], "warmup_s": warm, "decode_tok_s_b1": b1,
           f"decode_tok_s_b{len(prompts)}": _decode_rate(outs),
           f"wall_s_b{len(prompts)}": wall,
           "compiles_after_warmup": engine.stats().compiles_after_warmup}
    engine.close()
    return row, [o.ids for o in outs]


def main():
    args = _args()
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.fake_devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from bench.bench_layers import ViewWeights
    from jaxrt.runtime.benchmark import Workload

    config = _config(args.model, args.max_model_len)
    weights = ViewWeights(config)
    prompts = Workload(args.batch, args.input_len, args.output_len).prompts(config.vocab_size)
    tps = [int(x) for x in args.tp.split(",")]
    devices = jax.devices()
    report = {"jax": jax.__version__, "device": devices[0].device_kind,
              "devices": len(devices), "model": args.model, "batch": args.batch,
              "input_len": args.input_len, "output_len": args.output_len, "runs": []}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    base = None
    for tp in tps:
        if tp > len(devices):
            print(f"tp={tp}: skipped, {len(devices)} devices", flush=True)
            continue
        row, ids = run_tp(tp, args, config, weights, prompts)
        if base is None:
            base = ids
        same = sum(a == b for x, y in zip(ids, base) for a, b in zip(x, y))
        row["greedy_tokens_equal_to_first_tp"] = same / sum(len(x) for x in base)
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
    b = f"decode_tok_s_b{args.batch}"
    print(f"\n{'tp':>3} {'weights/dev':>12} {'kv/dev':>10} {'b1 tok/s':>10} "
          f"{'b' + str(args.batch) + ' tok/s':>12} {'greedy eq':>9}")
    for r in report["runs"]:
        print(f"{r['tp']:>3} {r['device_weight_bytes'] / 2**20:>10.1f}Mi "
              f"{r['device_kv_cache_bytes'] / 2**20:>8.1f}Mi {r['decode_tok_s_b1']:>10.1f} "
              f"{r[b]:>12.1f} {r['greedy_tokens_equal_to_first_tp']:>9.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
