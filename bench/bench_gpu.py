"""jaxrt on one GPU at real model shapes with random weights (speed does not depend on values).

    python bench/bench_gpu.py --models smollm2-135m,llama-3.2-1b --out $OUT/jaxrt_gpu.json

Per model: load/compile time, single-request prefill and decode tok/s (what `jaxrt generate
--json` reports), the decode roofline (weight bytes / measured copy bandwidth), and the
serving figures: output tok/s at 1, 16 and 64 concurrent requests, and TTFT with a shared
1,024-token prefix, prefix caching on vs off.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrt.frontends.config import ModelConfig, RopeScaling  # noqa: E402

SHAPES = {  # the same shapes as the team's peer baselines (shared/peers/peer_gpu.py)
    "smollm2-135m": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152,
                         tie=True, theta=100000.0),
    "llama-3.2-1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256,
                         tie=True, theta=500000.0),
    "llama-3.1-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256,
                         tie=False, theta=500000.0),
}


def config_for(name: str, max_len: int) -> ModelConfig:
    s = SHAPES[name]
    scaling = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192) if name != "smollm2-135m" else \
        RopeScaling()
    return ModelConfig(arch="llama", vocab_size=s["vocab"], hidden_size=s["hidden"],
                       intermediate_size=s["inter"], num_layers=s["layers"],
                       num_heads=s["heads"], num_kv_heads=s["kv"],
                       head_dim=s["hidden"] // s["heads"], max_position=max_len,
                       rms_eps=1e-5, rope_theta=s["theta"], rope_scaling=scaling,
                       tie_embeddings=s["tie"], model_type=name)


class RandomWeights(dict):
    """Random weights at the real shapes, f32 on the host (cast once when placed)."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        from jaxrt.frontends.loaded import expected_weight_shapes
        rng = np.random.default_rng(seed)
        for name, shape in expected_weight_shapes(config).items():
            if name.endswith("norm.weight"):
                super().__setitem__(name, np.ones(shape, np.float32))
            else:
                w = rng.standard_normal(shape, dtype=np.float32)
                w *= 0.02
                super().__setitem__(name, w)


def copy_bandwidth() -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.ones((1 << 28,), jnp.float32) * 3  # 1 GiB
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        y = f(x)
    y.block_until_ready()
    return n * 2 * x.nbytes / (time.perf_counter() - t)  # read + write


def matmul_peak() -> float:
    import jax
    import jax.numpy as jnp
    k = jax.random.PRNGKey(0)
    a = jax.random.normal(k, (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(k, 1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        c = f(a, b)
    c.block_until_ready()
    return n * 2 * 8192 ** 3 / (time.perf_counter() - t)


def prefill_args(exe, config, n: int) -> tuple:
    """`exe.run` inputs of one step prefilling an n-token random prompt (one sequence,
    pages 0.., the last position's logits)."""
    pos = np.arange(n, dtype=np.int32)
    pages = np.arange(-(-n // exe.page_size), dtype=np.int32)[None]
    tokens = np.random.default_rng(0).integers(16, config.vocab_size, n).astype(np.int32)
    return (tokens, pos, pos, pages, np.asarray([n], np.int32), pos[None],
            np.asarray([n - 1], np.int32))


def prefill_mfu(exe, config, n: int, params: float, peak: float) -> dict:
    """One step prefilling an n-token prompt; MFU counts 2 * params * n matmul flops plus
    causal attention (2 * 2 * layers * heads * head_dim * n^2 / 2) over the measured peak."""
    args = prefill_args(exe, config, n)
    compile_s = exe.compile_for(n, 1, n, args[3].shape[1], 1)
    exe.run(*args).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        exe.run(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    step = float(np.median(times))
    flops = 2 * params * n + 2 * config.num_layers * config.num_heads * config.head_dim * n * n
    return {"tokens": n, "step_s": step, "tok_s": n / step, "mfu": flops / step / peak,
            "compile_s": compile_s}


def bench_model(name: str, args, bw: float, peak: float) -> dict:
    from types import SimpleNamespace

    from jaxrt.compiler import compile_loaded
    from jaxrt.runtime.benchmark import Workload, format_table, run_workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    max_len = args.prefix_len + args.input_len + args.output_len
    config = config_for(name, max_len)
    t0 = time.perf_counter()
    weights = RandomWeights(config)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = SimpleNamespace(config=config, weights=weights, tokenizer=None,
                             chat_template=None, source=f"random:{name}")
    model = compile_loaded(loaded, max_model_len=max_len, page_size=args.page_size, max_num_seqs=max(int(c) for c in args.concurrency.split(",")),
                           max_num_batched_tokens=args.budget)
    exe = model.executable()
    load_s = time.perf_counter() - t0
    from jaxrt.ir.weights import resident_weights
    # what a decode step reads: the weights on the device, at their compute dtype
    weight_bytes = sum(exe.module.weights[n].nbytes() for n in resident_weights(exe.module))
    out = {"model": name, "weight_bytes": weight_bytes, "random_weights_s": gen_s,
           "load_s": load_s, "kv_cache": model.module.attributes["kv_cache"],
           "roofline_decode_tok_s_b1": bw / weight_bytes}

    # Single request, as `jaxrt generate --json` runs it.
    eng = Engine(exe, max_num_seqs=1, max_model_len=args.input_len + args.output_len,
                 max_num_batched_tokens=args.input_len, bucket_growth=args.bucket_growth,
                 warmup=True, log=sys.stderr)
    out["generate_compile_s"] = eng.stats().warmup_seconds
    prompt = Workload(1, args.input_len, args.output_len).prompts(config.vocab_size)
    eng.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))  # first-run effects
    (o,) = eng.generate(prompt, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    decode_s = o.token_times[-1] - o.token_times[0]
    out["generate"] = {"prefill_tok_s": args.input_len / o.ttft, "ttft_s": o.ttft,
                       "decode_tok_s": (len(o.ids) - 1) / decode_s}
    out["generate"]["decode_fraction_of_roofline"] = (
        out["generate"]["decode_tok_s"] / out["roofline_decode_tok_s_b1"])
    del eng
    out["prefill"] = prefill_mfu(exe, config, args.prefill_len, weight_bytes / 2, peak)
    if name not in args.serving_models.split(","):
        return out

    rows = []
    conc = [int(c) for c in args.concurrency.split(",")]
    scenarios = [(f"{c} concurrent", Workload(c, args.input_len, args.output_len), c, True)
                 for c in conc]
    n = conc[1] if len(conc) > 1 else conc[0]
    for caching in (True, False):
        scenarios.append((f"shared prefix, caching {'on' if caching else 'off'}",
                          Workload(n, args.prefix_len + args.input_len, args.output_len,
                                   args.prefix_len), n, caching))
    for scen, w, seqs, caching in scenarios:
        eng = Engine(exe, max_num_seqs=seqs, max_model_len=max_len,
                     max_num_batched_tokens=args.budget, enable_prefix_caching=caching,
                     bucket_growth=args.bucket_growth, warmup=True, log=sys.stderr)
        row = run_workload(eng, w)
        row.update(scenario=scen, max_num_seqs=seqs)
        rows.append(row)
        print(format_table([row]), flush=True)
        del eng
    out["serving"] = rows
    for c, row in zip(conc[1:], rows[1:]):
        out[f"speedup_{c}_vs_1"] = row["output_tok_s"] / rows[0]["output_tok_s"]
    out["ttft_prefix_off_over_on"] = rows[-1]["ttft_p50_s"] / rows[-2]["ttft_p50_s"]
    print(format_table(rows))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--bucket-growth", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--serving-models", default="smollm2-135m,llama-3.2-1b",
                   help="models that also run the serving scenarios")
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "jaxrt_gpu.json"))
    args = p.parse_args()
    import jax
    report = {"jax": jax.__version__, "device": str(jax.devices()[0]),
              "copy_bandwidth_GBps": (bw := copy_bandwidth()) / 1e9,
              "bf16_matmul_TFLOPs": (peak := matmul_peak()) / 1e12, "models": []}
    print(json.dumps({k: v for k, v in report.items() if k != "models"}), flush=True)
    for name in args.models.split(","):
        report["models"].append(bench_model(name, args, bw, peak))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    for m in report["models"]:
        g, pf = m["generate"], m["prefill"]
        print(f"{m['model']}: load {m['load_s']:.1f}s compile {m['generate_compile_s']:.1f}s "
              f"prefill {pf['tokens']} tokens {pf['tok_s']:.0f} tok/s (MFU {pf['mfu']:.1%}) "
              f"decode "
              f"{g['decode_tok_s']:.0f} tok/s ({g['decode_fraction_of_roofline']:.0%} of "
              f"roofline {m['roofline_decode_tok_s_b1']:.0f}); " + " ".join(
                  f"{k} {v:.1f}x" for k, v in m.items() if k.startswith(("speedup", "ttft_")))
              )


if __name__ == "__main__":
    main()
