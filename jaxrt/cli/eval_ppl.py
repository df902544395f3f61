"""jaxrt eval-ppl MODEL --text FILE: perplexity of a text under a model (jaxrt/perplexity.py).

The text is tokenized as plain text (special-token spellings stay text) with the
tokenizer's own BOS; the windows are at most --context tokens (default: the model's
context) every --stride tokens (default: half a window), so every token after the first
is scored once. `-q MODE` quantizes the model first (jaxrt/passes/quantize.py), or
its KV cache (kv-int8, kv-fp8: jaxrt/passes/quantize_kv_cache.py). w8a8-smoothquant
smooths with the calibration `--calib DIR` (jaxrt calibrate), else with a data-free one
(jaxrt/calibration.py): never with the evaluated text.
"""
from __future__ import annotations

import argparse
import json
import math
import time

from jaxrt.errors import InputError, SettingError, read_text_file

PAGE_SIZE = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("-q", "--quantize", default=None, metavar="MODE",
                   help="quantize the linear projections first (per-channel scales; "
                        "w8a8, w8a8-smoothquant and fp8 quantize activations per token at "
                        "run time), or "
                        "the KV cache (kv-int8, kv-fp8: per token-head scales), or both "
                        "joined by +")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibration (jaxrt calibrate) for -q w8a8-smoothquant (default: "
                        "data-free, the model's own samples)")
    p.add_argument("--context", type=int, default=None,
                   help="window length in tokens (default: the model's context length)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, < --context (default: half a window)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def evaluate(model_spec: str, ids: list[int] | None = None, *, text: str | None = None,
             quantize: str | None = None, calib: str | None = None,
             context: int | None = None,
             stride: int | None = None, dtype: str | None = None):
    """(Perplexity, compiled model) of `ids` (or `text`, tokenized here)."""
    from jaxrt.compiler import Target, compile_loaded, load_engine
    from jaxrt.frontends.sources import load_model, resolve_model
    from jaxrt.perplexity import perplexity, plan_windows

    # Refused before anything loads, naming the option (0 is an error, never "the default")
    if context is not None and (not isinstance(context, int) or context < 2):
        raise SettingError(f"--context must be >= 2 tokens, got {context}")
    if stride is not None and (not isinstance(stride, int) or stride < 1 or (
            context is not None and stride >= context)):
        where = f"in [1, --context - 1] = [1, {context - 1}]" if context is not None \
            else ">= 1"
        raise SettingError(f"--stride must be {where}, got {stride}")
    kind, path = resolve_model(model_spec)
    if kind == "engine":
        if quantize or dtype or calib:
            raise SettingError(f"-q/--calib/--dtype: {model_spec} is an engine directory, compiled "
                               f"with its pipeline fixed (jaxrt compile -p ...)")
        source = load_engine(path)
        limit = source.kv_plan["max_model_len"]
    else:
        source = load_model(model_spec)
        limit = source.config.max_position
    if ids is None:
        ids = source.tokenizer.encode_text(text)
    if context is not None and context > limit:
        raise SettingError(f"--context {context} exceeds the model's context of {limit} "
                           f"tokens")
    if context is None and stride is not None and stride >= limit:
        raise SettingError(f"--stride must be in [1, {limit - 1}] (below the model's "
                           f"context of {limit} tokens, or give --context), got {stride}")
    context = context or limit
    window = min(context, len(ids))
    plan_windows(len(ids), context, stride)  # refuse bad windows before compiling
    if kind == "engine":
        model = source
    else:
        model = compile_loaded(source, target=Target.detect(dtype), max_model_len=window,
                               num_pages=math.ceil(window / PAGE_SIZE), page_size=PAGE_SIZE,
                               max_num_seqs=1, quantize=quantize or "", calib=calib or "")
    exe = model.executable()
    return perplexity(exe, ids, context, stride), model


def run(args) -> int:
    text = read_text_file(args.text, "a text file (--text)")
    if not text.strip():
        raise InputError(f"{args.text}: the text file is empty")
    start = time.perf_counter()
    result, model = evaluate(args.model, text=text, quantize=args.quantize, calib=args.calib,
                             context=args.context, stride=args.stride, dtype=args.dtype)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**result.to_json(), "quantize": args.quantize,
                          "seconds": round(seconds, 2)}))
    else:
        q = f" ({args.quantize})" if args.quantize else ""
        print(f"{args.model}{q}: perplexity {result.ppl:.4f}, nll {result.nll:.5f} nats/token "
              f"over {result.tokens} tokens in {result.windows} window(s), {seconds:.1f} s")
    return 0
