"""jaxrt calibrate MODEL [--data FILE] -o DIR: activation ranges and SmoothQuant factors
of every linear projection (jaxrt/calibration.py), for quantize{mode=w8a8-smoothquant},
and with --gptq MODE the weight codes GPTQ picks (jaxrt/gptq.py), for quantize{method=gptq}:

    jaxrt calibrate smollm2-135m --data calib.txt -o calib/
    jaxrt compile smollm2-135m -q w8a8-smoothquant --calib calib/ -o engine/
    jaxrt calibrate smollm2-135m --data calib.txt --gptq fp8 -o calib-gptq/
    jaxrt compile smollm2-135m -q fp8 --gptq --calib calib-gptq/ -o engine-gptq/
"""
from __future__ import annotations

import argparse
import time

from jaxrt.errors import InputError, SettingError, read_text_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxrt.calibration import (DEFAULT_ALPHA, DEFAULT_FREE_TOKENS, DEFAULT_PERCENTILE,
                                   DEFAULT_TOKENS)
    from jaxrt.gptq import DEFAULT_BLOCK, DEFAULT_DAMP
    p.add_argument("model", help=".gguf file, Hugging Face directory or alias (float "
                                 "weights; not an engine directory)")
    p.add_argument("-o", "--output", required=True, help="directory to write "
                   "calibration.safetensors and calibration.json into")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 calibration text (default: data-free, text the model "
                        "samples itself, seeded)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"SmoothQuant migration strength in [0, 1] (default {DEFAULT_ALPHA})")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"percentile of |x| recorded per channel besides the maximum "
                        f"(default {DEFAULT_PERCENTILE})")
    p.add_argument("--num-tokens", type=int, default=None, metavar="N",
                   help=f"tokens run through the model, at most its context (default "
                        f"{DEFAULT_TOKENS} of --data, {DEFAULT_FREE_TOKENS} sampled)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, >= 0 (data-free only; default 0)")
    p.add_argument("--gptq", default=None, metavar="MODE",
                   help="also choose the weight codes of quantize mode MODE (int8-weight, "
                        "fp8-weight, w8a8, fp8) by GPTQ, for -q MODE --gptq")
    # None: not given (an option given where it does nothing is refused, never ignored)
    p.add_argument("--gptq-damp", type=float, default=None, metavar="D",
                   help=f"with --gptq: GPTQ's damping, as a fraction of the mean of "
                        f"diag(X^T X) (default {DEFAULT_DAMP})")
    p.add_argument("--gptq-block", type=int, default=None, metavar="B",
                   help=f"with --gptq: columns per GPTQ lazy-update block (default "
                        f"{DEFAULT_BLOCK})")


def run(args) -> int:
    from jaxrt.calibration import calibrate, check_options
    from jaxrt.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, check_gptq_options
    if args.gptq is None:
        for option, value in (("--gptq-damp", args.gptq_damp),
                              ("--gptq-block", args.gptq_block)):
            if value is not None:
                raise SettingError(f"{option} tunes GPTQ; give --gptq MODE too")
    if args.seed is not None and args.data is not None:
        raise SettingError("--seed seeds the data-free sampling; with --data the text is "
                           "the calibration and nothing is sampled")
    seed = 0 if args.seed is None else args.seed
    damp = DEFAULT_DAMP if args.gptq_damp is None else args.gptq_damp
    block = DEFAULT_BLOCK if args.gptq_block is None else args.gptq_block
    check_options(args.alpha, args.percentile, args.num_tokens, seed)  # before any loading
    check_gptq_options(args.gptq, damp, block)
    data = None
    if args.data is not None:
        data = read_text_file(args.data, "a calibration text file (--data)")
        if not data.strip():
            raise InputError(f"{args.data}: the calibration text file is empty")
    start = time.perf_counter()
    meta = calibrate(args.model, args.output, data=data, alpha=args.alpha,
                     percentile=args.percentile, num_tokens=args.num_tokens, seed=seed,
                     data_name=args.data or "", gptq=args.gptq, gptq_damp=damp,
                     gptq_block=block)
    source = f"{args.data}" if data is not None else f"self-sampled text (seed {seed})"
    gptq = meta.get("gptq")
    codes = (f", GPTQ {gptq['dtype']} codes for {gptq['mode']} ({gptq['seconds']} s)"
             if gptq else "")
    print(f"wrote {args.output}: {sum(map(len, meta['groups']))} linears in "
          f"{len(meta['groups'])} input groups, {meta['tokens']} tokens of {source}, "
          f"alpha {meta['alpha']}{codes}; {time.perf_counter() - start:.1f} s")
    return 0
