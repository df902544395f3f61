"""Paged decode attention for Hopper GPUs, as a Pallas kernel on Mosaic GPU.

One program (CTA) attends the query heads of one KV head of one sequence to one split of
that sequence's context, reading only the pages its page table names:

- grid (KVH, splits, B); two warpgroups: a memory one that streams key/value blocks of
  `block_kv` tokens (`block_kv / page_size` TMA copies of one page each, into
  `stages`-deep shared-memory rings), and a compute one that runs QK^T and PV on the
  tensor cores (wgmma) with an online softmax in registers;
- the queries of a KV head (GQA: R = H / KVH rows, times Q queries of a sequence) fill the
  rows of one 64-row wgmma tile; the other rows are zeros and are dropped;
- each split writes its normalised output and log-sum-exp (base 2); `combine_splits`
  merges the splits in XLA (flash decoding). A sequence whose context ends before a split
  writes lse = -inf there, so empty splits weigh nothing.

A row's queries sit at consecutive positions from `q_start` (a decode token, a verify
step's k + 1 tokens, a prefill chunk's row of `q_block` queries). Keys at positions >=
context_len, after the query (causal), or outside the sliding window are masked; scores
are scaled and optionally soft-capped. Blocks past the row's last query are not read.

`reference` is the same computation in plain jnp over the gathered pages.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .mgpu_util import feed_ring

ROWS = 64            # one wgmma tile of query rows
SMEM_BYTES = 220 * 1024  # of the 227 KiB a block may use on Hopper (alignment padding)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
    block_kv: int = 64       # tokens per pipeline stage
    stages: int = 4          # K/V ring depth
    split_blocks: int = 8    # blocks per split at most (flash decoding), >= 1
    min_programs: int = 264  # splits are added until B * KVH * splits reaches this


def _split_layout(b, kvh, mp_tokens, cfg: Config):
    """(splits, blocks per split) for a table of mp_tokens."""
    blocks = -(-mp_tokens // cfg.block_kv)
    want = max(1, -(-cfg.min_programs // (b * kvh)))
    splits = min(want, blocks)
    per = -(-blocks // splits)
    per = max(per, 1)
    splits = -(-blocks // per)
    return splits, per


def smem_bytes(stages: int, head_dim: int, block_kv: int, table_entries: int,
               itemsize: int = 2) -> int:
    """Shared memory of one program: the query tile, the K and V rings, the page-table
    slice, the lse row and ~1 KiB for barriers and alignment."""
    return (ROWS * head_dim * itemsize + 2 * stages * block_kv * head_dim * itemsize
            + table_entries * 4 + ROWS * 4 + 1024)


def ring_stages(want: int, head_dim: int, block_kv: int, table_entries: int,
                itemsize: int = 2) -> int:
    """The K/V ring depth: `want`, or fewer where that would not fit SMEM_BYTES (head_dim
    256 or 128-token blocks at 4 stages overflowed an H100's 227 KiB)."""
    per_stage = 2 * block_kv * head_dim * itemsize
    fixed = smem_bytes(0, head_dim, block_kv, table_entries, itemsize)
    return max(1, min(want, (SMEM_BYTES - fixed) // per_stage))


def paged_attention(q, kv, layer, page_table, context_lens, q_start, *, scale: float,
                    softcap: float | None = None, window: int | None = None,
                    config: Config = Config(), interpret=None):
    """q[B, Q, H, D] (row b's Q queries at consecutive positions from q_start[b]),
    kv[L, 2, P, ps, KVH, D] (K at [layer, 0], V at [layer, 1]), layer i32 scalar,
    page_table i32[B, MP] (valid page ids), context_lens i32[B] (<= MP * ps; 0: no keys)
    -> out[B, Q, H, D] in q's dtype. Causal: query t sees keys at positions <
    context_lens[b] and <= q_start[b] + t (and within `window`); rows that see no key
    are zeros. `interpret`: Pallas's GPU interpret mode (the matmuls in jnp)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, n_q, h, d = q.shape
    n_layers, two, pages, ps, kvh, dk = kv.shape
    mp = page_table.shape[1]
    r = h // kvh
    if two != 2 or dk != d or h % kvh or n_q * r > ROWS:
        raise ValueError(f"paged_decode_attention: unsupported shapes q{q.shape} "
                         f"kv{kv.shape}")
    if d % 64 or q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"paged_decode_attention: head_dim {d} and dtype {q.dtype}/"
                         f"{kv.dtype} unsupported")
    bk = max(config.block_kv, ps)
    if bk % ps or bk % 64:
        raise ValueError(f"paged_decode_attention: block_kv {bk} vs page size {ps}")
    ppb = bk // ps                                   # pages per block
    cfg = dataclasses.replace(config, block_kv=bk)
    splits, per = _split_layout(b, kvh, mp * ps, cfg)
    split_pages = per * ppb
    # the page table padded to whole splits, each split's slice as rows of 32 entries
    # (a 128-byte TMA row; a TMA box holds <= 256 elements a dimension)
    pt_rows = -(-split_pages // 32)
    pt_cols = pt_rows * 32
    table = jnp.pad(page_table.astype(jnp.int32),
                    ((0, 0), (0, splits * split_pages - mp)))
    table = table.reshape(b, splits, split_pages)
    table = jnp.pad(table, ((0, 0), (0, 0), (0, pt_cols - split_pages)))
    table = table.reshape(b, splits, pt_rows, 32)
    # rows: (query token t, head r) -> t * R + r, padded to ROWS
    qr = q.reshape(b, n_q, kvh, r, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, n_q * r, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, ROWS - n_q * r), (0, 0)))
    flat = kv.reshape(n_layers * 2 * pages, ps, kvh, d)   # a bitcast: row-major
    scalars = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.int32(pages)])
    seq = jnp.stack([context_lens.astype(jnp.int32), q_start.astype(jnp.int32)])  # [2, B]
    stages = ring_stages(cfg.stages, d, bk, pt_cols, jnp.dtype(q.dtype).itemsize)
    dtype = q.dtype
    if interpret is None:
        layout_cast, iota = plgpu.layout_cast, plgpu.broadcasted_iota
    else:  # GPU interpret mode on a CPU knows no register layouts
        layout_cast = lambda x, layout: x  # noqa: E731
        iota = lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)  # noqa: E731

    def kernel(scal_ref, seq_ref, table_ref, q_ref, kv_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, pt_smem, lse_smem), bars = scoped
        q_bar, pt_bar, k_bars, v_bars, k_free, v_free = bars
        hd = lax.axis_index("kvh")
        sp = lax.axis_index("split")
        bi = lax.axis_index("b")
        wg = lax.axis_index("wg")
        ctx_len = seq_ref[0, bi]
        first_q = seq_ref[1, bi]
        start = sp * (per * bk)
        end = jnp.minimum(ctx_len, first_q + n_q)   # no query sees a key from here on
        n_blocks = jnp.clip((end - start + bk - 1) // bk, 0, per)
        layer_i = scal_ref[0]
        n_pages = scal_ref[1]
        k_base = layer_i * 2 * n_pages
        v_base = k_base + n_pages

        @pl.when(wg == 0)
        def _compute():
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hd], q_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            m_i = layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            l_i = layout_cast(jnp.full((ROWS,), 0, jnp.float32),
                                    plgpu.Layout.WGMMA.reduce(1))
            acc = layout_cast(jnp.full((ROWS, d), 0, jnp.float32),
                                    plgpu.Layout.WGMMA)
            row = iota(jnp.int32, (ROWS, bk), 0,
                                         layout=plgpu.Layout.WGMMA)
            col = iota(jnp.int32, (ROWS, bk), 1,
                                         layout=plgpu.Layout.WGMMA)
            # the position of a row's query
            q_pos = first_q if n_q == 1 else first_q + lax.div(row, jnp.int32(r))

            def body(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bars.at[slot])

                if interpret is None:
                    def qk_scope(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem,
                                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        return acc_ref[...]
                    s = pl.run_scoped(qk_scope, plgpu.ACC((ROWS, bk), jnp.float32))
                else:  # the interpreter's wgmma takes no transposed operand
                    s = jnp.dot(q_smem[...], k_smem[slot].T,
                                preferred_element_type=jnp.float32)
                refill = j + stages < n_blocks  # the memory side waits for that slot

                @pl.when(refill)
                def _k_free():
                    plgpu.barrier_arrive(k_free.at[slot])
                s = s * scale
                if softcap is not None:
                    s = jnp.tanh(s * (1.0 / softcap)) * softcap
                k_pos = start + j * bk + col
                ok = (k_pos < ctx_len) & (k_pos <= q_pos)
                if window is not None:
                    ok = ok & (q_pos - k_pos < window)
                s = jnp.where(ok, s * LOG2E, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_ref)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_ref, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_bars.at[slot])

                if interpret is None:
                    def pv_scope(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        return acc_ref[...]
                    pv = pl.run_scoped(pv_scope, plgpu.ACC((ROWS, d), jnp.float32))
                else:  # nor an operand in registers
                    pv = jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
                acc = acc + pv

                @pl.when(refill)
                def _v_free():
                    plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, n_blocks, body, (acc, m_i, l_i))
            safe_l = jnp.where(l_i > 0, l_i, 1.0)
            acc = acc / lax.broadcast_in_dim(safe_l, (ROWS, d), [0])
            q_smem[...] = acc.astype(dtype)
            lse_smem[...] = jnp.where(l_i > 0, m_i + jnp.log2(safe_l), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, hd, sp])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hd, sp])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.copy_gmem_to_smem(table_ref.at[bi, sp], pt_smem, pt_bar)
            plgpu.barrier_wait(pt_bar)

            def issue(j, slot):
                for p in range(ppb):
                    at = j * ppb + p
                    page = pt_smem[at // 32, at % 32]
                    dst = pl.ds(p * ps, ps)
                    plgpu.copy_gmem_to_smem(kv_ref.at[k_base + page, :, hd],
                                            k_smem.at[slot, dst], k_bars.at[slot])
                    plgpu.copy_gmem_to_smem(kv_ref.at[v_base + page, :, hd],
                                            v_smem.at[slot, dst], v_bars.at[slot])

            feed_ring(issue, n_blocks, stages, (k_free, v_free))

    def entry(scal_ref, seq_ref, table_ref, q_ref, kv_ref, o_ref, lse_ref):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        smem = (
            plgpu.SMEM((ROWS, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bk, d), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((pt_rows, 32), jnp.int32),
            plgpu.SMEM((ROWS,), jnp.float32),
        )
        bars = (
            plgpu.Barrier(),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        )
        pl.run_scoped(lambda *scoped: kernel(scal_ref, seq_ref, table_ref, q_ref, kv_ref,
                                             o_ref, lse_ref, scoped),
                      smem, bars, collective_axes="wg")

    kw = {} if interpret is None else {"interpret": interpret}
    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, kvh, splits, ROWS, d), dtype),
                  jax.ShapeDtypeStruct((b, kvh, splits, ROWS), jnp.float32)),
        grid=(kvh, splits, b),
        grid_names=("kvh", "split", "b"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(scalars, seq, table, qr, flat)
    out = combine_splits(out, lse)                       # f32[B, KVH, ROWS, D]
    out = out[:, :, :n_q * r].reshape(b, kvh, n_q, r, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, n_q, h, d).astype(dtype)


def combine_splits(out, lse):
    """Splits' normalised outputs [B, KVH, S, ROWS, D] and base-2 lse [B, KVH, S, ROWS]
    -> f32[B, KVH, ROWS, D]; rows no split saw are zeros."""
    if out.shape[2] == 1:
        return out[:, :, 0].astype(jnp.float32)
    m = jnp.max(lse, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m)                                   # [B, KVH, S, ROWS]
    total = jnp.sum(w, axis=2)
    o = jnp.einsum("bksr,bksrd->bkrd", w, out.astype(jnp.float32))
    return o / jnp.where(total > 0, total, 1.0)[..., None]


def reference(q, kv, layer, page_table, context_lens, q_start, *, scale: float,
              softcap: float | None = None, window: int | None = None):
    """The same attention in plain jnp (f32) over the gathered pages."""
    b, n_q, h, d = q.shape
    ps, kvh = kv.shape[3], kv.shape[4]
    mp = page_table.shape[1]
    k = kv[layer, 0][page_table].reshape(b, mp * ps, kvh, d).astype(jnp.float32)
    v = kv[layer, 1][page_table].reshape(b, mp * ps, kvh, d).astype(jnp.float32)
    r = h // kvh
    qg = q.astype(jnp.float32).reshape(b, n_q, kvh, r, d)
    s = jnp.einsum("bqgrd,blgd->bgrql", qg, k) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    k_pos = jnp.arange(mp * ps)
    q_pos = q_start[:, None] + jnp.arange(n_q)[None, :]                   # [B, Q]
    ok = (k_pos[None, None, :] < context_lens[:, None, None]) & \
        (k_pos[None, None, :] <= q_pos[:, :, None])
    if window is not None:
        ok = ok & (q_pos[:, :, None] - k_pos[None, None, :] < window)
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(ok[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("bgrql,blgd->bqgrd", p, v)
    return o.reshape(b, n_q, h, d)
