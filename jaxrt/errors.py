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

import errno as _errno
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


# OS errors about where the user asked output to go (a full disk, a read-only or quota-
# limited file system, an existing file where a directory must be made): theirs to fix.

OUTPUT_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EEXIST,
                           _errno.EFBIG, _errno.ENOTDIR})


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError)
                                          and e.errno in OUTPUT_ERRNOS)


def short_repr(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters, computed in bounded time and memory
    whatever the value (a 100 MB string or a list nested 100,000 deep): for echoing a bad
    value in a one-line message."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, limit, limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = 8
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - a user object's __repr__ may fail; name its type
        text = f"<{type(value).__name__}>"
    text = one_line(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# JSON read from files and requests nests at most this deep: configs and schemas need a
# handful of levels, and Python's json (recursive) fails at ~1,000 with a RecursionError,
# llguidance crashes on far less in a Python object.
MAX_JSON_DEPTH = 64


def json_text_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text, by one linear scan (no
    recursion, whatever the text; brackets inside strings are skipped)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    import re
    depth = deepest = 0
    # strings (escapes included) or one bracket: the only tokens that matter here
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', text):
        c = m.group()[0]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def check_json_depth(value: object, what: str, limit: int = MAX_JSON_DEPTH) -> object:
    """`value` (decoded JSON, or a Python dict/list an API caller built) if its
    lists/dicts nest at most `limit` deep, else an InputError naming `what`. Iterative:
    a value nested 100,000 deep is refused, never recursed into."""
    stack = [(value, 1)]
    deepest: dict[int, int] = {}  # id -> deepest level seen: shared containers (and
    while stack:                  # cycles) are walked again only when found deeper
        v, depth = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, (list, tuple)):
            items = v
        else:
            continue
        if depth > limit:
            raise InputError(f"{what}: nested more than {limit} levels deep")
        if deepest.get(id(v), 0) >= depth:
            continue
        deepest[id(v)] = depth
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list, tuple)))
    return value


def load_json(text: str | bytes, what: str, limit: int = MAX_JSON_DEPTH):
    """json.loads(text) refusing, with an InputError naming `what` on one line: text that
    is not JSON, and nesting over `limit` (checked before decoding: the decoder recurses)."""
    import json
    if json_text_depth(text) > limit:
        raise InputError(f"{what}: JSON nested more than {limit} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{what}: not UTF-8 (byte {e.start})") from None


def _library_dirs() -> tuple[str, ...]:
    """Directories whose code is not the user's: jaxrt, the standard library and the
    installed packages."""
    import sysconfig
    dirs = {os.path.dirname(os.path.abspath(__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.realpath(path))
    import site
    for path in [*site.getsitepackages(), site.getusersitepackages()]:
        dirs.add(os.path.realpath(path))
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def user_frame(e: BaseException, user_paths: tuple[str, ...] = ()) -> str:
    """"file:line" of the innermost frame of `e`'s traceback in the user's code: not
    jaxrt, the standard library or an installed package (unless under one of
    `user_paths`, the user's own module), "" if none. A SyntaxError names its own
    location. For one-line messages that blame the user's line, not a library's."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    library = _library_dirs()
    mine = tuple(os.path.realpath(p) for p in user_paths)
    found = ""
    tb = e.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        real = os.path.realpath(filename)
        if not filename.startswith("<") and (
                (mine and real.startswith(mine)) or not real.startswith(library)):
            found = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found
