"""Where fp8 (e4m3 weights and activations) loses accuracy: perplexity of SmolLM2 under
variants of the activations' quantization, on the XLA lowering (CPU, float32).

    PYTHONPATH=$PWD python bench/fp8_activation_scales.py [--model smollm2-135m]
        [--text bench/data/english.txt] [--out bench/results/fp8_activation_scales_cpu.json]

Variants of `quant.linear{act=token}` for fp8 (weights: per-channel e4m3 codes, as the
quantize pass makes them, in every variant):
- `token`: the pass's own (per-token scale, max -> 448);
- `group-G`: a scale per token and per G input channels (f32 scales, max -> 448), the
  fine-grained recipe (DeepSeek-V3's 1x128); each group's largest value is then exact;
- `mantissa`: e4m3's 3 mantissa bits with no exponent limits (no underflow or
  saturation), i.e. what the format's rounding alone costs.
An experiment, not a mode: the variants patch the lowering in this process only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dequantized_dot(xd, w, scale):
    import jax.numpy as jnp
    from jax import lax
    wd = w.astype(jnp.float32) * jnp.broadcast_to(scale, (w.shape[0], 1))
    return lax.dot_general(xd, wd, (((xd.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def grouped(size: int):
    def linear(x, w, scale):
        import jax.numpy as jnp
        from jaxrt.ir.types import DType
        from jaxrt.lowering.xla import quant as q
        n = x.shape[-1]
        gs = size if n % size == 0 else n
        xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (n // gs, gs))
        xs = q.token_scale(xg, DType.f8e4m3)            # [..., G, 1]
        xd = q.quantize(xg, xs, DType.f8e4m3).astype(jnp.float32) * xs
        return _dequantized_dot(xd.reshape(x.shape), w, scale)
    return linear


def mantissa(x, w, scale):
    import jax.numpy as jnp
    m, e = jnp.frexp(x.astype(jnp.float32))
    return _dequantized_dot(jnp.ldexp(jnp.round(m * 16) / 16, e), w, scale)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="bench/data/english.txt")
    ap.add_argument("--out", default="bench/results/fp8_activation_scales_cpu.json")
    args = ap.parse_args(argv)
    from jaxrt.cli.eval_ppl import evaluate
    from jaxrt.errors import read_text_file
    from jaxrt.lowering.xla import quant as q
    text = read_text_file(args.text, "--text")
    own = q._token_linear
    rows = {"float": evaluate(args.model, text=text)[0].ppl}
    for name, fn in (("token", own), ("group-128", grouped(128)), ("group-32", grouped(32)),
                     ("mantissa", mantissa)):
        q._token_linear = fn
        try:
            rows[name] = evaluate(args.model, text=text, quantize="fp8")[0].ppl
        finally:
            q._token_linear = own
        print(f"{name:<10} ppl {rows[name]:.3f} ({rows[name] / rows['float'] - 1:+.2%})",
              flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "text": args.text, "ppl": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
