"""jaxrt inspect FILE|MODEL: IR summary (ops, values, weights, peak activations, KV plan,
pass statistics) of IR text, a model, or an engine directory."""
from __future__ import annotations

import argparse
import json
import sys

from jaxrt.errors import SettingError
from ..ir.weights import resident_weights

from ._common import is_ir_file, read_ir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="IR text file (.jxr), model (.gguf, HF dir, alias) or "
                                  "engine directory")
    p.add_argument("--format", choices=("text", "json", "dot"), default="text")
    p.add_argument("--bind", action="append", default=[], metavar="DIM=N",
                   help="size a symbolic dim for the activation estimate (repeatable)")
    p.add_argument("--function", help="with --format dot: the function to draw "
                                      "(default: the first)")
    p.add_argument("-p", "--pipeline", default=None,
                   help="for models: the pass pipeline (default: the standard one)")
    p.add_argument("--tensor-parallel", "--tp", type=int, default=1, metavar="N",
                   help="for models with the default pipeline: add shard{tp=N} and report "
                        "per-device weight and cache bytes")
    p.add_argument("--data-parallel", "--dp", type=int, default=1, metavar="M",
                   help="for models with the default pipeline: the mesh's dp axis")
    p.add_argument("--stats", action="store_true",
                   help="list every rewrite rule of the pipeline with its attempts, matches "
                        "and rewrites (models: the pipeline just run; IR text: what jaxrt "
                        "opt --stats recorded)")
    p.add_argument("--quant-error", action="store_true",
                   help="per-layer quantization error against the float model: a quantized "
                        "engine directory, or a model with -q MODE (reference interpreter, "
                        "f32)")
    p.add_argument("-q", "--quantize", default="", metavar="MODE",
                   help="with --quant-error: the mode to measure (int8-weight, fp8-weight, "
                        "w8a8, fp8, w8a8-smoothquant, kv-int8, kv-fp8, WEIGHT+KV)")
    p.add_argument("--calib", default="", metavar="DIR",
                   help="with --quant-error -q w8a8-smoothquant: the calibration "
                        "(default: data-free)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="with --quant-error: the text (default: text the float model "
                        "samples itself)")
    p.add_argument("--num-tokens", type=int, default=128, metavar="N",
                   help="with --quant-error: tokens of the text to run (2..512, default 128)")


def _bindings(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier() or not (value.isascii() and value.isdigit()):
            raise SettingError(f"--bind {item!r}: expected NAME=N with N a non-negative integer")
        out[name] = int(value)
    return out


def run(args) -> int:
    from jaxrt.ir.analysis.graph import to_dot
    from jaxrt.ir.analysis.summary import format_rule_stats, format_summary, module_summary

    bindings = _bindings(args.bind)
    if args.quant_error:
        return _quant_error(args)
    if args.quantize or args.calib or args.data is not None:
        raise SettingError("-q, --calib and --data go with --quant-error")
    if is_ir_file(args.target):
        module = read_ir(args.target)
        model_info = None
    else:
        from jaxrt.compiler import load
        parallel = {}
        if args.tensor_parallel != 1 or args.data_parallel != 1:
            if args.pipeline is not None:
                raise SettingError("--tensor-parallel/--data-parallel add the shard pass to "
                                   "the default pipeline; with -p, write shard{tp=N dp=M} "
                                   "in it")
            parallel = {"tensor_parallel": args.tensor_parallel,
                        "data_parallel": args.data_parallel}
        model = load(args.target, pipeline=args.pipeline, **parallel)
        module = model.module
        model_info = {"source": model.source, "pipeline": model.pipeline,
                      "parameters": int(sum(module.weights[n].num_elements()
                                          for n in resident_weights(module)))}
        if model.stats.get("passes"):
            module.attributes.setdefault("pass_stats", [model.stats["passes"]])
    if args.format == "dot":
        name = args.function or next(iter(module.functions), None)
        if name not in module.functions:
            raise SettingError(f"--function {name}: no such function "
                               f"(functions: {', '.join(module.functions) or 'none'})")
        sys.stdout.write(to_dot(module.functions[name]) + "\n")
        return 0
    summary = module_summary(module, bindings)
    if model_info:
        summary["model"] = model_info
    if args.format == "json":
        json.dump(summary, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        if model_info:
            print(f"model: {model_info['source']}  pipeline: {model_info['pipeline']}")
        print(format_summary(summary))
        if args.stats:
            print(format_rule_stats(summary))
    return 0


def _quant_error(args) -> int:
    """`--quant-error`: jaxrt.quant_error's report, as text or JSON."""
    from jaxrt.calibration import sample_ids
    from jaxrt.errors import InputError, read_text_file
    from jaxrt.frontends.sources import load_model
    from jaxrt.quant_error import format_report, models_for, quant_error
    if is_ir_file(args.target):
        raise SettingError("--quant-error takes a model or an engine directory, not IR text")
    if not 2 <= args.num_tokens <= 512:
        raise SettingError(f"--num-tokens must be in [2, 512], got {args.num_tokens}")
    float_model, quant, mode = models_for(args.target, args.quantize, calib=args.calib)
    if args.data is not None:
        text = read_text_file(args.data, "--data")
        if not text.strip():
            raise InputError(f"--data {args.data}: the file is empty")
        ids = list(float_model.tokenizer.encode(text))[:args.num_tokens]
    else:
        ids = sample_ids(load_model(float_model.source), args.num_tokens, seed=0)
    ids = ids[:float_model.kv_plan["max_model_len"]]
    report = quant_error(float_model, quant, ids)
    report["mode"] = mode
    if args.format == "json":
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(report, mode))
    return 0
