"""A persistent cache of materialized weights: dequantize and transform once per model.

Reading a GGUF dequantizes every tensor (about 7 s for Gemma 3 270M's Q4_K on two CPU
cores), and the pipeline's weight definitions (outline-layers stacks, cast-float casts)
are evaluated after that. Both are pure functions of the model file and the pipeline, so
their results, exactly the weights the functions read (`resident_weights`), are kept in

    $JAXRT_CACHE_DIR/weights/<key>/weights.safetensors   (default ~/.cache/jaxrt/weights)

and read back by later loads, which then read no source tensor at all.

- key: sha256 of the format, jaxrt's version, the code that turns files into weights (the
  readers and the definition evaluator), each source file's absolute path, size and
  mtime_ns, and every resident weight's name, type and definition chain down to its
  sources. The KV-cache plan is not in it: plan-kv-cache does not touch weights.
- Written to a temporary file beside the entry and renamed into place, so a reader sees a
  whole file or none. A file whose header does not validate, or whose names, shapes or
  dtypes differ from the module's, is ignored and rewritten, never trusted.
- Bounded: the MAX_ENTRIES most recently used entries are kept (an entry's directory
  mtime is its last use); older ones are deleted after each write.
- JAXRT_WEIGHT_CACHE=off disables it. Weights that do not come straight from a reader
  over real files (random benchmark weights, a test's dict) are never cached: nothing
  identifies them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import mmap
import os
import secrets
import shutil
import struct
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .ir.types import DType, TensorType

FORMAT = 2  # 2: tensors aligned for in-place use
MAX_ENTRIES = 4
WEIGHTS_FILE = "weights.safetensors"
SWITCH_ENV = "JAXRT_WEIGHT_CACHE"
ALIGN = 64  # bytes: JAX's CPU client uses a host array in place from this alignment
STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to a writer that died
# IR dtype -> safetensors dtype name
SAFETENSORS_NAMES = {DType.f32: "F32", DType.bf16: "BF16", DType.f16: "F16",
                     DType.int8: "I8", DType.int32: "I32", DType.bool_: "BOOL",
                     DType.f8e4m3: "F8_E4M3", DType.f8e5m2: "F8_E5M2"}
# The code that turns file bytes into weight values: a change to it invalidates entries.
_VALUE_CODE = ("frontends/gguf_reader.py", "frontends/hf_reader.py", "frontends/loaded.py",
               "ir/weights.py", "ir/quant.py")


def cache_dir() -> str | None:
    """$JAXRT_CACHE_DIR/weights, else ~/.cache/jaxrt/weights (the XLA cache's root);
    None when JAXRT_WEIGHT_CACHE is off."""
    if os.environ.get(SWITCH_ENV, "").lower() in ("off", "none", "0", "false"):
        return None
    from .frontends.sources import CACHE_ENV
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jaxrt")
    return os.path.join(os.path.expanduser(root), "weights")


def source_files(source: Any) -> list[str] | None:
    """The files a model's weights were read from: a GGUF file, or a Hugging Face
    directory's config.json and safetensors; None when `source` names no such files."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        return None
    path = os.path.abspath(os.fspath(source))
    if os.path.isfile(path):
        return [path]
    config = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config):
        shards = sorted(os.path.join(path, n) for n in os.listdir(path)
                        if n.endswith((".safetensors", ".safetensors.index.json")))
        return [config, *shards] if shards else None
    return None


def weight_chain(module, name: str, memo: dict[str, str] | None = None) -> str:
    """`@name : type = op(<chains of its sources>) {attrs}`, down to source weights."""
    from .ir.printer import format_attr_dict, format_symbol, format_type
    memo = {} if memo is None else memo
    if name not in memo:
        text = f"{format_symbol(name)} : {format_type(module.weights[name])}"
        d = module.weight_defs.get(name)
        if d is not None:
            text += (f" = {d.op}(" + ", ".join(weight_chain(module, s, memo)
                                               for s in d.sources) + ")"
                     + (" " + format_attr_dict(dict(d.attrs)) if d.attrs else ""))
        memo[name] = text
    return memo[name]


def cache_key(module, names: list[str], files: list[str]) -> str:
    from . import __version__
    h = hashlib.sha256(f"jaxrt weight cache {FORMAT} jaxrt {__version__} gguf "
                       f"{_gguf_version()}\n".encode())
    root = os.path.dirname(os.path.abspath(__file__))
    for rel in _VALUE_CODE:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    for path in files:
        st = os.stat(path)
        h.update(f"file {path} {st.st_size} {st.st_mtime_ns}\n".encode())
    memo: dict[str, str] = {}
    for n in names:
        h.update(f"weight {weight_chain(module, n, memo)}\n".encode())
    return h.hexdigest()


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")  # its dequantizers produce the values
    except PackageNotFoundError:
        return "none"


# ---- the cache file --------------------------------------------------------------------

class Entry:
    """An open cache file whose header holds exactly the expected weights; `read(name)`
    returns one tensor as a read-only view of the file, memory-mapped.

    Mapped, not read: JAX's CPU client uses a 64-byte-aligned host array in place, so a
    weight served from the page cache costs no copy and no fresh memory (a read into new
    memory is page faults: ~1.5 s for Gemma 3's 1 GiB on a 2-core VM, against a few
    milliseconds to map), and engines of one model share its pages. The writer aligns
    every tensor (`write_entry`). The price, as for llama.cpp's default mmap: the file
    must not be truncated in place while a process serves from it (that process would be
    killed by SIGBUS). jaxrt never does that: entries are replaced by rename and pruned by
    unlink, which leave a mapping intact. A file found shorter than its header says when
    a tensor is asked for is refused (OSError), never mapped.
    """

    def __init__(self, path: str, types: Mapping[str, TensorType]):
        from .frontends.hf_reader import read_safetensors_header
        header = read_safetensors_header(path)  # validated against the file size
        if set(header) != set(types):
            raise ValueError("different weights")
        for name, t in types.items():
            e = header[name]
            if tuple(e.shape) != t.shape or e.dtype != SAFETENSORS_NAMES.get(t.dtype):
                raise ValueError(f"{name} is {e.dtype}{list(e.shape)}, expected {t}")
        self._file = open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            self._size = os.fstat(self._file.fileno()).st_size
            data_len = max((e.end for e in header.values()), default=0)
            if self._size != 8 + n + data_len:  # replaced since the header was read
                raise ValueError("file changed")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, struct.error, ValueError):
            self._file.close()
            raise
        weakref.finalize(self, self._file.close)
        self.path, self._types, self._start = path, dict(types), 8 + n
        self._spans = {name: (e.begin, e.end) for name, e in header.items()}

    def read(self, name: str) -> np.ndarray:
        begin, end = self._spans[name]
        if os.fstat(self._file.fileno()).st_size != self._size:
            raise OSError(f"{self.path}: truncated while in use")
        t = self._types[name]
        dtype = t.dtype.to_numpy()
        count = (end - begin) // dtype.itemsize
        return np.frombuffer(self._map, dtype, count, self._start + begin).reshape(t.shape)

    def close(self) -> None:
        # The mapping lives as long as an array made from it (numpy holds a reference);
        # the file descriptor is not needed for that.
        self._file.close()


def open_entry(path: str, types: Mapping[str, TensorType]) -> Entry | None:
    """The cache file at `path` if it holds exactly `types` (names, shapes, dtypes) under a
    valid header; None for a missing, corrupt or mismatching file (never trusted)."""
    from .frontends.errors import ModelFormatError
    try:
        return Entry(path, types)
    except (ModelFormatError, OSError, ValueError):
        return None


def write_entry(entry: str, arrays: Mapping[str, np.ndarray],
                metadata: dict[str, str]) -> str | None:
    """Write `arrays` to entry/weights.safetensors atomically; the path, or None when the
    disk refuses (the cache is an optimization: loading goes on without it)."""
    final = os.path.join(entry, WEIGHTS_FILE)
    tmp = os.path.join(entry, f".{WEIGHTS_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(entry, exist_ok=True)
        _save_aligned(arrays, tmp, metadata)
        os.replace(tmp, final)
        return final
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None


def _save_aligned(arrays: Mapping[str, np.ndarray], path: str,
                  metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors start on ALIGN-byte boundaries (read in place by
    `Entry`): the header is padded with spaces (the format allows it) so the data section
    starts aligned, and the tensors whose sizes are multiples of ALIGN come first, largest
    first (in real models: all of them; any others still load, by copy). The format
    forbids gaps between tensors, so no padding goes there."""
    arrays = {n: _c_order(a) for n, a in arrays.items()}
    for name, a in arrays.items():
        if DType.from_numpy(a.dtype) not in SAFETENSORS_NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
    order = sorted(arrays, key=lambda n: (arrays[n].nbytes % ALIGN != 0, -arrays[n].nbytes, n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": SAFETENSORS_NAMES[DType.from_numpy(a.dtype)],
                        "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8))


def _c_order(a) -> np.ndarray:
    a = np.asarray(a)  # (np.ascontiguousarray would make a 0-d array 1-d)
    return a if a.flags.c_contiguous else a.copy(order="C")


def prune(root: str, max_entries: int = MAX_ENTRIES, keep: str | None = None) -> list[str]:
    """Delete all but the `max_entries` most recently used entries (and temporary files
    of writers that died); returns the deleted entry paths. `keep` is never deleted."""
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []

    def mtime(e) -> float:
        try:
            return e.stat(follow_symlinks=False).st_mtime
        except OSError:
            return 0.0

    entries.sort(key=mtime, reverse=True)
    kept, deleted = 0, []
    for e in entries:
        if e.path == keep or kept < max_entries - (keep is not None):
            kept += e.path != keep
            _drop_stale_tmp(e.path)
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        deleted.append(e.path)
    return deleted


def _drop_stale_tmp(entry: str) -> None:
    now = time.time()
    try:
        for f in os.scandir(entry):
            if f.name.endswith(".tmp") and now - f.stat().st_mtime > STALE_TMP_SECONDS:
                os.unlink(f.path)
    except OSError:
        pass


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


# ---- the mapping a CompiledModel serves ------------------------------------------------

class CachedWeights(Mapping[str, np.ndarray]):
    """The reader's weights plus the module's resident weights, the latter from the cache.

    On a hit each resident weight is read from the cache file when asked for. On a miss
    the first request for one materializes them all from the reader's mapping once,
    writes the cache and serves the written file (the arrays themselves if it could not
    be written). Other names go to the reader's mapping. `info` says what happened:
    {"key", "path", "status": hit | miss | written | unwritten}.
    """

    def __init__(self, module, names: list[str], fallback: Mapping[str, np.ndarray],
                 entry: str, key: str, *, max_entries: int = MAX_ENTRIES):
        # The definitions as they are now, whatever later happens to `module`: the key
        # describes them.
        self._module = copy.copy(module)
        self._module.weights = dict(module.weights)
        self._module.weight_defs = dict(module.weight_defs)
        self._types = {n: module.weights[n] for n in names}
        self._fallback = fallback
        self._dir, self._max_entries = entry, max_entries
        path = os.path.join(entry, WEIGHTS_FILE)
        self._entry = open_entry(path, self._types) if os.path.exists(path) else None
        self._arrays: dict[str, np.ndarray] | None = None  # when the write failed
        self.info: dict[str, Any] = {"key": key, "path": path,
                                     "status": "miss" if self._entry is None else "hit"}
        if self._entry is not None:
            _touch(entry)

    def _fill(self) -> None:
        from . import __version__
        from .ir.weights import materialize
        start = time.perf_counter()
        arrays = materialize(self._module, self._fallback, list(self._types),
                             on_result=lambda _, a: np.ascontiguousarray(a))
        self.info["materialize_seconds"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        path = write_entry(self._dir, arrays, {"format": str(FORMAT),
                                               "jaxrt_version": __version__,
                                               "key": self.info["key"]})
        self._entry = open_entry(path, self._types) if path else None
        self.info["write_seconds"] = round(time.perf_counter() - start, 3)
        self.info["status"] = "written" if self._entry is not None else "unwritten"
        if path:
            prune(os.path.dirname(self._dir), self._max_entries, keep=self._dir)
        # Served from the file when it was written: the same values, and the host need
        # not keep a copy beside the device's.
        self._arrays = None if self._entry is not None else arrays

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._types:
            return self._fallback[name]
        if self._entry is None and self._arrays is None:
            self._fill()
        if self._arrays is not None:
            return self._arrays[name]
        try:
            return self._entry.read(name)
        except OSError:  # truncated under us: recompute rather than trust it
            self._entry.close()
            self._entry = None
            self.info["status"] = "miss"
            return self[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types or name in self._fallback

    def __iter__(self) -> Iterator[str]:
        yield from self._fallback
        yield from (n for n in self._types if n not in self._fallback)

    def __len__(self) -> int:
        return len(self._fallback) + sum(n not in self._fallback for n in self._types)


def cached_weights(module, loaded, *, max_entries: int = MAX_ENTRIES
                   ) -> tuple[Mapping[str, np.ndarray], dict[str, Any]]:
    """(weights, info) for a module compiled from `loaded`: a CachedWeights when the
    weights come from a reader over files and the cache is on, else `loaded.weights`."""
    from .frontends.loaded import LazyWeights
    from .ir.weights import resident_weights
    root = cache_dir()
    if root is None:
        return loaded.weights, {"status": "off"}
    files = source_files(getattr(loaded, "source", None))
    if files is None or not isinstance(loaded.weights, LazyWeights):
        return loaded.weights, {"status": "no source files"}
    names = resident_weights(module)
    try:
        key = cache_key(module, names, files)
    except OSError:  # a source file vanished since it was read
        return loaded.weights, {"status": "no source files"}
    weights = CachedWeights(module, names, loaded.weights, os.path.join(root, key), key,
                            max_entries=max_entries)
    return weights, weights.info
