"""Calibration: the input ranges of every linear projection, and SmoothQuant's factors.

    jaxrt calibrate MODEL [--data FILE] [--alpha A] [--percentile P] [--num-tokens N] -o DIR

runs one window of text through the float model with the reference interpreter
(jaxrt/ir/interpreter.py, its `observe` hook reading each `llm.linear`'s input) on the
module as the frontend builds it (canonicalized, no fusion: one linear per projection
weight), and writes

    DIR/calibration.safetensors   f32 tensors, per linear weight W [out, in]:
        <W>.act_max  [in]  max |x_j| over the calibration tokens (per input channel)
        <W>.act_pct  [in]  the P-th percentile of |x_j| (per input channel)
        <W>.smooth   [in]  SmoothQuant's s_j = act_max_j^alpha / max|W_:j|^(1 - alpha),
                           the weight maximum over every linear reading the same input
    DIR/calibration.json          {format, model, arch, alpha, percentile, tokens, data,
                                   seed, groups: the linears sharing one input,
                                   data_sha256: the text's hash (with --data)}

With `--gptq MODE` (int8-weight, fp8-weight, w8a8, fp8) the same pass also accumulates
H = X^T X / n (float64) per group of linears reading one input, then runs GPTQ
(jaxrt/gptq.py) over each group's weights concatenated along their output rows (q/k/v
share one H, gate/up another), and writes per linear weight W

        <W>.gptq_codes  [out, in] i8 codes; for fp8 the u8 bit pattern of the e4m3fn codes
                                  (safetensors' numpy reader has no fp8 type)
        <W>.gptq_scale  [out, 1]  f32 per-output-channel scales (RTN's: compute_scale)

and a `gptq` entry {mode, dtype, damp, block, act_order, tokens, seconds} in the JSON.
quantize{method=gptq calib=DIR} reads those codes as they are.

No pickle: safetensors and JSON only. The quantize pass reads `<W>.act_max` through
`calibration()` weight definitions (jaxrt/ir/weights.py), recomputing s at its own alpha
at load (`.smooth` records the factors at the calibration's alpha, for inspection).

Without --data, calibration is data-free: the model samples its own text from BOS
(temperature 1, top-k SAMPLE_TOP_K, a seeded numpy generator: deterministic), so a mode
that needs calibration works out of the box.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, SettingError
from .gptq import (DEFAULT_BLOCK, DEFAULT_DAMP, Hessians, check_gptq_options,
                   gptq_calibration)
from .ir.types import DType

FORMAT = 1
TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"
DEFAULT_ALPHA = 0.5
DEFAULT_PERCENTILE = 99.9
DEFAULT_TOKENS = 512  # calibration text (--data)
DEFAULT_FREE_TOKENS = 256  # self-sampled text (data-free): one decode step per token
SAMPLE_TOP_K = 50
PAGE_SIZE = 16


@dataclass(frozen=True)
class Calibration:
    """A calibration file as read: its path, content hash, metadata, the shape of each
    `<weight>.act_max` tensor and of each `<weight>.gptq_codes` tensor."""

    file: str
    sha256: str
    meta: dict
    act_shapes: dict[str, tuple[int, ...]]  # weight name -> (in,)
    gptq_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (out, in)

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])

    @property
    def gptq_dtype(self) -> DType | None:
        """The dtype of the GPTQ codes (None: the calibration has none)."""
        return DType(self.meta["gptq"]["dtype"]) if self.gptq_shapes else None

    def tensor_name(self, weight: str) -> str:
        return f"{weight}.act_max"


def check_options(alpha: float, percentile: float, num_tokens: int | None,
                  seed: int = 0) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise SettingError(f"--alpha must be in [0, 1], got {alpha}")
    if not 0.0 < percentile <= 100.0:
        raise SettingError(f"--percentile must be in (0, 100], got {percentile}")
    if num_tokens is not None and num_tokens < 2:
        raise SettingError(f"--num-tokens must be >= 2, got {num_tokens}")
    if not isinstance(seed, int) or seed < 0:  # numpy's generators take none below 0
        raise SettingError(f"--seed must be a non-negative integer, got {seed}")


# ---- capture ------------------------------------------------------------------------------

def capture_ranges(loaded, ids: list[int], percentile: float,
                   hessians: Hessians | None = None
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[list[str]]]:
    """({weight: (act_max [in], act_pct [in])}, groups of weights reading one input) of
    one prefill of `ids` through the float model, by the reference interpreter; with
    `hessians`, also X^T X / n of each group's input, under its first weight's name."""
    from .frontends.build import build_module
    from .ir import interpreter, ops
    from .ir.types import substitute_dims
    from .passes import PassManager
    module = build_module(loaded.config)
    PassManager("canonicalize,cse,dce").run(module)
    fn = module.functions["step"]
    n = len(ids)
    pages = math.ceil(n / PAGE_SIZE)
    kv_type = substitute_dims(fn.arg("kv").type, {"pages": pages, "page_size": PAGE_SIZE})
    pos = np.arange(n, dtype=np.int32)
    inputs = [np.asarray(ids, np.int32), pos, pos, np.arange(pages, dtype=np.int32)[None],
              np.asarray([n], np.int32), pos[None], np.asarray([n - 1], np.int32),
              np.zeros(kv_type.shape, kv_type.dtype.to_numpy())]
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    groups: dict[object, list[str]] = {}

    def observe(op, values):
        src = op.operands[1].owner if op.opdef is ops.linear else None
        if src is None or src.opdef is not ops.weight:
            return
        x = np.abs(np.asarray(values[0], np.float32).reshape(-1, values[0].shape[-1]))
        name = src.attrs.name
        ranges[name] = (x.max(axis=0), np.percentile(x, percentile, axis=0)
                        .astype(np.float32))
        group = groups.setdefault(op.operands[0], [])
        if hessians is not None and not group:  # one H per input, not per linear
            hessians.add(name, values[0])
        group.append(name)

    interpreter.run(module, "step", inputs, loaded.weights, observe=observe)
    if not ranges:
        raise InputError("calibrate: the model has no linear projection reading a weight")
    return ranges, list(groups.values())


def sample_ids(loaded, num_tokens: int, seed: int) -> list[int]:
    """`num_tokens` tokens the float model samples from BOS (temperature 1, top-k
    SAMPLE_TOP_K, numpy's PCG64 seeded with `seed`): data-free calibration text."""
    from .compiler import Target, compile_loaded
    bos = getattr(loaded.tokenizer, "bos_id", None)
    if bos is None:
        bos = loaded.config.bos_token_id
    ids = [bos if bos is not None else 0]
    model = compile_loaded(loaded, target=Target.detect("float32"),
                           max_model_len=num_tokens, num_pages=math.ceil(num_tokens / PAGE_SIZE),
                           page_size=PAGE_SIZE, max_num_seqs=1)
    exe = model.executable()
    rng = np.random.default_rng(seed)
    page_table = np.arange(math.ceil(num_tokens / PAGE_SIZE), dtype=np.int32)[None]
    zero = np.zeros(1, np.int32)
    while len(ids) < num_tokens:
        p = np.asarray([len(ids) - 1], np.int32)
        logits = np.asarray(exe.run(np.asarray(ids[-1:], np.int32), p, p, page_table,
                                    np.asarray([len(ids)], np.int32), zero[None], zero),
                            np.float64)[0]
        top = np.argpartition(logits, -SAMPLE_TOP_K)[-SAMPLE_TOP_K:]
        prob = np.exp(logits[top] - logits[top].max())
        ids.append(int(top[rng.choice(len(top), p=prob / prob.sum())]))
    return ids


def calibrate(model_spec: str, out_dir: str, *, data: str | None = None,
              alpha: float = DEFAULT_ALPHA, percentile: float = DEFAULT_PERCENTILE,
              num_tokens: int | None = None, seed: int = 0, data_name: str = "",
              gptq: str | None = None, gptq_damp: float = DEFAULT_DAMP,
              gptq_block: int = DEFAULT_BLOCK) -> dict:
    """Calibrate `model_spec` (float weights) and write `out_dir`; returns the metadata.
    `data`: the text itself (None: data-free), `data_name` where it came from; `gptq`:
    the quantize mode to write GPTQ codes for (None: none)."""
    from .frontends.sources import load_model, resolve_model
    check_options(alpha, percentile, num_tokens, seed)
    check_gptq_options(gptq, gptq_damp, gptq_block)
    if resolve_model(model_spec)[0] == "engine":
        raise InputError(f"{model_spec}: an engine directory; calibrate the model it was "
                         f"compiled from (its float weights)")
    if data is not None and not data.strip():
        raise InputError("calibrate: the data text is empty")
    return calibrate_loaded(load_model(model_spec), out_dir, data=data, alpha=alpha,
                            percentile=percentile, num_tokens=num_tokens, seed=seed,
                            model=model_spec, data_name=data_name, gptq=gptq,
                            gptq_damp=gptq_damp, gptq_block=gptq_block)


def calibrate_loaded(loaded, out_dir: str, *, data: str | None = None,
                     alpha: float = DEFAULT_ALPHA, percentile: float = DEFAULT_PERCENTILE,
                     num_tokens: int | None = None, seed: int = 0, model: str = "",
                     data_name: str = "", gptq: str | None = None,
                     gptq_damp: float = DEFAULT_DAMP, gptq_block: int = DEFAULT_BLOCK) -> dict:
    from .ir.weights import smooth_factors
    check_options(alpha, percentile, num_tokens, seed)
    check_gptq_options(gptq, gptq_damp, gptq_block)
    limit = loaded.config.max_position
    if num_tokens is not None and num_tokens > limit:  # never quietly fewer
        raise SettingError(f"--num-tokens {num_tokens} exceeds the model's context of "
                           f"{limit} tokens")
    if data is None:
        n = min(num_tokens or DEFAULT_FREE_TOKENS, limit)
        ids = sample_ids(loaded, n, seed)
    else:
        ids = loaded.tokenizer.encode_text(data)
        if num_tokens is not None and len(ids) < num_tokens:
            raise InputError(f"--num-tokens {num_tokens} exceeds the data text's "
                             f"{len(ids)} tokens")
        ids = ids[:min(num_tokens or DEFAULT_TOKENS, limit)]
        if len(ids) < 2:
            raise InputError(f"calibrate: the data text is {len(ids)} token(s); at least 2")
    hessians = Hessians() if gptq else None
    ranges, groups = capture_ranges(loaded, ids, percentile, hessians)
    tensors: dict[str, np.ndarray] = {}
    for group in groups:
        act = np.max([ranges[w][0] for w in group], axis=0)
        s = smooth_factors(act, [np.asarray(loaded.weights[w]) for w in group], alpha)
        for w in group:
            tensors[f"{w}.act_max"], tensors[f"{w}.act_pct"] = ranges[w]
            tensors[f"{w}.smooth"] = s
    meta = {"format": FORMAT, "model": model or str(loaded.source), "arch": loaded.config.arch,
            "alpha": alpha, "percentile": percentile, "tokens": len(ids),
            "data": "self-sampled" if data is None else (data_name or "text"), "seed": seed,
            "groups": groups}
    if data is not None:  # what eval-ppl compares with the text it scores (data_sha256)
        meta["data_sha256"] = data_sha256(data)
    if gptq:
        meta["gptq"] = gptq_calibration(loaded.weights, groups, hessians, gptq, gptq_damp,
                                        gptq_block, tensors)
        meta["gptq"]["tokens"] = len(ids)
    write_calibration(out_dir, tensors, meta)
    return meta


def data_sha256(text: str) -> str:
    """The content hash of a calibration text, as calibration.json records it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_calibration(loaded) -> str:
    """A data-free calibration of `loaded` at the defaults, made once per model file and
    kept under $JAXRT_CACHE_DIR/calibration/<key> (a temporary directory for weights
    that come from no file): what a calibrated mode uses when given no calibration."""
    import tempfile

    from . import __version__
    from .frontends.sources import CACHE_ENV
    from .weight_cache import source_files
    files = source_files(getattr(loaded, "source", None))
    if files is None:
        out = tempfile.mkdtemp(prefix="jaxrt-calibration-")
    else:
        h = hashlib.sha256(f"jaxrt calibration {FORMAT} {__version__} {DEFAULT_ALPHA} "
                           f"{DEFAULT_PERCENTILE} {DEFAULT_FREE_TOKENS} {SAMPLE_TOP_K}\n"
                           .encode())
        for path in files:
            st = os.stat(path)
            h.update(f"file {path} {st.st_size} {st.st_mtime_ns}\n".encode())
        root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jaxrt")
        out = os.path.join(os.path.expanduser(root), "calibration", h.hexdigest()[:32])
        if os.path.isfile(os.path.join(out, META_FILE)):
            return out
    calibrate_loaded(loaded, out)
    return out


# ---- files --------------------------------------------------------------------------------

def write_calibration(out_dir: str, tensors: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file
    try:
        os.makedirs(out_dir, exist_ok=True)
        # f32, but GPTQ's codes: i8, or the u8 bits of e4m3fn codes
        save_file({k: np.ascontiguousarray(v, v.dtype if v.dtype in (np.int8, np.uint8)
                                           else np.float32) for k, v in tensors.items()},
                  os.path.join(out_dir, TENSORS_FILE))
        with open(os.path.join(out_dir, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot write the calibration: {e.strerror or e}") \
            from None


def calibration_file(path: str) -> str:
    """The safetensors file of a calibration directory (or the file itself)."""
    file = os.path.join(path, TENSORS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise InputError(f"{path}: no calibration here (expected a directory holding "
                         f"{TENSORS_FILE}, from jaxrt calibrate)")
    return file


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# GPTQ's code tensors: safetensors dtype -> the codes' dtype (fp8 stored as its u8 bits)
GPTQ_CODE_DTYPES = {"I8": DType.int8, "U8": DType.f8e4m3}


def read_calibration(path: str) -> Calibration:
    """A calibration directory (or its safetensors file), validated: every tensor f32
    [in], named `<weight>.act_max|act_pct|smooth`, or GPTQ's `<weight>.gptq_codes` (i8 /
    u8 [out, in], the dtype calibration.json's `gptq` entry names) and
    `<weight>.gptq_scale` (f32 [out, 1]); a calibration.json of this format."""
    from .frontends.errors import ModelFormatError
    from .frontends.hf_reader import read_safetensors_header
    file = os.path.abspath(calibration_file(path))
    try:
        header = read_safetensors_header(file)
    except ModelFormatError as e:
        if not os.path.isdir(path):  # e.g. the text a calibration is made from
            raise InputError(f"{path}: not a calibration: expected a directory from `jaxrt "
                             f"calibrate MODEL [--data TEXT] -o DIR` (holding "
                             f"{TENSORS_FILE}), got a file that is not one") from None
        raise InputError(f"{path}: not a calibration file: {e}") from None
    meta_path = os.path.join(os.path.dirname(file), META_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{meta_path}: cannot read the calibration metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(
            meta.get("alpha"), (int, float)):
        raise InputError(f"{meta_path}: not calibration metadata of format {FORMAT}")
    gptq = meta.get("gptq")
    code_dtype = gptq.get("dtype") if isinstance(gptq, dict) else None
    shapes, codes, scales = {}, {}, {}
    for name, e in header.items():
        weight, _, kind = name.rpartition(".")
        if kind == "gptq_codes" and len(e.shape) == 2 and e.dtype in GPTQ_CODE_DTYPES:
            if GPTQ_CODE_DTYPES[e.dtype].value != code_dtype:
                says = f"says {code_dtype} codes" if code_dtype else "has no gptq entry"
                raise InputError(f"{file}: GPTQ codes {name} are {e.dtype} "
                                 f"({GPTQ_CODE_DTYPES[e.dtype].value}), but {META_FILE} "
                                 f"{says}")
            codes[weight] = tuple(e.shape)
        elif kind == "gptq_scale" and len(e.shape) == 2 and e.dtype == "F32" and \
                e.shape[1] == 1:
            scales[weight] = e.shape[0]
        elif kind in ("act_max", "act_pct", "smooth") and e.dtype == "F32" and \
                len(e.shape) == 1:
            if kind == "act_max":
                shapes[weight] = tuple(e.shape)
        else:
            raise InputError(f"{file}: tensor {name} ({e.dtype}{list(e.shape)}) is not "
                             f"a calibration tensor")
    if not shapes:
        raise InputError(f"{file}: the calibration holds no activation ranges")
    for weight in codes.keys() | scales.keys():
        if scales.get(weight) != codes.get(weight, (None,))[0]:
            raise InputError(f"{file}: GPTQ weight {weight} needs both .gptq_codes [out, "
                             f"in] and .gptq_scale [out, 1]")
    return Calibration(file, file_sha256(file), meta, shapes, codes)


def read_calibration_tensor(file: str, tensor: str, sha256: str) -> np.ndarray:
    """One tensor of a calibration file whose content hash must still be `sha256`."""
    from safetensors import safe_open
    try:
        now = file_sha256(file)
    except OSError as e:
        raise InputError(f"{file}: cannot read the calibration: {e.strerror or e}") from None
    if now != sha256:
        raise InputError(f"{file}: the calibration changed since the pipeline read it; "
                         f"compile again")
    with safe_open(file, framework="numpy") as f:
        return f.get_tensor(tensor)
