"""jaxrt eval-ppl MODEL --text FILE: perplexity of a text under a model (jaxrt/perplexity.py).

The text is tokenized as plain text (special-token spellings stay text) with the
tokenizer's own BOS; the windows are at most --context tokens (default: the model's
context) every --stride tokens (default: half a window), so every token after the first
is scored once. `-q MODE` quantizes the model first (jaxrt/passes/quantize.py), or
its KV cache (kv-int8, kv-fp8: jaxrt/passes/quantize_kv_cache.py). w8a8-smoothquant
smooths with the calibration `--calib DIR` (jaxrt calibrate), or one made in a temporary
directory on the text `--calib FILE` (as `jaxrt calibrate --data FILE`), else with a
data-free one (jaxrt/calibration.py): never with the evaluated text (the same file, the
same content, or a calibration directory made on it is refused). --json's `quantize` is
what the model was compiled with (an engine directory's own, from its attributes).

`--gptq` takes -q's weight codes from GPTQ (jaxrt/gptq.py) instead of rounding to
nearest: calibrated in a temporary directory on the text `--calib FILE`, or data-free
(the model's own samples) without --calib, never on the evaluated text; `--calib DIR`
naming a calibration made with `jaxrt calibrate --gptq MODE` uses its codes as they are.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
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
    p.add_argument("--calib", default=None, metavar="DIR|FILE",
                   help="for -q w8a8-smoothquant: a calibration DIR (jaxrt calibrate) or a "
                        "text FILE to calibrate on (default: data-free, the model's own "
                        "samples); with --gptq, a text FILE to calibrate on or a "
                        "calibration DIR with GPTQ codes; never the --text itself")
    p.add_argument("--gptq", action="store_true",
                   help="choose -q's weight codes by GPTQ (int8-weight, fp8-weight, w8a8, "
                        "fp8), calibrated on --calib (default: data-free)")
    p.add_argument("--context", type=int, default=None,
                   help="window length in tokens (default: the model's context length)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, < --context (default: half a window)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def gptq_mode(quantize: str | None) -> str:
    """The weight mode of `-q` that --gptq chooses codes for; SettingError if none fits."""
    from jaxrt.gptq import gptq_modes
    from jaxrt.passes.quantize import CALIBRATED_MODES
    from jaxrt.compiler import split_quantize
    modes = ", ".join(gptq_modes())
    weight, _ = split_quantize(quantize or "")
    if not weight:
        only_kv = f" (-q {quantize} quantizes only the KV cache)" if quantize else ""
        raise SettingError(f"--gptq chooses weight codes: give -q MODE, one of {modes}"
                           f"{only_kv}")
    if weight not in gptq_modes():
        why = (" (SmoothQuant's smoothing changes the weights GPTQ would quantize)"
               if weight in CALIBRATED_MODES else "")
        raise SettingError(f"--gptq with -q {weight}: GPTQ chooses codes for {modes}{why}")
    return weight


def is_calibration(path: str) -> bool:
    from jaxrt.calibration import TENSORS_FILE
    return os.path.isdir(path) or os.path.basename(path) == TENSORS_FILE


@contextlib.contextmanager
def calibration_dir(loaded, quantize: str | None, calib: str | None, gptq: str | None):
    """The calibration directory to compile with: `calib` itself when it is one; else,
    where -q needs one (w8a8-smoothquant, or GPTQ's codes for mode `gptq`), one made in a
    temporary directory (removed afterwards) on the text file `calib`, as `jaxrt
    calibrate --data FILE` makes it; without --calib, data-free for GPTQ and "" (the
    cached data-free default, compile_loaded) for SmoothQuant."""
    from jaxrt.calibration import calibrate_loaded
    from jaxrt.compiler import needs_calibration
    if calib and is_calibration(calib):
        yield calib
        return
    if not gptq and not (calib and needs_calibration(quantize or "")):
        yield calib or ""  # a calib -q has no use for: compile refuses it in one line
        return
    data = read_calibration_text(calib) if calib else None
    out = tempfile.mkdtemp(prefix="jaxrt-gptq-" if gptq else "jaxrt-calibration-")
    try:
        calibrate_loaded(loaded, out, data=data, gptq=gptq, data_name=calib or "")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def read_calibration_text(calib: str) -> str:
    data = read_text_file(calib, "a calibration text file or directory (--calib)")
    if not data.strip():
        raise InputError(f"{calib}: the calibration text file is empty")
    return data


def check_calibration_source(calib: str, text_file: str, text: str) -> None:
    """SettingError when `calib` (a text file, or a calibration directory made on one) is
    the evaluated text: the same file, or the same content (the directory's
    calibration.json records its text's data_sha256; one without it, its path)."""
    from jaxrt.calibration import data_sha256, read_calibration
    if not os.path.exists(calib):
        raise InputError(f"{calib}: no such file or directory; --calib takes a calibration "
                         f"directory (jaxrt calibrate) or a text file to calibrate on")
    if is_calibration(calib):
        meta = read_calibration(calib).meta
        source = meta.get("data")
        same = (meta["data_sha256"] == data_sha256(text) if "data_sha256" in meta else
                isinstance(source, str) and os.path.isfile(source) and
                os.path.samefile(source, text_file))
        if same:
            raise SettingError(f"--calib {calib}: the calibration was made on the evaluated "
                               f"text (--text, {source}); calibrate on other text")
        return
    if os.path.isfile(calib) and (os.path.samefile(calib, text_file) or
                                  read_calibration_text(calib) == text):
        raise SettingError("--calib: the calibration text is the evaluated text (--text); "
                           "calibrate on other text")


def evaluate(model_spec: str, ids: list[int] | None = None, *, text: str | None = None,
             quantize: str | None = None, calib: str | None = None, gptq: bool = False,
             context: int | None = None,
             stride: int | None = None, dtype: str | None = None):
    """(Perplexity, compiled model) of `ids` (or `text`, tokenized here). `gptq`: -q's
    weight codes by GPTQ; `calib`: a calibration directory or text (calibration_dir)."""
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
    mode = gptq_mode(quantize) if gptq else None
    kind, path = resolve_model(model_spec)
    if kind == "engine":
        if quantize or dtype or calib or gptq:
            raise SettingError(f"-q/--calib/--dtype/--gptq: {model_spec} is an engine "
                               f"directory, compiled with its pipeline fixed (jaxrt compile "
                               f"-p ...)")
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
        return perplexity(source.executable(), ids, context, stride), source
    with calibration_dir(source, quantize, calib, mode) as calib_dir:
        model = compile_loaded(source, target=Target.detect(dtype), max_model_len=window,
                               num_pages=math.ceil(window / PAGE_SIZE), page_size=PAGE_SIZE,
                               max_num_seqs=1, quantize=quantize or "", calib=calib_dir or "",
                               quant_method="gptq" if gptq else "rtn")
        return perplexity(model.executable(), ids, context, stride), model


def run(args) -> int:
    text = read_text_file(args.text, "a text file (--text)")
    if not text.strip():
        raise InputError(f"{args.text}: the text file is empty")
    if args.calib:
        check_calibration_source(args.calib, args.text, text)
    start = time.perf_counter()
    result, model = evaluate(args.model, text=text, quantize=args.quantize, calib=args.calib,
                             gptq=args.gptq, context=args.context, stride=args.stride,
                             dtype=args.dtype)
    seconds = time.perf_counter() - start
    # What the model was compiled with: -q, or what an engine directory fixed
    from jaxrt.compiler import quantize_mode
    quantize = quantize_mode(model.module) or None
    gptq = model.module.attributes.get("quantization", {}).get("method") == "gptq"
    if args.json:
        print(json.dumps({**result.to_json(), "quantize": quantize, "gptq": gptq,
                          "seconds": round(seconds, 2)}))
    else:
        q = f" ({quantize}{', GPTQ' if gptq else ''})" if quantize else ""
        print(f"{args.model}{q}: perplexity {result.ppl:.4f}, nll {result.nll:.5f} nats/token "
              f"over {result.tokens} tokens in {result.windows} window(s), {seconds:.1f} s")
    return 0
