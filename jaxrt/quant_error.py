"""Per-layer quantization error (`jaxrt inspect MODEL --quant-error`, issue 13).

The float model and its quantized form each run one prefill of the same text through the
IR's reference interpreter (f32 arithmetic on the modules' own weights: int8/fp8 codes
and scales, smoothed or fused, as the pipeline left them). At every layer the queries
of its attention (`llm.paged_attention`'s q operand, after the layer's own q projection:
it carries every earlier layer's error, the KV cache's included) are compared with the float model's, and at the
end the logits of every position:

- per layer: ||q_quant - q_float|| / ||q_float||;
- logits: the same relative error, the mean KL(float || quant) per position, and the share
  of positions whose argmax agrees.

Layers are matched by their cache index (the op's `layer`, plus the scan's base where
layers are outlined), so the two modules may differ in every other pass (fusion,
quantize, smoothing).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError

PAGE_SIZE = 16
MAX_TOKENS = 512


def _probe(model, ids: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """({layer: queries f32[T, H, D]}, logits f32[T, V]) of one prefill of `ids` through
    `model` (a CompiledModel) by the reference interpreter."""
    from .ir import interpreter, ops
    from .ir.weights import materialize, resident_weights
    module, n = model.module, len(ids)
    plan = model.kv_plan
    fn = module.functions["step"]
    kv_type = fn.arg("kv").type
    pages = -(-n // plan["page_size"])
    if pages > kv_type.shape[2]:
        raise InputError(f"--quant-error: {n} tokens need {pages} pages; the plan has "
                         f"{kv_type.shape[2]}")
    pos = np.arange(n, dtype=np.int32)
    ps = plan["page_size"]
    inputs = [np.asarray(ids, np.int32), pos, pos, np.arange(pages, dtype=np.int32)[None],
              np.asarray([n], np.int32), pos[None], pos,
              np.zeros(kv_type.shape, kv_type.dtype.to_numpy())]
    assert ps * pages >= n
    weights = materialize(module, model.weights, resident_weights(module))
    queries: dict[int, np.ndarray] = {}

    def observe(op, values):
        if op.opdef is ops.paged_attention:
            base = int(np.asarray(values[6])) if len(values) > 6 else 0
            queries[op.attrs.layer + base] = np.asarray(values[0], np.float32)
    logits = interpreter.run(module, "step", inputs, weights, observe=observe)[0]
    return queries, np.asarray(logits, np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def quant_error(float_model, quant_model, ids: list[int]) -> dict[str, Any]:
    """The report (see the module docstring) of `quant_model` against `float_model` on
    `ids`."""
    if len(ids) < 2:
        raise InputError("--quant-error: the text must be at least 2 tokens")
    fq, fl = _probe(float_model, ids)
    qq, ql = _probe(quant_model, ids)
    if sorted(fq) != sorted(qq):
        raise InputError(f"--quant-error: the models' layers differ ({len(fq)} vs "
                         f"{len(qq)})")
    layers = [{"layer": i, "query_rel_error": _rel(qq[i], fq[i])} for i in sorted(fq)]
    fl64, ql64 = fl.astype(np.float64), ql.astype(np.float64)
    lp = fl64 - fl64.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = ql64 - ql64.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return {"tokens": len(ids), "layers": layers,
            "logits_rel_error": _rel(ql, fl), "mean_kl": kl,
            "top1_agreement": float(np.mean(fl.argmax(-1) == ql.argmax(-1)))}


def format_report(report: dict[str, Any], mode: str) -> str:
    lines = [f"quantization error of {mode} against float, {report['tokens']} tokens "
             f"(reference interpreter, f32):",
             "layer  query rel. error"]
    lines += [f"{r['layer']:5d}  {r['query_rel_error']:.3e}" for r in report["layers"]]
    lines.append(f"logits: rel. error {report['logits_rel_error']:.3e}, mean KL "
                 f"{report['mean_kl']:.3e}, top-1 agreement "
                 f"{report['top1_agreement']:.1%}")
    return "\n".join(lines)


def models_for(spec: str, quantize: str, *, calib: str = "") -> tuple[Any, Any, str]:
    """(float model, quantized model, mode) for `spec`: an engine directory compiled with
    a quantize mode (its float model from its recorded source), or a model and `quantize`.
    Both f32, planned for one sequence of up to MAX_TOKENS tokens."""
    from .compiler import Target, compile_loaded, load, quantize_mode
    from .frontends.sources import load_model, resolve_model
    target = Target.detect("float32")
    if resolve_model(spec)[0] == "engine":
        if quantize or calib:
            raise InputError(f"-q/--calib: {spec} is an engine directory; its "
                             f"quantization was fixed when it was compiled")
        quant = load(spec)
        mode = quantize_mode(quant.module)
        if not mode:
            raise InputError(f"--quant-error: {spec} is not quantized (jaxrt compile -q)")
        if quant.module.attributes.get("float_dtype", "f32") != "f32":
            raise InputError(f"--quant-error: {spec} computes in "
                             f"{quant.module.attributes['float_dtype']}; compile it with "
                             f"--dtype float32 to compare against float")
        from .compiler import ENGINE_FORMAT
        from .engine_format import read_engine_meta
        source = read_engine_meta(spec, ENGINE_FORMAT)["source"]  # what it was compiled from
        kv = quant.kv_plan
        float_model = compile_loaded(load_model(source), target=target,
                                     max_model_len=kv["max_model_len"], max_num_seqs=1,
                                     num_pages=kv["num_pages"], page_size=kv["page_size"])
        return float_model, quant, mode
    if not quantize:
        raise InputError("--quant-error needs a quantized engine directory or -q MODE")
    loaded = load_model(spec)
    max_len = min(MAX_TOKENS, int(loaded.config.max_position) or MAX_TOKENS)
    plan = dict(max_model_len=max_len, max_num_seqs=1, page_size=PAGE_SIZE,
                num_pages=math.ceil(max_len / PAGE_SIZE))
    float_model = compile_loaded(loaded, target=target, **plan)
    quant = compile_loaded(loaded, target=target, quantize=quantize, calib=calib, **plan)
    return float_model, quant, quantize
