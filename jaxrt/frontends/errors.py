"""Typed errors of the model readers."""
from __future__ import annotations

import os

from ..errors import InputError


class ModelFormatError(InputError):
    """A model file or directory that cannot be read: missing, truncated, malformed or
    describing something we do not support. `str(e)` is one line, "path: message"."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        # One line whatever the message quotes (file contents may hold newlines).
        self.message = str(message).replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{self.path}: {self.message}")
