"""Helpers shared by subcommands."""
from __future__ import annotations

import os
import sys

from jaxrt.errors import InputError


def read_ir(path: str):
    """Parse an IR text file ('-' = stdin); errors carry file:line:col."""
    from jaxrt.ir.parser import parse

    if path == "-":
        return parse(sys.stdin.read(), "<stdin>")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected an IR text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse(text, path)


def is_ir_file(path: str) -> bool:
    return path == "-" or (os.path.isfile(path) and path.endswith((".jxr", ".mlir", ".ir")))


def write_text(text: str, path: str | None) -> None:
    """Write to `path`, or to stdout when no path is given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
