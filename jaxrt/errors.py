"""What a user error is, decided in one place.

Every error caused by the input jaxrt was given (a model file, an engine directory, IR
text, a chat template, a prompt, an option or an API argument) is an `InputError`, or one
of the few OS errors about a path the user named (`USER_ERRORS`). `str(e)` names the file
or the option and says what is wrong, on one line. The CLI prints those as one line with
exit code 2; anything else escaping is a bug in jaxrt and is reported as such, with its
traceback.

`InputError` is a `ValueError`, so API callers that catch `ValueError` keep working.
"""
from __future__ import annotations

import os
import stat


class InputError(ValueError):
    """Bad input: `str(e)` is one line naming the file or option and the problem."""


class SettingError(InputError):
    """A setting (a CLI option, an `Engine`/`SamplingParams` argument, a pass option) that
    cannot be honoured exactly; the message names the setting."""


class TemplateError(InputError):
    """A chat template that does not parse, fails while rendering, or goes over its time
    or output-size limit; the message names the template's source."""


class ResourceLimitError(InputError):
    """Input that would need more time or memory than jaxrt allows it (a file larger than
    a read cap, a KV cache larger than the memory budget)."""


# Whole-file reads of text (IR, JSON, templates) are capped: no legitimate engine's
# model.jxr or config is near this, and /dev/zero or a huge file must not exhaust memory.
MAX_TEXT_FILE_BYTES = 256 << 20


def read_text_file(path: str, what: str = "a text file", *,
                   limit: int = MAX_TEXT_FILE_BYTES) -> str:
    """A whole regular file as UTF-8 text, at most `limit` bytes. Refuses non-regular files
    (devices, FIFOs: /dev/zero never ends), larger files, and bytes that are not UTF-8, with
    an `InputError` naming the path."""
    return read_bytes_file(path, what, limit=limit, text=True)


def read_bytes_file(path: str, what: str = "a file", *, limit: int = MAX_TEXT_FILE_BYTES,
                    text: bool = False):
    try:
        # stat first: opening a FIFO would block, reading /dev/zero would never end
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(f"{path}: not a regular file; expected {what}")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path}: not a regular file; expected {what}")
            if st.st_size > limit:
                raise ResourceLimitError(f"{path}: {st.st_size} bytes, over the {limit}-byte "
                                         f"limit for {what}")
            data = f.read(st.st_size + 1)  # never a buffer sized by the limit
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; expected {what}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:  # grew while reading
        raise ResourceLimitError(f"{path}: over the {limit}-byte limit for {what}")
    if not text:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def check_text(text: object, what: str) -> str:
    """`text` if it is a str of valid Unicode, else an InputError naming `what`. Lone
    surrogates are what undecodable bytes become (command-line arguments decode with
    surrogateescape): the tokenizer cannot encode them."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # surrogateescape: an undecodable byte
            raise InputError(f"{what} is not valid UTF-8: undecodable byte "
                             f"0x{ord(ch) - 0xDC00:02x} at character {e.start}") from None
        raise InputError(f"{what} is not valid Unicode text: lone surrogate "
                         f"{ch!r} at character {e.start}") from None
    return text


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug in jaxrt."""
    return USER_ERRORS


# OS errors about a path the user named; UnicodeError: bytes the user gave that are not
# text (argv, files read by libraries).
USER_ERRORS: tuple[type[BaseException], ...] = (
    InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    UnicodeError)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)
