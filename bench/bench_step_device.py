"""Device time of one decode step at batch 1, by variant (experiments for issue 10).

    XLA_FLAGS=... python bench/bench_step_device.py --model smollm2-135m
        [--attention auto|dense|dynamic] [--greedy-only] [--no-cond] --out $OUT/step.json

--attention sets JAXRT_DECODE_ATTENTION (dense: the whole table at once, no while loop;
dynamic: the block loop). Variants patch module functions in this process only:
--greedy-only replaces the step's sampling by argmax (no lax.cond). Prints the device
time per step (back-to-back dispatches) and per token of an 8-step decode loop.
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

from bench.bench_decode import device_step_seconds  # noqa: E402
from bench.bench_gpu import config_for  # noqa: E402
from bench.bench_layers import ViewWeights  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--attention", default="auto", choices=["auto", "dense", "dynamic"],
                   help="JAXRT_DECODE_ATTENTION for this run")
    p.add_argument("--greedy-only", action="store_true")
    p.add_argument("--no-cond", action="store_true",
                   help="sampling without lax.cond (draw computed for every batch)")
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    from jaxrt.compiler import compile_loaded
    from jaxrt.lowering.xla import attention
    from jaxrt.runtime import programs
    os.environ["JAXRT_DECODE_ATTENTION"] = args.attention
    if args.greedy_only:
        def greedy(logits, *rest):
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            t = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return t, jnp.take_along_axis(lp, t[:, None], axis=-1)[:, 0], lp
        programs.sample_tokens = greedy
    if args.no_cond:  # this process only: every lax.cond computes both branches
        def select(pred, true_fn, false_fn, *operands):
            a, b = true_fn(*operands), false_fn(*operands)
            return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
        jax.lax.cond = select
    config = config_for(args.model, args.max_model_len)
    loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{args.model}")
    model = compile_loaded(loaded, max_model_len=args.max_model_len, max_num_seqs=32,
                           max_num_batched_tokens=512)
    exe = model.executable()
    mp = -(-args.max_model_len // exe.page_size)
    t = time.perf_counter()
    exe.compile_for(1, 1, 1, mp, 1)
    compile_s = time.perf_counter() - t
    dev, dispatch = device_step_seconds(exe, args.context, mp)
    # an 8-step decode loop from the same context
    ctx = args.context
    table = np.zeros((1, mp), np.int32)
    table[0, :-(-(ctx + 9) // exe.page_size)] = np.arange(-(-(ctx + 9) // exe.page_size))
    from jaxrt.runtime.programs import greedy_sampling
    loop_args = (np.asarray([7], np.int32), np.asarray([ctx], np.int32), table,
                 np.asarray([8], np.int32), 8, greedy_sampling(1))
    jax.block_until_ready(exe.decode(*loop_args))
    n = 10
    t = time.perf_counter()
    for _ in range(n):
        out = exe.decode(*loop_args)
    jax.block_until_ready(out)
    loop_token = (time.perf_counter() - t) / n / 8
    row = {"model": args.model, "label": args.label, "xla_flags": os.environ.get("XLA_FLAGS"),
           "attention": args.attention, "greedy_only": args.greedy_only,
           "no_cond": args.no_cond,
           "compile_s": compile_s, "device_step_us": dev * 1e6,
           "dispatch_us": dispatch * 1e6, "loop_per_token_us": loop_token * 1e6}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
