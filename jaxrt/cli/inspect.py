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
