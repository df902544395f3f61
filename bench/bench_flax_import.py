"""Imported Flax model vs the built-in builder: decode tok/s at batch 1 and 64 and compile
(build + warm-up) time, same random weights, same shapes (issue 14's target: within 5%).

    python bench/bench_flax_import.py --model llama-3.2-1b --out $OUT/flax_import.json
    python bench/bench_flax_import.py --tiny --batches 1,4 --input-len 8 --output-len 8  # CPU

The Flax side is tests/frontends/flax_models.FlaxLlama (ordinary Flax NNX code) built at the
model's real shapes (llama3-scaled RoPE included), loaded with the builder's random weights,
served by jaxrt.from_flax. `--tiny` swaps in a 2-layer model of a few hundred kB, to check
the script end to end on a CPU. Prints a table and writes the JSON report to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_gpu import RandomWeights, config_for  # noqa: E402


def decode_rate(exe, batch: int, input_len: int, output_len: int) -> dict:
    from jaxrt.runtime.benchmark import Workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams
    t0 = time.perf_counter()
    eng = Engine(exe, max_num_seqs=max(batch, 1), warmup=True, log=None)
    warm = time.perf_counter() - t0
    prompts = Workload(batch, input_len, output_len).prompts(exe.vocab_size)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    eng.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t
    decode = [(len(o.ids) - 1) / (o.token_times[-1] - o.token_times[0]) for o in outs]
    return {"batch": batch, "warmup_s": warm, "tok_s": sum(len(o.ids) for o in outs) / wall,
            "decode_tok_s": float(np.sum(decode)),  # all sequences together
            "decode_tok_s_per_seq": float(np.median(decode))}


def flax_model(config, weights):
    from flax import nnx

    from tests.frontends.flax_models import (FlaxLlama, llama3_frequencies, load_llama_weights,
                                             rope_frequencies)
    hf_like = SimpleNamespace(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    model = nnx.eval_shape(lambda: FlaxLlama(hf_like, rngs=nnx.Rngs(0)))  # no random init
    rs = config.rope_scaling
    model.inv_freq = llama3_frequencies(
        config.head_dim, config.rope_theta, rs.factor, rs.low_freq_factor,
        rs.high_freq_factor, rs.original_max_position) if rs.kind == "llama3" else \
        rope_frequencies(config.head_dim, config.rope_theta)
    return load_llama_weights(model, dict(weights))


def tiny_config(max_len: int):
    from jaxrt.frontends.config import ModelConfig, RopeScaling
    return ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       max_position=max_len, rms_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                       tie_embeddings=True, model_type="tiny")


def table(report: dict) -> str:
    rows = {(r["runner"], r["batch"]): r for r in report["runs"]}
    lines = [f"{'batch':>5} {'runner':>8} {'decode tok/s':>13} {'per seq':>9} "
             f"{'e2e tok/s':>10} {'warm-up s':>10} {'flax/builtin':>13}"]
    for (runner, batch), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = rows.get(("builtin", batch))
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.3f}" if base else "-"
        lines.append(f"{batch:>5} {runner:>8} {r['decode_tok_s']:>13.1f} "
                     f"{r['decode_tok_s_per_seq']:>9.1f} {r['tok_s']:>10.1f} "
                     f"{r['warmup_s']:>10.2f} {ratio:>13}")
    lines.append(f"build (IR + passes): builtin {report['builtin_build_s']:.2f} s, "
                 f"flax import {report['flax_import_s']:.2f} s")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer model instead of --model's shapes (CPU check)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                 "flax_import.json"))
    args = p.parse_args()
    import jax

    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.jax_frontend import from_flax
    config = tiny_config(args.max_model_len) if args.tiny else \
        config_for(args.model, args.max_model_len)
    weights = RandomWeights(config)
    batches = [int(b) for b in args.batches.split(",")]
    plan = dict(max_model_len=args.max_model_len, max_num_seqs=max(batches))
    report = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "model": "tiny" if args.tiny else args.model, "runs": []}
    t = time.perf_counter()
    loaded = SimpleNamespace(config=config, weights=weights, tokenizer=None,
                             chat_template=None, source=f"random:{report['model']}")
    builtin = compile_loaded(loaded, **plan).executable()
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    imported = from_flax(flax_model(config, weights), target=Target.detect(), **plan)
    import_s = time.perf_counter() - t
    report.update(builtin_build_s=build_s, flax_import_s=import_s)
    for b in batches:
        for name, exe in (("builtin", builtin), ("flax", imported)):
            row = {"runner": name, **decode_rate(exe, b, args.input_len, args.output_len)}
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(table(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
