"""Attention and KV-cache ops.

Two levels:
- `llm.attention` is dense: q[B, S, H, D] against k/v[B, L, KVH, D]; queries are the last
  S positions of the L keys. Causal, sliding window, GQA/MQA and logit soft-cap.
- `kv.update` and `llm.paged_attention` work on the serving cache
  kv[layers, 2, pages, page_size, KVH, D] for a ragged batch of tokens (see
  docs/architecture.md, "One step function"). The frontend emits them with symbolic
  `pages`/`page_size` dims; the plan-kv-cache pass binds them. A cache of int8 or
  e4m3fn codes (the quantize-kv-cache pass) is kv[..., KVH, D + 4]: each row's f32 scale
  rides in its last 4 elements (jaxrt/ir/quant.py); kv.update quantizes what it writes,
  paged attention dequantizes what it reads.
"""
from __future__ import annotations

import numpy as np

from ..opdef import AttrSpec, OpDef, Trait, VerifyError, register
from ..quant import KV_SCALE_ELEMS, is_quantized_cache, kv_head_dim, pack_kv, unpack_kv
from ..types import DType, TensorType
from ._util import as_compute, cast_to
from .nn import softmax_np

ATTN_ATTRS = {
    "scale": AttrSpec(float),
    "causal": AttrSpec(bool, default=True),
    # keys with q_pos - k_pos >= window are masked (HF convention: window includes self)
    "window": AttrSpec(int, default=None, optional=True),
    "softcap": AttrSpec(float, default=None, optional=True),  # tanh(s / c) * c on scores
}


def _check_heads(h, kvh, what):
    if isinstance(h, int) and isinstance(kvh, int) and (kvh == 0 or h % kvh):
        raise VerifyError(f"{what}: {h} query heads are not a multiple of {kvh} kv heads")


def _infer_attention(types, attrs):
    q, k, v = types
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise VerifyError(f"attention: expects rank-4 q/k/v, got {q}, {k}, {v}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise VerifyError("attention: q/k/v dtypes differ")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise VerifyError(f"attention: incompatible q {q}, k {k}, v {v}")
    _check_heads(q.shape[2], k.shape[2], "attention")
    if attrs.window is not None and attrs.window < 1:
        raise VerifyError("attention: window must be >= 1")
    return [TensorType(q.shape[:3] + (v.shape[3],), q.dtype)]


def attention_np(q, k, v, q_pos, k_pos, k_valid, attrs):
    """q[S, H, D], k/v[L, KVH, D]; q_pos[S], k_pos[L], k_valid[L] -> [S, H, Dv] (float32)."""
    h, kvh = q.shape[1], k.shape[1]
    rep = h // kvh
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = np.einsum("shd,lhd->hsl", q, k) * attrs.scale
    if attrs.softcap is not None:
        s = np.tanh(s / attrs.softcap) * attrs.softcap
    mask = np.broadcast_to(k_valid[None, :], (q.shape[0], k.shape[0])).copy()
    if attrs.causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if attrs.window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < attrs.window
    s = np.where(mask[None], s, -np.inf)
    p = softmax_np(s, axis=-1)
    p = np.where(mask[None], p, 0.0)
    return np.einsum("hsl,lhd->shd", np.nan_to_num(p), v)


def _ref_attention(q, k, v, *, attrs, out_types):
    q, k, v = as_compute(q), as_compute(k), as_compute(v)
    S, L = q.shape[1], k.shape[1]
    q_pos = np.arange(L - S, L)
    k_pos = np.arange(L)
    out = np.stack([attention_np(q[b], k[b], v[b], q_pos, k_pos, np.ones(L, bool), attrs)
                    for b in range(q.shape[0])])
    return cast_to(out, out_types[0])


attention = register(OpDef("llm.attention", 3, attrs=ATTN_ATTRS, infer=_infer_attention,
                           reference=_ref_attention))

# ---- paged serving cache ------------------------------------------------------------------


def _check_cache(kv: TensorType, what: str):
    if kv.rank != 6 or kv.shape[1] != 2:
        raise VerifyError(f"{what}: cache must be [layers, 2, pages, page_size, kv_heads, "
                          f"head_dim], got {kv}")
    d = kv.shape[5]
    if is_quantized_cache(kv) and isinstance(d, int) and d <= KV_SCALE_ELEMS:
        raise VerifyError(f"{what}: a quantized cache's rows are head_dim codes and "
                          f"{KV_SCALE_ELEMS} scale bytes, got {kv}")
    if not (kv.dtype.is_float or is_quantized_cache(kv)):
        raise VerifyError(f"{what}: cache dtype must be a float or i8/f8e4m3fn codes, "
                          f"got {kv}")


def _check_i32(t: TensorType, rank: int, what: str):
    if t.dtype != DType.int32 or t.rank != rank:
        raise VerifyError(f"{what}: expected rank-{rank} i32, got {t}")


def _check_layer_operand(extra, what):
    """The optional trailing operand: a dynamic i32[] added to the `layer` attribute (the
    body of a layer scan indexes the stacked cache with its iteration)."""
    if len(extra) > 1:
        raise VerifyError(f"{what}: at most one layer operand")
    if extra and (extra[0].dtype != DType.int32 or extra[0].rank != 0):
        raise VerifyError(f"{what}: layer operand must be i32[], got {extra[0]}")


def layer_of(attrs, extra) -> int:
    """Effective layer of a kv op: the attribute plus the optional dynamic operand."""
    return attrs.layer + (int(np.asarray(extra[0])) if extra else 0)


def _infer_kv_update(types, attrs):
    kv, k, v, slots, *extra = types
    _check_layer_operand(extra, "kv.update")
    _check_cache(kv, "kv.update")
    _check_i32(slots, 1, "kv.update slot_mapping")
    if k.shape != v.shape or k.rank != 3 or k.shape[1:] != (kv.shape[4], kv_head_dim(kv)):
        raise VerifyError(f"kv.update: k {k} / v {v} do not match cache {kv}")
    if k.shape[0] != slots.shape[0]:
        raise VerifyError("kv.update: one slot per token required")
    if isinstance(kv.shape[0], int) and not 0 <= attrs.layer < kv.shape[0]:
        raise VerifyError(f"kv.update: layer {attrs.layer} out of range for {kv}")
    return [kv]


def _ref_kv_update(kv, k, v, slots, *extra, attrs, out_types):
    out = kv.copy()
    _, _, pages, ps = kv.shape[:4]
    layer = layer_of(attrs, extra)
    if is_quantized_cache(TensorType(kv.shape, DType.from_numpy(kv.dtype))):
        dtype = DType.from_numpy(kv.dtype)
        k, v = pack_kv(as_compute(k), dtype), pack_kv(as_compute(v), dtype)
    flat_k = out[layer, 0].reshape(pages * ps, *kv.shape[4:])
    flat_v = out[layer, 1].reshape(pages * ps, *kv.shape[4:])
    for t, slot in enumerate(slots):
        if 0 <= slot < pages * ps:  # out-of-range slots mark padding tokens
            flat_k[slot] = k[t]
            flat_v[slot] = v[t]
    out[layer, 0] = flat_k.reshape(kv.shape[2:])
    out[layer, 1] = flat_v.reshape(kv.shape[2:])
    return out


# kv.update(kv, k[T, KVH, D], v[T, KVH, D], slot_mapping[T] [, base: i32[]]) {layer} -> kv
# slot = page * page_size + offset; slots outside the cache (padding) are dropped.
# The layer written is `layer` (+ `base` when given: a layer scan's dynamic offset).
kv_update = register(OpDef(
    "kv.update", (4, 5), attrs={"layer": AttrSpec(int)}, traits=frozenset({Trait.PURE}),
    infer=_infer_kv_update, reference=_ref_kv_update))


def _infer_paged_attention(types, attrs):
    q, kv, page_table, ctx, q_index, positions, *extra = types
    _check_layer_operand(extra, "llm.paged_attention")
    _check_cache(kv, "llm.paged_attention")
    if q.rank != 3 or q.shape[2] != kv_head_dim(kv):
        raise VerifyError(f"llm.paged_attention: q {q} must be [tokens, heads, "
                          f"{kv_head_dim(kv)}]")
    _check_heads(q.shape[1], kv.shape[4], "llm.paged_attention")
    _check_i32(page_table, 2, "page_table")
    _check_i32(ctx, 1, "context_lens")
    _check_i32(q_index, 2, "q_index")
    _check_i32(positions, 1, "positions")
    if page_table.shape[0] != ctx.shape[0] or q_index.shape[0] != ctx.shape[0]:
        raise VerifyError("llm.paged_attention: page_table, context_lens and q_index "
                          "disagree on the number of sequences")
    if positions.shape[0] != q.shape[0]:
        raise VerifyError("llm.paged_attention: one position per query token required")
    return [q]


def _ref_paged_attention(q, kv, page_table, ctx, q_index, positions, *extra, attrs,
                         out_types):
    q = as_compute(q)
    kvf = kv[layer_of(attrs, extra)]  # [2, pages, ps, KVH, D (+ 4 scale bytes)]
    if is_quantized_cache(TensorType(kv.shape, DType.from_numpy(kv.dtype))):
        kvf = unpack_kv(kvf)  # f32 code * scale
    kvf = as_compute(kvf)
    ps = kvf.shape[2]
    out = np.zeros(q.shape, np.float32)
    T = q.shape[0]
    for s in range(page_table.shape[0]):
        rows = [int(i) for i in q_index[s] if 0 <= i < T]
        if not rows:
            continue
        pages = np.clip(page_table[s], 0, kvf.shape[1] - 1)
        k = kvf[0][pages].reshape(-1, *kvf.shape[3:])  # [MP * ps, KVH, D]
        v = kvf[1][pages].reshape(-1, *kvf.shape[3:])
        k_pos = np.arange(k.shape[0])
        valid = k_pos < ctx[s]
        out[rows] = attention_np(q[rows], k, v, positions[rows], k_pos, valid, attrs)
    return cast_to(out, out_types[0])


# paged_attention(q[T, H, D], kv, page_table[S, MP], context_lens[S], q_index[S, Q],
#                 positions[T] [, base: i32[]]) {layer, scale, causal, window, softcap}
#   -> [T, H, D]   (layer read: `layer` + `base`, as for kv.update)
# q_index[s, j] is the flat token index of sequence s's j-th query (>= T for padding);
# context_lens[s] counts the cached tokens of s including this step's.
paged_attention = register(OpDef(
    "llm.paged_attention", (6, 7), attrs={"layer": AttrSpec(int), **ATTN_ATTRS},
    infer=_infer_paged_attention, reference=_ref_paged_attention))
