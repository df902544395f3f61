"""jaxrt dump MODEL: print a model's IR (frontend output, or after -p PIPELINE)."""
from __future__ import annotations

import argparse

from ._common import write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("-p", "--pipeline", default="",
                   help="passes to run first (default: none, the frontend's IR)")
    p.add_argument("-o", "--output", help="write here instead of stdout")


def run(args) -> int:
    from jaxrt.compiler import load
    write_text(str(load(args.model, pipeline=args.pipeline).module), args.output)
    return 0
