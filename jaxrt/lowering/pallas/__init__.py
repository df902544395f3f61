"""The `pallas` lowering backend: Pallas GPU kernels, chosen before XLA where they apply.

A step lowers with backends ("pallas", "xla") on a Hopper GPU (`default_backends`), so
each op takes the first rule registered for it; a Pallas rule whose kernel does not
cover the op's shapes or dtypes hands the op to the XLA rule itself. Two kernels, both on
Mosaic GPU: paged attention (`paged_attention_mgpu`) and the weight-only quantized linear
at decode shapes (`quant_linear_mgpu`: int8/e4m3 codes, one scale a row, <= 64 tokens).

JAXRT_KERNELS: `on` (the kernels on Hopper GPUs with one device) or `off` (XLA only).
The default is DEFAULT_KERNELS.
JAXRT_QUANT_KERNEL: `on` or `off` (default DEFAULT_QUANT_KERNEL): whether the pallas
backend's `quant.linear` rule uses its kernel (where JAXRT_KERNELS lets the backend run).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ...ir import ops
from ..registry import rule
from ..xla._util import cast, upcast
from . import paged_attention_mgpu as _mgpu
from . import quant_linear_mgpu as _qmgpu

KERNEL_MODES = ("on", "off")
# On: inside an engine on an H100 (bench/bench_kernels.py, Llama-3.2-1B shape, bf16,
# bench/results/kernels_1b_h100.json) it made decode at batch 64 1.53x faster (24,950 vs
# 16,359 output tok/s), batch 1 the same (694 vs 692), warm-up no slower (20.5 vs 30.6 s),
# prefill unchanged (the kernel serves decode rows); one decode step's logits within
# 0.77% of max|logit| of XLA's with the same argmax. `JAXRT_KERNELS=off` opts out.
DEFAULT_KERNELS = "on"
# Off: on an H100 (bench/bench_int8_matmul.py, bench/results/int8_matmul_h100.json) the
# quant-linear kernel matches XLA's post-scaled int8 dot but barely beats it (Llama-3.1-8B,
# one token: gate-up 60.5 vs 63.1 us, down 44.5 vs 45.8, qkv 43.9 vs 38.5, o 41.7 vs
# 36.8; decode at batch 1 223 vs 217 tok/s): not enough to make it the default yet.
DEFAULT_QUANT_KERNEL = "off"


class _Interpret(NamedTuple):
    params: object                # InterpretGPUParams
    attention: "_mgpu.Config"
    quant: "_qmgpu.Config"


# Tests run the kernels' rules on a CPU in Pallas's GPU interpret mode (`interpret_kernels`).
_INTERPRET = contextvars.ContextVar("jaxrt_pallas_interpret", default=None)


@contextlib.contextmanager
def interpret_kernels(config: "_mgpu.Config | None" = None,
                      quant_config: "_qmgpu.Config | None" = None):
    """Trace Pallas rules with their kernels in GPU interpret mode (on any platform;
    slow: for tests), with the paged-attention kernel's `config` (default: one split)
    and the quant-linear kernel's `quant_config` (default: its DEFAULT)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    token = _INTERPRET.set(_Interpret(
        InterpretGPUParams(),
        config or _mgpu.Config(block_kv=64, stages=2, min_programs=1),
        quant_config or _qmgpu.DEFAULT))
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _mode(var: str, default: str) -> str:
    from ...errors import SettingError
    mode = os.environ.get(var, default).strip().lower() or default
    if mode not in KERNEL_MODES:
        raise SettingError(f"{var} must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


def kernels_mode() -> str:
    """JAXRT_KERNELS (on or off; default DEFAULT_KERNELS), checked."""
    return _mode("JAXRT_KERNELS", DEFAULT_KERNELS)


def quant_kernel_mode() -> str:
    """JAXRT_QUANT_KERNEL (on or off; default DEFAULT_QUANT_KERNEL), checked."""
    return _mode("JAXRT_QUANT_KERNEL", DEFAULT_QUANT_KERNEL)


def hopper() -> bool:
    """Whether JAX's default device is a Hopper GPU (compute capability 9.x)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def default_backends(sharded: bool = False) -> tuple[str, ...]:
    """The backends a step lowers with here: Pallas kernels first on one Hopper GPU."""
    if sharded or kernels_mode() == "off" or not hopper():
        return ("xla",)
    return ("pallas", "xla")


def attention_kernel_applies(kv_dtype, q_dtype, heads: int, kv_heads: int, head_dim: int,
                             page_size: int, queries: int, causal: bool = True) -> bool:
    """Whether `paged_attention_mgpu` covers a paged attention of these shapes: a float
    cache in the query's dtype (bf16/f16), head_dim a multiple of 64, a KV head's query
    heads (heads / kv_heads) within one 64-row tile, page sizes 16..128 that tile a
    64-token block or are whole blocks. Any number of queries a row: a row with more than
    `tile_queries` is split into sub-rows of that many (`_paged_attention`)."""
    kv_dtype, q_dtype = jnp.dtype(kv_dtype), jnp.dtype(q_dtype)
    return (causal and kv_dtype == q_dtype and kv_dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 64 == 0 and heads % kv_heads == 0 and queries >= 1
            and heads // kv_heads <= _mgpu.ROWS
            and 16 <= page_size <= 128 and (64 % page_size == 0 or page_size % 64 == 0))


def tile_queries(heads: int, kv_heads: int) -> int:
    """Queries of one sequence a kernel row takes: as many as fill the 64-row wgmma tile
    with the KV head's heads / kv_heads query heads each."""
    return _mgpu.ROWS // (heads // kv_heads)


# One jitted function for every layer's call: a step's layers share one lowered kernel
# (a function called per layer) instead of embedding a Mosaic GPU module per layer. A
# 16-layer step cross-lowered for CUDA: 0.6 s and one module against 3.6 s and 16
# (4.2 MB of HLO text); on the H100 the unwrapped form compiled 1 of an engine's 20
# buckets in ~100 s.
_paged_attention_jit = jax.jit(
    _mgpu.paged_attention,
    static_argnames=("scale", "softcap", "window", "config", "interpret"))


@rule(ops.paged_attention, backend="pallas")
def _paged_attention(ctx, q, kv, page_table, context_lens, q_index, positions, *base,
                     attrs, out_types):
    from ..xla.attention import _paged_attention as xla_rule
    t, h, d = q.shape
    s, mp = page_table.shape
    n_q = q_index.shape[1]
    pages, page_size, kvh = kv.shape[2], kv.shape[3], kv.shape[4]
    if not attention_kernel_applies(kv.dtype, q.dtype, h, kvh, d, page_size, n_q,
                                    attrs.causal):
        return xla_rule(ctx, q, kv, page_table, context_lens, q_index, positions, *base,
                        attrs=attrs, out_types=out_types)
    layer = attrs.layer + base[0] if base else attrs.layer
    rows = jnp.where((q_index >= 0) & (q_index < t), q_index, t)        # [S, Q]; t: pad
    table, lens = jnp.clip(page_table, 0, pages - 1), context_lens
    sub = tile_queries(h, kvh)
    if n_q > sub:
        # A row of more queries than one tile takes (a whole prompt as one row, or Q x
        # heads / kv_heads > 64) becomes ceil(Q / sub) kernel rows of `sub` consecutive
        # queries; each reads its context only up to its own last query (causal), so a
        # long prefill row costs a flash attention's causal half, not Q x context.
        n_sub = -(-n_q // sub)
        rows = jnp.pad(rows, ((0, 0), (0, n_sub * sub - n_q)), constant_values=t)
        rows = rows.reshape(s * n_sub, sub)
        table, lens = jnp.repeat(table, n_sub, axis=0), jnp.repeat(lens, n_sub)
    qg = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)            # [S', Q', H, D]
    # a row's queries are consecutive tokens (jaxrt.runtime.scheduler.build_step_inputs)
    q_start = jnp.take(positions, rows[:, 0], axis=0, mode="fill", fill_value=0)
    ctx_len = jnp.where(rows[:, 0] < t, jnp.minimum(lens, mp * page_size), 0)
    ip = _INTERPRET.get()
    interpret, config = (ip.params, ip.attention) if ip else (None, _mgpu.Config())
    out = _paged_attention_jit(qg, kv, jnp.asarray(layer, jnp.int32), table, ctx_len,
                               q_start, scale=attrs.scale, softcap=attrs.softcap,
                               window=attrs.window, config=config, interpret=interpret)
    out = cast(out.reshape(-1, h, d), out_types[0])
    flat = jnp.zeros((t, h, d), out.dtype)
    return flat.at[rows.reshape(-1)].set(out, mode="drop")


# One jitted function for every layer's call, as `_paged_attention_jit`.
_weight_only_linear_jit = jax.jit(_qmgpu.weight_only_linear,
                                  static_argnames=("config", "interpret"))


@rule(ops.quantized_linear, backend="pallas")
def _quantized_linear(ctx, x, w, scale, b=None, *, attrs, out_types):
    from ..xla.quant import _quantized_linear as xla_rule
    n, k = w.shape
    t = math.prod(x.shape[:-1])
    ip = _INTERPRET.get()
    interpret, config = (ip.params, ip.quant) if ip else (None, _qmgpu.DEFAULT)
    # weight-only with one scale a row (per channel) only; group scales, W8A8 and
    # prefill-sized token counts stay with XLA
    if (attrs.act != "none" or quant_kernel_mode() == "off"
            or not _qmgpu.applies(x.dtype, w.dtype, t, n, k, scale.shape[-1], config)):
        return xla_rule(ctx, x, w, scale, b, attrs=attrs, out_types=out_types)
    y = _weight_only_linear_jit(x.reshape(t, k), w, jnp.broadcast_to(scale, (n, 1)),
                                config=config, interpret=interpret)     # f32[T, N]
    y = y.reshape(x.shape[:-1] + (n,))
    if b is not None:
        y = y + upcast(b)
    return cast(y, out_types[0])
