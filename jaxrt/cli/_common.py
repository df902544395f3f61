"""Helpers shared by subcommands."""
from __future__ import annotations

import os
import sys

from jaxrt.errors import (MAX_TEXT_FILE_BYTES, InputError, ResourceLimitError,
                          read_text_file)


def read_ir(path: str):
    """Parse an IR text file ('-' = stdin); errors carry file:line:col."""
    from jaxrt.ir.parser import parse

    if path == "-":  # capped like a file: `cat /dev/zero | jaxrt opt -` must end
        data = sys.stdin.buffer.read(MAX_TEXT_FILE_BYTES + 1)
        if len(data) > MAX_TEXT_FILE_BYTES:
            raise ResourceLimitError(f"<stdin>: over the {MAX_TEXT_FILE_BYTES}-byte limit "
                                     f"for IR text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"<stdin>: not UTF-8 text (byte {e.start})") from None
        return parse(text, "<stdin>")
    text = read_text_file(path, "an IR text file")  # capped; /dev/zero and FIFOs refused
    return parse(text, path)


def is_ir_file(path: str) -> bool:
    return path == "-" or (os.path.isfile(path) and path.endswith((".jxr", ".mlir", ".ir")))


def write_text(text: str, path: str | None) -> None:
    """Write to `path`, or to stdout when no path is given."""
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:  # a full disk, a directory, no permission: name the file
            raise InputError(f"{path}: cannot write: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)

