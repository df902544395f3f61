"""Weight-only quantized linear at decode shapes for Hopper GPUs, as a Pallas kernel on
Mosaic GPU:

    y[T, N] = (x[T, K] . codes[N, K]^T) * scale[N]     (f32 out; the caller casts)

with x bf16/f16, codes int8 or float8_e4m3fn and one f32 scale per output channel. At
decode (T <= 64) the op is memory-bound: the kernel's job is to stream the codes once at
a large fraction of HBM bandwidth, converting them to x's dtype on the way (exact: every
int8 and e4m3 value is a bf16 and an f16 value), so the weight crosses HBM at 1 byte an
element instead of bf16's 2.

- The matmul is computed transposed, acc[N, T] = codes . x^T, so the weight is wgmma's
  64-row A operand (from registers, where it is converted) and the tokens are its N
  dimension: T is padded to a multiple of 8 (`Plan.t_pad`), the wgmma N granularity.
- Grid (N / tile_n, splits). A program owns `tile_n` weight rows (one compute warpgroup
  per 64 of them) and one split of K (flash-decoding style: `per` steps of `tile_k`
  columns each), so even N = 2048 fills the SMs. `plan` chooses the split count with a
  cost model: waves of `Config.sms` programs times each program's steps plus a fixed
  overhead, plus the f32 partials' traffic.
- Warp specialization as in `paged_attention_mgpu`: a memory warpgroup issues TMA copies
  of the codes tile [tile_n, tile_k] and the matching x tile [t_pad, tile_k] into a
  `stages`-deep ring (one barrier a slot, two copies arrive on it); each compute
  warpgroup loads its 64 rows of the codes tile 128 columns at a time into registers
  (layout WGMMA_UPCAST_2X: 32-bit shared-memory loads), converts them, relayouts to the
  wgmma A layout and issues wgmma against the transposed x tile, accumulating f32 in
  registers; after a step's wgmmas retire it frees the slot.
- Each program writes its f32 partial [64 x warpgroups, t_pad] through shared memory with
  TMA; XLA sums the splits, applies the per-row scale and transposes to [T, N]
  (`weight_only_linear`). Summing in XLA keeps the result deterministic (no atomics).

`reference` is the same computation in plain jnp (f32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .mgpu_util import feed_ring

ROWS = 64             # weight rows of one compute warpgroup: one wgmma M tile
CHUNK = 128           # codes columns converted per wgmma: one 128-byte swizzled row
MAX_TOKENS = 64       # the kernel's domain: decode and short verify steps
SMEM_BYTES = 220 * 1024  # of the 227 KiB a block may use on Hopper (alignment padding)
X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


@dataclasses.dataclass(frozen=True)
class Config:
    tile_n: int = 128       # weight rows a program takes (64 per compute warpgroup)
    tile_k: int = 256       # K columns per pipeline step, a multiple of CHUNK, <= 256
    stages: int = 4         # ring depth (fewer where shared memory or the split runs out)
    sms: int = 132          # programs that run at once (an H100 SXM's SMs, one each)
    overhead_kib: int = 32  # a program's fixed cost (ring fill, epilogue) in KiB of codes
    splits: int | None = None  # K splits; None: chosen by `plan`'s cost model


DEFAULT = Config()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: the padded token count, the tiles, the ring depth, and the K
    splits (`splits` programs a row tile, each `per` steps; the last may have fewer)."""
    t_pad: int
    tile_n: int
    tile_k: int
    stages: int
    splits: int
    per: int

    @property
    def warpgroups(self) -> int:
        return self.tile_n // ROWS


def tiles(n: int, k: int, config: Config = DEFAULT) -> tuple[int, int]:
    """(tile_n, tile_k) for codes [n, k]: the config's, halved to 64 / 128 where they do
    not divide the shape (every Llama projection takes 128 x 256)."""
    tn = config.tile_n if n % config.tile_n == 0 else ROWS
    tk = config.tile_k if k % config.tile_k == 0 else CHUNK
    return tn, tk


def applies(x_dtype, code_dtype, tokens: int, n: int, k: int, groups: int = 1,
            config: Config = DEFAULT) -> bool:
    """Whether the kernel covers x[tokens, k] . codes[n, k]^T with `groups` scale groups a
    row: bf16/f16 activations, int8/e4m3 codes, 1..64 tokens, one scale a row, n a
    multiple of 64 and k of 128."""
    return (jnp.dtype(x_dtype) in X_DTYPES and jnp.dtype(code_dtype) in CODE_DTYPES
            and 1 <= tokens <= MAX_TOKENS and groups == 1 and n > 0 and k > 0
            and n % ROWS == 0 and k % CHUNK == 0
            and config.tile_n in (ROWS, 2 * ROWS)
            and config.tile_k % CHUNK == 0 and config.tile_k <= 256)


def smem_bytes(stages: int, t_pad: int, tile_n: int, tile_k: int, x_itemsize: int = 2) -> int:
    """Shared memory of one program: the codes and x rings, the f32 output staging and
    ~1 KiB for barriers and alignment."""
    per_stage = tile_n * tile_k + t_pad * tile_k * x_itemsize
    return stages * per_stage + tile_n * t_pad * 4 + 1024


def plan(tokens: int, n: int, k: int, config: Config = DEFAULT, x_itemsize: int = 2) -> Plan:
    """The plan for x[tokens, k] . codes[n, k]^T (see `applies`).

    Splits: the count minimising (waves of `config.sms` programs) x (a program's codes
    bytes + `overhead_kib`) x sms, plus the f32 partials' bytes written and read back
    (splits x n x t_pad x 4 x 2), in bytes streamed at full bandwidth; ties go to fewer
    splits. E.g. Llama-3.1-8B's o projection (4096 x 4096) at T = 1: 32 row tiles x 4
    splits of 4 steps (128 programs, one wave); gate_up (28672 rows): 224 x 1."""
    t_pad = -(-tokens // 8) * 8
    tn, tk = tiles(n, k, config)
    steps = k // tk
    n_tiles = n // tn
    step_bytes = tn * tk
    overhead = config.overhead_kib * 1024
    best = None
    if config.splits is not None:
        per = -(-steps // max(1, min(config.splits, steps)))
        best = (0, -(-steps // per), per)
    else:
        for per in range(steps, 0, -1):            # 1 split, then more
            splits = -(-steps // per)
            waves = -(-(n_tiles * splits) // config.sms)
            cost = (waves * (per * step_bytes + overhead) * config.sms
                    + 2 * splits * n * t_pad * 4)
            if best is None or cost < best[0]:
                best = (cost, splits, per)
    _, splits, per = best
    fit = (SMEM_BYTES - smem_bytes(0, t_pad, tn, tk, x_itemsize)) // (
        smem_bytes(1, t_pad, tn, tk, x_itemsize) - smem_bytes(0, t_pad, tn, tk, x_itemsize))
    stages = max(1, min(config.stages, per, fit))
    return Plan(t_pad, tn, tk, stages, splits, per)


def weight_only_linear(x, codes, scale, *, config: Config = DEFAULT, interpret=None):
    """x[T, K] (bf16/f16), codes[N, K] (int8/e4m3), scale[N, 1] -> f32[T, N] =
    (x . codes^T) * scale, accumulated in f32. `interpret`: Pallas's GPU interpret mode
    (the matmuls in jnp)."""
    t, k = x.shape
    n = codes.shape[0]
    if (codes.shape[1] != k or scale.size != n
            or not applies(x.dtype, codes.dtype, t, n, k, config=config)):
        raise ValueError(f"weight_only_linear: unsupported x{x.shape} {x.dtype}, "
                         f"codes{codes.shape} {codes.dtype}, scale{scale.shape}")
    p = plan(t, n, k, config, jnp.dtype(x.dtype).itemsize)
    xp = jnp.pad(x, ((0, p.t_pad - t), (0, 0)))
    partials = _partials(xp, codes, p, interpret)          # f32[splits, N, t_pad]
    y = jnp.sum(partials, axis=0)[:, :t] * scale.astype(jnp.float32).reshape(n, 1)
    return y.T


def _partials(xp, codes, p: Plan, interpret):
    """f32[splits, N, t_pad]: split s's sum over its K columns of codes . xp^T."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tp, k = xp.shape
    n = codes.shape[0]
    tn, tk, stages, per = p.tile_n, p.tile_k, p.stages, p.per
    steps = k // tk
    wgs = p.warpgroups
    chunks = tk // CHUNK
    dtype = xp.dtype
    f32 = jnp.float32

    if interpret is None:
        def load_codes(ref):  # 4 consecutive codes a thread: one 32-bit load
            return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
    else:  # GPU interpret mode on a CPU knows no register layouts
        def load_codes(ref):
            return ref[...]

    def convert(a):
        if a.dtype == jnp.float8_e4m3fn:  # Mosaic converts e4m3 to f16 only (bf16: ptxas 9.2)
            a = a.astype(jnp.float16)
        return a.astype(dtype)

    def kernel(x_ref, w_ref, o_ref, scoped):
        (x_smem, w_smem, o_smem), (full, free) = scoped
        nt = lax.axis_index("n")
        sp = lax.axis_index("split")
        wg = lax.axis_index("wg")
        first = sp * per
        n_steps = jnp.minimum(per, steps - first)  # the last split may be short

        def consume(j, rows, mma):
            """Wait for step j's slot, then mma(codes [64, CHUNK] of `rows` in x's
            dtype, x chunk ref [t_pad, CHUNK]) over its chunks; returns the slot."""
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(full.at[slot])
            for c in range(chunks):
                cols = pl.ds(c * CHUNK, CHUNK)
                a = convert(load_codes(w_smem.at[slot, rows, cols]))
                mma(a, x_smem.at[slot, :, cols])
            return slot

        def release(j, slot):
            # only where the memory warpgroup refills the slot (it waits for every
            # arrival: the interpreter checks that none is left unobserved)
            @pl.when(j + stages < n_steps)
            def _free():
                plgpu.barrier_arrive(free.at[slot])

        def compute(w):
            rows = pl.ds(w * ROWS, ROWS)
            if interpret is None:
                def scope(acc_ref):
                    def mma(a, x_chunk):
                        plgpu.wgmma(acc_ref, plgpu.layout_cast(a, plgpu.Layout.WGMMA),
                                    plgpu.transpose_ref(x_chunk, (1, 0)))

                    @pl.loop(0, n_steps)
                    def _step(j):
                        slot = consume(j, rows, mma)
                        plgpu.wgmma_wait(0)           # the slot's x is read
                        release(j, slot)
                    return acc_ref[...]
                acc = pl.run_scoped(scope, plgpu.ACC((ROWS, tp), f32))
            else:  # the interpreter's wgmma takes no register or transposed operand
                def body(j, acc):
                    parts = []
                    slot = consume(j, rows, lambda a, x_chunk: parts.append(jnp.dot(
                        a, x_chunk[...].T, preferred_element_type=f32)))
                    release(j, slot)
                    return acc + sum(parts)
                acc = lax.fori_loop(0, n_steps, body, jnp.zeros((ROWS, tp), f32))
            o_smem.at[w][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[w], o_ref.at[sp, pl.ds(nt * tn + w * ROWS, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        for w in range(wgs):
            pl.when(wg == w)(lambda w=w: compute(w))

        @pl.when(wg == wgs)
        def _memory():
            def issue(j, slot):
                ks = pl.ds((first + j) * tk, tk)
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(nt * tn, tn), ks], w_smem.at[slot],
                                        full.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[slot], full.at[slot])

            feed_ring(issue, n_steps, stages, (free,))

    def entry(x_ref, w_ref, o_ref):
        def swizzled(dtype, minor: int):
            bits = jnp.dtype(dtype).itemsize * 8
            sw = plgpu.find_swizzle(minor * bits, "quant_linear")
            return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))
        smem = (
            plgpu.SMEM((stages, tp, tk), dtype, transforms=swizzled(dtype, tk)),
            plgpu.SMEM((stages, tn, tk), codes.dtype, transforms=swizzled(codes.dtype, CHUNK)),
            plgpu.SMEM((wgs, ROWS, tp), f32, transforms=swizzled(f32, tp)),
        )
        bars = (
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),    # codes + x landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),  # every compute wg done
        )
        pl.run_scoped(lambda *scoped: kernel(x_ref, w_ref, o_ref, scoped), smem, bars,
                      collective_axes="wg")

    kw = {} if interpret is None else {"interpret": interpret}
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((p.splits, n, tp), f32),
        grid=(n // tn, p.splits),
        grid_names=("n", "split"),
        num_threads=wgs + 1,
        thread_name="wg",
        **kw,
    )(xp, codes)


def reference(x, codes, scale):
    """The same product in plain jnp: f32[T, N]."""
    y = jnp.dot(x.astype(jnp.float32), codes.astype(jnp.float32).T,
                precision=lax.Precision.HIGHEST)
    return y * scale.astype(jnp.float32).reshape(1, -1)
