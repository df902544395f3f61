"""plan-kv-cache: choose the paged KV-cache layout and size it from a memory budget.

The frontend emits the cache argument `%kv : f32[layers, 2, pages, page_size, kv_heads,
head_dim]` with symbolic `pages` and `page_size`. This pass binds both, sets the cache
dtype, and records the plan in `module.attributes["kv_cache"]`:

    pages = (device_memory * fraction - weight_bytes - peak_activation_bytes)
            // (page_size * bytes_per_token)

capped at what `max_num_seqs` full-length sequences can use, and at `max-cache-gib` (the
cache alone). The device memory comes from the `memory-gib` option or, when that is 0, from
`module.attributes["target"]["device_memory_bytes"]`, which the driver (CLI, Engine) fills
from the device it runs on (on a CPU: the host memory available). `max-cache-gib` = 0 takes
`target["kv_cache_cap_bytes"]`: on a CPU the driver caps the cache (4 GiB by default, as
vLLM's CPU backend does) rather than let it take most of a shared host's memory.

The cache holds the model's float dtype (f32, bf16, f16), or, after quantize-kv-cache,
int8 / fp8 codes with per-row scales (kv[..., D + 4]; jaxrt/passes/quantize_kv_cache.py),
which it keeps: bytes_per_token counts the stored elements, scales included, so a
quantized cache fits more pages in the same budget. `dtype` cannot change a quantized
cache, and `dtype=i8` on a float cache is refused (its scales come from the pass).

A failure names the option that fixes it, with the driver's spelling in parentheses
(`jaxrt generate --max-model-len`, Engine(max_model_len=) and so on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from jaxrt.errors import SettingError
from jaxrt.errors import InputError
from jaxrt.ir.analysis.graph import peak_memory
from jaxrt.ir.module import Module
from jaxrt.ir.quant import is_quantized_cache
from jaxrt.ir.substitute import _rebuild, bind_dims
from jaxrt.ir.sharding import device_bytes, device_split, kv_spec, mesh_of, spec_of
from jaxrt.ir.types import TensorType
from jaxrt.ir.weights import resident_weights

from .cast_float import unscaled_float_dtype
from .manager import Pass, PassContext, register_pass

KV_ARG = "kv"
QUANTIZE_INSTEAD = "run quantize-kv-cache{dtype=int8|fp8} before plan-kv-cache"
_GIB = 1 << 30


class KVPlanError(InputError):
    """The cache cannot be planned (budget too small, bad option, no cache argument)."""


def _cache_type(module: Module) -> TensorType:
    types = {a.type for fn in module.functions.values() for a in fn.args if a.hint == KV_ARG}
    if not types:
        raise KVPlanError("plan-kv-cache: no function has a %kv cache argument")
    if len(types) > 1:
        raise KVPlanError(f"plan-kv-cache: functions disagree on the cache type: "
                          f"{sorted(map(str, types))}")
    (t,) = types
    if t.rank != 6 or t.shape[1] != 2 or not all(isinstance(d, int) for d in
                                                   (t.shape[0], t.shape[4], t.shape[5])):
        raise KVPlanError(f"plan-kv-cache: %kv must be [layers, 2, pages, page_size, kv_heads, "
                          f"head_dim] with static layers/heads/head_dim, got {t}")
    return t


def _fmt(nbytes: float) -> str:
    return f"{nbytes / _GIB:.2f} GiB" if abs(nbytes) >= _GIB else f"{nbytes / 2**20:.1f} MiB"


# memory-gib / max-cache-gib above this (1 PiB) are typos, not devices
MAX_MEMORY_GIB = 1 << 20


@register_pass
@dataclass(frozen=True)
class PlanKVCache(Pass):
    name = "plan-kv-cache"
    page_size: int = 16
    dtype: str = "auto"  # auto = the model's float compute dtype
    memory_gib: float = 0.0  # device memory; 0 = module.attributes["target"]
    memory_fraction: float = 0.9
    max_model_len: int = 0  # 0 = the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_pages: int = 0  # explicit page count; 0 = size from the budget
    max_cache_gib: float = 0.0  # cap on the cache alone; 0 = target's kv_cache_cap_bytes
    # Another model sharing the device and the page ids (a speculative draft): the memory
    # it holds besides its cache (weights, activations), and its cache's bytes per token,
    # which every page of this plan also costs. 0 = none.
    reserve_gib: float = 0.0
    companion_bytes_per_token: int = 0

    def __post_init__(self):
        if self.page_size < 2 or self.page_size > 256 or self.page_size & (self.page_size - 1):
            raise SettingError(f"page-size must be a power of two in [2, 256], got "
                               f"{self.page_size}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise SettingError(f"memory-fraction must be in (0, 1], got {self.memory_fraction}")
        if self.dtype != "auto":
            unscaled_float_dtype(self.dtype, "a scaled (quantized) cache", QUANTIZE_INSTEAD)
        for opt in ("memory_gib", "max_model_len", "num_pages", "max_cache_gib",
                    "reserve_gib", "companion_bytes_per_token"):
            if getattr(self, opt) < 0:
                raise SettingError(f"{opt.replace('_', '-')} must be >= 0")
        for opt in ("memory_gib", "max_cache_gib", "reserve_gib"):  # nan, inf: nan pages
            value = getattr(self, opt)
            if not math.isfinite(value) or value > MAX_MEMORY_GIB:
                raise SettingError(f"{opt.replace('_', '-')} must be a finite number of GiB "
                                   f"<= {MAX_MEMORY_GIB}, got {value}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise SettingError("max-num-seqs and max-num-batched-tokens must be >= 1")

    def run(self, module: Module, ctx: PassContext) -> None:
        cache = _cache_type(module)
        if not isinstance(cache.shape[2], str) or not isinstance(cache.shape[3], str):
            raise KVPlanError(f"plan-kv-cache: the cache is already planned ({cache})")
        layers, _, pages_dim, ps_dim, kv_heads, head_dim = cache.shape  # head_dim: + scale
        if is_quantized_cache(cache) and self.dtype != "auto":
            raise KVPlanError(f"plan-kv-cache: dtype={self.dtype} for a quantized cache "
                              f"({cache}); its codes' dtype was set by quantize-kv-cache")
        try:
            dtype = cache.dtype if is_quantized_cache(cache) else unscaled_float_dtype(
                module.attributes.get("float_dtype", "f32") if self.dtype == "auto"
                else self.dtype, "a scaled (quantized) cache", QUANTIZE_INSTEAD)
        except ValueError as e:
            raise KVPlanError(f"plan-kv-cache: {e}") from None
        ps = self.page_size
        bytes_per_token = layers * 2 * kv_heads * head_dim * dtype.itemsize
        context = int(module.attributes.get("config", {}).get("max_position", 0))
        max_len = self.max_model_len or context
        if context and max_len > context:  # positions past it were never trained: refused
            raise KVPlanError(f"plan-kv-cache: max-model-len={max_len} exceeds the model's "
                              f"context of {context} tokens (--max-model-len, "
                              f"Engine(max_model_len=))")
        if max_len <= 0:
            raise KVPlanError("plan-kv-cache: max-model-len is unknown; pass max-model-len=N")
        pages_per_seq = math.ceil(max_len / ps)
        # On a mesh (the shard pass) every number is per device: each holds its shards
        # of the weights and its KV heads of the cache. Activations are counted whole
        # (an upper bound: most are split too).
        mesh = mesh_of(module)
        kv_split = device_split(kv_spec(module), mesh)
        device_bytes_per_token = bytes_per_token // kv_split
        weight_bytes = sum(device_bytes(module.weights[n], spec_of(module, n), mesh)
                           for n in resident_weights(module))
        activation = self._peak_activations(module, pages_dim, ps_dim, pages_per_seq)

        budget = {"weight_bytes": weight_bytes, "activation_bytes": activation}
        if mesh:
            budget["per_device"] = True
        shorter = "lower max-model-len (--max-model-len)"
        if self.num_pages:
            pages = self.num_pages
            if pages < pages_per_seq:
                raise KVPlanError(
                    f"plan-kv-cache: num-pages={pages} holds {pages * ps} tokens, fewer than "
                    f"one sequence of max-model-len {max_len}: {shorter} or raise num-pages "
                    f"(--num-pages)")
        else:
            target = module.attributes.get("target", {})
            device = self.memory_gib * _GIB if self.memory_gib else \
                target.get("device_memory_bytes", 0)
            if not device:
                raise KVPlanError("plan-kv-cache: device memory is unknown; pass memory-gib=N "
                                  "or set module.attributes['target']['device_memory_bytes']")
            cap = self.max_cache_gib * _GIB if self.max_cache_gib else \
                target.get("kv_cache_cap_bytes", 0)
            if mesh and target.get("backend") == "cpu":
                # Fake CPU devices share the host: its memory and the cache cap are
                # split between them.
                devices = math.prod(mesh.values())
                device, cap = device / devices, cap / devices
            page_bytes = ps * (device_bytes_per_token + self.companion_bytes_per_token)
            reserve = self.reserve_gib * _GIB
            free = device * self.memory_fraction - weight_bytes - activation - reserve
            pages = max(0, int(free // page_bytes))
            budget.update(device_bytes=int(device), memory_fraction=self.memory_fraction,
                          cache_budget_bytes=int(max(free, 0)))
            if reserve or self.companion_bytes_per_token:
                budget.update(reserve_bytes=int(reserve),
                              companion_bytes_per_token=self.companion_bytes_per_token)
            need = (f"one sequence of {max_len} tokens needs {pages_per_seq} pages of {ps} "
                    f"({_fmt(pages_per_seq * page_bytes)})")
            if pages < pages_per_seq:
                held = f" - reserved {_fmt(reserve)}" if reserve else ""
                raise KVPlanError(
                    f"plan-kv-cache: {need} but the budget leaves {pages}: {_fmt(device)} x "
                    f"{self.memory_fraction} - weights {_fmt(weight_bytes)} - activations "
                    f"{_fmt(activation)}{held} = {_fmt(free)}; {shorter} or raise "
                    f"memory-fraction (--kv-cache-memory-fraction)")
            if cap:
                budget["cache_cap_bytes"] = int(cap)
                if int(cap // page_bytes) < pages_per_seq:
                    raise KVPlanError(
                        f"plan-kv-cache: {need} but the cache cap max-cache-gib="
                        f"{cap / _GIB:g} holds {int(cap // page_bytes)}; {shorter} or raise "
                        f"max-cache-gib (--kv-cache-max-gib)")
                pages = min(pages, int(cap // page_bytes))
            pages = min(pages, pages_per_seq * self.max_num_seqs)

        bound = bind_dims(module, {pages_dim: pages, ps_dim: ps})
        if dtype != cache.dtype:
            new_type = TensorType((layers, 2, pages, ps, kv_heads, head_dim), dtype)
            bound = _rebuild(
                bound, weight_type=lambda n, t: t,
                arg_type=lambda a: new_type if a.hint == KV_ARG else a.type,
                attrs_of=lambda op: op.attrs, given_type=lambda op, t: t)
        module.functions, module.weights = bound.functions, bound.weights
        module.attributes["kv_cache"] = {
            "layout": "paged", "page_size": ps, "num_pages": pages, "dtype": dtype.value,
            "bytes_per_token": bytes_per_token, "max_concurrent_tokens": pages * ps,
            "max_model_len": max_len, "cache_bytes": pages * ps * bytes_per_token,
            "budget": budget}
        if mesh:
            module.attributes["kv_cache"].update(
                device_bytes_per_token=device_bytes_per_token,
                device_cache_bytes=pages * ps * device_bytes_per_token)
        ctx.count("pages", pages)

    def _peak_activations(self, module: Module, pages_dim: str, ps_dim: str,
                          pages_per_seq: int) -> int:
        """Peak live bytes of each function at the largest batch the runtime will form."""
        tokens, seqs = self.max_num_batched_tokens, self.max_num_seqs
        bindings = {pages_dim: 0, ps_dim: self.page_size, "T": tokens, "S": seqs,
                    "Q": tokens, "MP": pages_per_seq, "N": seqs}
        peak = 0
        for fn in module.functions.values():
            peak = max(peak, peak_memory(fn, bindings, module=module).peak_bytes)
        return peak
