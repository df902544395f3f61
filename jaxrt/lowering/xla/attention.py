"""XLA rules for dense attention and the paged serving cache (kv.update, paged_attention).

Scores and softmax are f32; a fully masked query row (padding) yields zeros.

A quantized cache (int8 / e4m3fn codes with each row's f32 scale in its last 4 elements,
jaxrt/ir/quant.py) is written by `pack_rows` and read by `unpack_rows`, which follow the
numpy reference exactly (f32 division, round-half-even, clip; the scale's bits by
bitcast); the dequantized K/V meet the queries in the query's dtype.

`llm.paged_attention` visits a page table wider than one key block (`block_pages`) in a
loop of blocks with an online softmax (flash decoding), for ceil(max(context_lens) /
block) iterations, so its cost follows the batch's context, not the table's width, and
the runtime gives every bucket the full-width table (one MP per model, not a ladder of
compiles). A table that fits one block is attended to at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import jax
import jax.numpy as jnp
from jax import lax

from ...ir import DType, ops
from ...ir.quant import KV_SCALE_ELEMS, QUANT_DTYPES, kv_scale_limit
from ..registry import rule
from ._util import F32, cast, np_dtype, precision
from .quant import quantize, token_scale

# Key blocks of paged attention, measured on decode steps of SmolLM2's attention (H=9,
# KVH=3, D=64, pages of 16, a 512-page table; 'dense' = the whole table at once):
# - CPU: an iteration costs little beyond its work, and a context's last block is padded,
#   so blocks are small; the best size kept the batch's gathered K+V block near the caches
#   (2 MiB L2 per core, 32 MiB L3 here): 64..128 tokens for 32 sequences, ~256 for 8,
#   256..512 for one. The rule below gives 80 tokens at 32 sequences: 0.75 ms at context
#   100 and 33 ms at 4000 (dense: 210 ms at any context); fixed 256-token blocks took
#   2.5 ms at context 100 there, and 64-token blocks 1.5x 256's time for one sequence.
# - GPU (H200, bf16): each while-loop iteration costs about 30 us (kernel launches and a
#   host round trip for the trip condition), as much as a dense pass over ~1000 tokens of
#   32 sequences (the dense 8192-token table: 206 us). With 256-token blocks a context of
#   8000 took 1158 us, 2048-token blocks 489 us. Blocks are therefore large (up to 2048
#   tokens) but bounded in bytes (64 MiB of K+V per block), since a fixed-width table
#   gathered densely for a 512-row prefill bucket of an 8B model needs over 100 GiB.
CPU_BLOCK_BYTES = 4 << 20   # the gathered K+V block of every row, at the compute dtype
CPU_BLOCK_TOKENS = (64, 512)  # ... within these bounds
# Accelerators: a while-loop iteration costs ~30 us on an H200, so blocks are larger, but
# bounded in bytes: a dense gather of a fixed-width table (a 4,096-token table for 512
# prefill rows of an 8B model) would need over 100 GiB.
ACCELERATOR_BLOCK_BYTES = 64 << 20
ACCELERATOR_BLOCK_TOKENS = (256, 2048)


# Decode steps (one query a sequence) on an accelerator attend to the whole page table at
# once when its K+V is small, with no loop at all: XLA:GPU reads a `while` loop's
# predicate back to the host once per iteration (a dynamic trip count), which stalls the
# device ~20-60 us a layer, two or three times a layer, and keeps the decode loop and its
# command buffers from running without the host. Reading the whole table instead costs
# about three times its bytes (gather, write, read) where the loop reads only the blocks
# the batch can see: at DENSE_DECODE_BYTES a layer that is ~50 us of HBM time on an H200,
# about one round trip. Above it the block loop stops at the longest context.
DENSE_DECODE_BYTES = 64 << 20  # rows * table tokens * K+V bytes of a token, per layer
# A dense step reads its table's whole width, so decode loops compile for a ladder of
# table widths (`StepExecutable.decode_widths`) from this many tokens, by this factor.
DENSE_MIN_WIDTH_TOKENS = 512
DENSE_WIDTH_GROWTH = 4

# The runtime traces a decode program under `dense_decode()` when `decode_dense` says so;
# `_paged_attention` then takes the whole table as one block for [S, 1] queries.
_DENSE_DECODE = contextvars.ContextVar("jaxrt_dense_decode", default=False)


@contextlib.contextmanager
def dense_decode(on: bool = True):
    """Trace decode-step paged attention over the whole table at once (see
    DENSE_DECODE_BYTES); steps with several queries a sequence are unaffected."""
    token = _DENSE_DECODE.set(on)
    try:
        yield
    finally:
        _DENSE_DECODE.reset(token)


# JAXRT_DECODE_ATTENTION: `auto` (default) is dense within DENSE_DECODE_BYTES on
# accelerators and the block loop on CPUs (a CPU loop iteration costs nothing like a GPU
# one, and the loop reads less); `dense` is dense within the bound everywhere (for tests
# and comparisons), `dynamic` always the loop.
DECODE_ATTENTION_MODES = ("auto", "dense", "dynamic")


def decode_attention_mode() -> str:
    """JAXRT_DECODE_ATTENTION (auto, dense or dynamic; default auto), checked."""
    from ...errors import SettingError
    mode = os.environ.get("JAXRT_DECODE_ATTENTION", "auto").strip().lower() or "auto"
    if mode not in DECODE_ATTENTION_MODES:
        raise SettingError(f"JAXRT_DECODE_ATTENTION must be one of "
                           f"{', '.join(DECODE_ATTENTION_MODES)}, got {mode!r}")
    return mode


def decode_dense(rows: int, table_tokens: int, layer_token_bytes: int,
                 platform: str | None = None) -> bool:
    """Whether decode steps of `rows` sequences over tables of `table_tokens` tokens (K+V
    of a token in one layer: `layer_token_bytes`) attend to the whole table at once on
    `platform` (default: JAX's backend) rather than loop over key blocks."""
    mode = decode_attention_mode()
    if mode == "dynamic":
        return False
    if mode == "auto" and (platform or jax.default_backend()) == "cpu":
        return False
    return rows * table_tokens * layer_token_bytes <= DENSE_DECODE_BYTES


def block_pages(page_size: int, rows: int, token_bytes: int,
                platform: str | None = None) -> int:
    """Pages per key block of paged attention on `platform` (default: JAX's backend), for
    `rows` query rows whose K+V cost `token_bytes` per token (2 * KVH * D * itemsize)."""
    if (platform or jax.default_backend()) == "cpu":
        low, high = CPU_BLOCK_TOKENS
        tokens = min(max(CPU_BLOCK_BYTES // (rows * token_bytes), low), high)
    else:
        low, high = ACCELERATOR_BLOCK_TOKENS
        tokens = min(max(ACCELERATOR_BLOCK_BYTES // (rows * token_bytes), low), high)
    return max(1, tokens // page_size)


def _masked_scores(q, k, q_pos, k_pos, k_valid, attrs):
    """f32 scores [B, KVH, R, Q, L] with masked keys at -inf, and the mask
    [B, 1, 1, Q|1, L]. Shapes as in `attend`."""
    s = jnp.einsum("bqgrd,blgd->bgrql", q, k, precision=precision(q, k),
                   preferred_element_type=F32) * attrs.scale  # [B, KVH, R, Q, L]
    if attrs.softcap is not None:
        s = jnp.tanh(s / attrs.softcap) * attrs.softcap
    mask = k_valid[:, None, :]  # [B, 1, L]
    if attrs.causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[:, :, None])  # [B, Q, L]
    if attrs.window is not None:
        mask = mask & (q_pos[:, :, None] - k_pos[None, None, :] < attrs.window)
    mask = mask[:, None, None]  # [B, 1, 1, Q|1, L]
    return jnp.where(mask, s, -jnp.inf), mask


def attend(q, k, v, q_pos, k_pos, k_valid, attrs):
    """Masked GQA attention over a batch of sequences, f32 result.

    q[B, Q, KVH, R, D] (query head = kv_head * R + r), k[B, L, KVH, D], v[B, L, KVH, Dv],
    q_pos[B, Q], k_pos[L], k_valid[B, L] -> f32[B, Q, KVH, R, Dv].
    """
    s, mask = _masked_scores(q, k, q_pos, k_pos, k_valid, attrs)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    # bf16 models multiply probabilities in the value dtype (as transformers does); the
    # rounding stays within bf16 tolerance of the f32 reference.
    p = p.astype(v.dtype)
    return jnp.einsum("bgrql,blgd->bqgrd", p, v, precision=precision(p, v),
                      preferred_element_type=F32)


def _common(*xs):
    """The dtype q/k/v meet in: f32 if any of them is f32, else the query's."""
    return F32 if any(x.dtype == F32 for x in xs) else xs[0].dtype


@rule(ops.attention)
def _attention(ctx, q, k, v, *, attrs, out_types):
    b, s, h, d = q.shape  # q[B, S, H, D], k/v[B, L, KVH, D|Dv]
    length, kvh = k.shape[1], k.shape[2]
    ct = _common(q, k, v)
    qg = q.astype(ct).reshape(b, s, kvh, h // kvh, d)
    q_pos = jnp.broadcast_to(jnp.arange(length - s, length), (b, s))
    k_valid = jnp.ones((b, length), bool)
    out = attend(qg, k.astype(ct), v.astype(ct), q_pos, jnp.arange(length), k_valid, attrs)
    return cast(out.reshape(b, s, h, v.shape[3]), out_types[0])


def _cache_dtype(kv) -> DType | None:
    """The code dtype of a quantized cache array, None for a float cache."""
    dt = DType.from_numpy(kv.dtype)
    return dt if dt in QUANT_DTYPES else None


def pack_rows(x, dtype: DType):
    """Rows x[..., D] -> `dtype` codes and the row's f32 scale bits [..., D + 4]."""
    scale = token_scale(x, dtype)  # f32[..., 1]
    codes = quantize(x, scale, dtype)
    scale_bits = lax.bitcast_convert_type(scale, np_dtype(dtype))  # [..., 1, 4]
    return jnp.concatenate([codes, scale_bits.reshape(x.shape[:-1] + (KV_SCALE_ELEMS,))],
                           axis=-1)


def unpack_rows(packed, dtype):
    """Packed rows [..., D + 4] -> code * scale in `dtype` [..., D] (computed in f32)."""
    scale = lax.bitcast_convert_type(packed[..., -KV_SCALE_ELEMS:], F32)  # [...]
    # bits no write produces (an unwritten page) read as 0: see jaxrt/ir/quant.py
    scale = jnp.where(jnp.abs(scale) <= kv_scale_limit(packed.dtype), scale, 0.0)
    return (packed[..., :-KV_SCALE_ELEMS].astype(F32) * scale[..., None]).astype(dtype)


def _read_kv(kv, layer, which, cols, ct):
    """K (which=0) or V of pages `cols` [S, n] as `ct` [S, n, page_size, KVH, D]."""
    x = kv[layer, which, cols]
    return unpack_rows(x, ct) if _cache_dtype(kv) else x.astype(ct)


@rule(ops.kv_update)
def _kv_update(ctx, kv, k, v, slots, *base, attrs, out_types):
    pages, page_size = kv.shape[2], kv.shape[3]
    n = pages * page_size
    ok = (slots >= 0) & (slots < n)
    page = jnp.where(ok, slots // page_size, pages)  # padding -> out of range -> dropped
    offset = jnp.where(ok, slots % page_size, 0)
    # Scatter on the cache's own shape: a reshape around it would make XLA's fusion root a
    # bitcast, which it does not update in place, and every layer would rewrite the whole
    # cache (measured on CPU: 0.82 s vs 0.033 s per SmolLM2 decode step with 512 pages).
    layer = attrs.layer + base[0] if base else attrs.layer  # traced inside a layer scan
    code = _cache_dtype(kv)
    if code is not None:  # quantized as written: [T, KVH, D + 4]
        k, v = pack_rows(k, code), pack_rows(v, code)
    kv = kv.at[layer, 0, page, offset].set(k.astype(kv.dtype), mode="drop")
    return kv.at[layer, 1, page, offset].set(v.astype(kv.dtype), mode="drop")


def attend_block(carry, q, k, v, q_pos, k_pos, k_valid, attrs):
    """One online-softmax step: fold a block of keys into `carry` = (m, l, acc), the
    running max and sum f32[B, KVH, R, Q, 1] and the unnormalised output
    f32[B, KVH, R, Q, Dv]. Other shapes as in `attend`; `finish_blocks` normalises."""
    m, l, acc = carry
    s, mask = _masked_scores(q, k, q_pos, k_pos, k_valid, attrs)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: any finite ref
    alpha = jnp.exp(m - ref)  # rescales the old sums; 0 while m is -inf
    e = jnp.where(mask, jnp.exp(s - ref), 0.0)  # [B, KVH, R, Q, L], each <= 1
    # As in `attend`, probabilities meet v in its dtype (bf16 models); l stays f32.
    pv = jnp.einsum("bgrql,blgd->bgrqd", e.astype(v.dtype), v, precision=precision(v),
                    preferred_element_type=F32)
    return m_new, l * alpha + jnp.sum(e, axis=-1, keepdims=True), acc * alpha + pv


def start_blocks(b, kvh, r, n_q, dv):
    """The empty (m, l, acc) carry of `attend_block`."""
    shape = (b, kvh, r, n_q, 1)
    return (jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32),
            jnp.zeros((b, kvh, r, n_q, dv), F32))


def finish_blocks(carry):
    """(m, l, acc) -> f32[B, Q, KVH, R, Dv]; rows that saw no key are exact zeros."""
    _, l, acc = carry
    return jnp.transpose(acc / jnp.where(l > 0, l, 1.0), (0, 3, 1, 2, 4))


@rule(ops.paged_attention)
def _paged_attention(ctx, q, kv, page_table, context_lens, q_index, positions, *base, attrs,
                     out_types):
    t, h, d = q.shape  # q[T, H, D]
    pages, page_size, kvh = kv.shape[2], kv.shape[3], kv.shape[4]
    s, mp = page_table.shape
    n_q = q_index.shape[1]
    ct = _common(q) if _cache_dtype(kv) else _common(q, kv)
    table = jnp.clip(page_table, 0, pages - 1)
    layer = attrs.layer + base[0] if base else attrs.layer  # traced inside a layer scan
    rows = jnp.where((q_index >= 0) & (q_index < t), q_index, t)  # [S, Q]; t = padding
    qg = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)  # [S, Q, H, D]
    qg = qg.astype(ct).reshape(s, n_q, kvh, h // kvh, d)
    q_pos = jnp.take(positions, rows, axis=0, mode="fill", fill_value=0)  # [S, Q]
    # Keys past the table do not exist (the reference's view), whatever context_lens says.
    ctx_len = jnp.minimum(context_lens, mp * page_size)  # [S]
    bp = block_pages(page_size, s, 2 * kvh * d * jnp.dtype(ct).itemsize)
    if n_q == 1 and _DENSE_DECODE.get():
        bp = mp  # decode: the whole table at once (DENSE_DECODE_BYTES)
    if mp <= bp:  # the whole table is one block: attend to it at once, no loop
        k = _read_kv(kv, layer, 0, table, ct).reshape(s, mp * page_size, kvh, d)  # [S, L, ...]
        v = _read_kv(kv, layer, 1, table, ct).reshape(s, mp * page_size, kvh, d)
        k_pos = jnp.arange(mp * page_size)
        out = attend(qg, k, v, q_pos, k_pos,
                     k_pos[None, :] < ctx_len[:, None], attrs)  # f32[S, Q, KVH, R, D]
    else:
        out = _paged_blocks(qg, kv, layer, table, ctx_len, q_pos, rows < t, bp, ct, attrs)
    out = cast(out.reshape(s * n_q, h, d), out_types[0])
    flat = jnp.zeros((t, h, d), out.dtype)
    return flat.at[rows.reshape(-1)].set(out, mode="drop")  # [T, H, D]


def _paged_blocks(qg, kv, layer, table, ctx_len, q_pos, live, bp, ct, attrs):
    """Flash-decoding loop of paged attention over the key blocks the batch can see.

    qg[S, Q, KVH, R, D], table i32[S, MP] (valid page ids), ctx_len i32[S] (<= MP pages),
    q_pos/live [S, Q] (live: a real query) -> f32[S, Q, KVH, R, D].
    """
    s, n_q, kvh, r, d = qg.shape
    page_size = kv.shape[3]
    n_blocks = -(-table.shape[1] // bp)
    # Pad the table to whole blocks (a dynamic slice would otherwise be shifted back to
    # fit); the padding columns lie past ctx_len, so they are masked.
    table = jnp.pad(table, ((0, 0), (0, n_blocks * bp - table.shape[1])))
    block = bp * page_size
    stop = (jnp.max(ctx_len) + block - 1) // block  # <= n_blocks
    first = jnp.int32(0)
    if attrs.window is not None:
        # Keys before the earliest live query's window are masked for every query.
        earliest = jnp.min(jnp.where(live & (ctx_len[:, None] > 0), q_pos, stop * block))
        first = jnp.maximum(earliest - attrs.window + 1, 0) // block

    def body(i, carry):
        cols = lax.dynamic_slice_in_dim(table, i * bp, bp, axis=1)  # [S, bp]
        k = _read_kv(kv, layer, 0, cols, ct).reshape(s, block, kvh, d)  # [S, block, KVH, D]
        v = _read_kv(kv, layer, 1, cols, ct).reshape(s, block, kvh, d)
        k_pos = i * block + jnp.arange(block)
        return attend_block(carry, qg, k, v, q_pos, k_pos,
                            k_pos[None, :] < ctx_len[:, None], attrs)

    carry = lax.fori_loop(first.astype(jnp.int32), stop.astype(jnp.int32), body,
                          start_blocks(s, kvh, r, n_q, d))
    return finish_blocks(carry)
