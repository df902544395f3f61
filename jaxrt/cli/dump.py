"""jaxrt dump MODEL: print a model's IR (frontend output, or after -p PIPELINE)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("-p", "--pipeline", default="",
                   help="passes to run first (default: none, the frontend's IR)")
    p.add_argument("-o", "--output", help="write here instead of stdout")


def run(args) -> int:
    from jaxrt.compiler import load
    text = str(load(args.model, pipeline=args.pipeline).module)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
