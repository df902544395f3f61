"""jaxrt calibrate MODEL [--data FILE] -o DIR: activation ranges and SmoothQuant factors
of every linear projection (jaxrt/calibration.py), for quantize{mode=w8a8-smoothquant}:

    jaxrt calibrate smollm2-135m --data calib.txt -o calib/
    jaxrt compile smollm2-135m -q w8a8-smoothquant --calib calib/ -o engine/
"""
from __future__ import annotations

import argparse
import time

from jaxrt.errors import InputError, read_text_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxrt.calibration import (DEFAULT_ALPHA, DEFAULT_FREE_TOKENS, DEFAULT_PERCENTILE,
                                   DEFAULT_TOKENS)
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
    p.add_argument("--seed", type=int, default=0, help="sampling seed (data-free)")


def run(args) -> int:
    from jaxrt.calibration import calibrate, check_options
    check_options(args.alpha, args.percentile, args.num_tokens)  # before any loading
    data = None
    if args.data is not None:
        data = read_text_file(args.data, "a calibration text file (--data)")
        if not data.strip():
            raise InputError(f"{args.data}: the calibration text file is empty")
    start = time.perf_counter()
    meta = calibrate(args.model, args.output, data=data, alpha=args.alpha,
                     percentile=args.percentile, num_tokens=args.num_tokens, seed=args.seed,
                     data_name=args.data or "")
    source = f"{args.data}" if data is not None else f"self-sampled text (seed {args.seed})"
    print(f"wrote {args.output}: {sum(map(len, meta['groups']))} linears in "
          f"{len(meta['groups'])} input groups, {meta['tokens']} tokens of {source}, "
          f"alpha {meta['alpha']}; {time.perf_counter() - start:.1f} s")
    return 0
