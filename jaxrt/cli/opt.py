"""jaxrt opt FILE -p PIPELINE: parse IR text, run passes, print IR (the mlir-opt of jaxrt)."""
from __future__ import annotations

import argparse
import sys

from jaxrt.errors import SettingError
from ._common import read_ir, write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="IR text file ('-' for stdin)")
    p.add_argument("-p", "--pipeline", default="",
                   help="e.g. 'canonicalize,cse,dce', or a named pipeline: default-gpu "
                        "(what jaxrt compiles for a GPU: the fusion passes and bf16) or "
                        "default-cpu, without the KV cache's plan")
    p.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                   help="print the IR to stderr after this pass (repeatable; 'all')")
    p.add_argument("--stats", action="store_true",
                   help="print pass and rule statistics to stderr and record them in the "
                        "module's pass_stats attribute")
    p.add_argument("--no-verify", action="store_true", help="skip the verifier between passes")
    p.add_argument("-o", "--output", help="write the IR here instead of stdout")


def run(args) -> int:
    from jaxrt.passes import PassManager, parse_pipeline
    from jaxrt.passes.manager import DumpAfter, TimingHook, VerifyHook

    from jaxrt.compiler import named_pipeline
    module = read_ir(args.file)
    pipeline = named_pipeline(args.pipeline) or args.pipeline
    passes = parse_pipeline(pipeline)
    hooks = [] if args.no_verify else [VerifyHook()]
    if args.dump_after:
        known = {p.name for p in passes}
        for name in args.dump_after:
            if name != "all" and name not in known:
                raise SettingError(f"--dump-after {name}: no such pass in the pipeline "
                                   f"{pipeline!r}")
        hooks.append(DumpAfter("all" if "all" in args.dump_after else args.dump_after,
                               sys.stderr))
    if args.stats:
        hooks.append(TimingHook(sys.stderr, rules=True))
    PassManager(passes, hooks, record_stats=args.stats).run(module)
    write_text(str(module), args.output)
    return 0
