"""`jaxrt` command line: one module per subcommand, errors as one line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from jaxrt.errors import SettingError, is_user_error, one_line

# subcommand -> module in jaxrt.cli, '-' spelled '_' (each defines add_arguments(parser) and run(args) -> int)
SUBCOMMANDS = {
    "opt": "Run a pass pipeline over IR text (the mlir-opt of jaxrt).",
    "inspect": "Summarize IR text, a model or an engine directory.",
    "dump": "Print the IR of a model (optionally after a pipeline).",
    "generate": "Generate text with a model.",
    "calibrate": "Record activation ranges, SmoothQuant factors and GPTQ codes of a model.",
    "compile": "Compile a model into an engine directory.",
    "bench": "Run an offline serving benchmark.",
    "serve": "Serve a model over the OpenAI HTTP API.",
    "eval-ppl": "Perplexity of a text under a model (optionally quantized).",
}


def _module(command: str) -> str:
    return f"jaxrt.cli.{command.replace('-', '_')}"


class CliError(SettingError):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrt", description="LLM inference compiler on JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(_module(name)).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    module = importlib.import_module(_module(args.command))
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("jaxrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`jaxrt opt ... | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - decided below, in one place
        if os.environ.get("JAXRT_TRACEBACK"):
            raise
        if is_user_error(e):
            message = one_line(e) or type(e).__name__
            print(f"jaxrt {args.command}: error: {message}", file=sys.stderr)
            return 2
        # Not caused by the input: a bug in jaxrt. Say so, with the traceback to report.
        traceback.print_exc()
        print(f"jaxrt {args.command}: internal error (a bug in jaxrt, please report it): "
              f"{type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
