"""The compiler driver: model spec -> IR -> pipeline -> (engine directory | executable).

    model = load("smollm2-135m")               # read, build IR, run the default pipeline
    exe = model.executable()                   # StepExecutable on the default device
    save_engine(model, "engines/smollm2")      # IR text + safetensors + tokenizer + json
    model = load("engines/smollm2")            # runs no passes

Everything between reading a model and running it is a Module, so each stage can be
printed (`jaxrt dump`), optimized (`jaxrt opt`) and inspected alone.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from jaxrt.errors import SettingError
from .frontends.config import ModelConfig
from .frontends.errors import ModelFormatError
from .frontends.tokenizer import Tokenizer
from .ir import DType, Module
from .ir.sharding import device_bytes, mesh_of, spec_of

ENGINE_FORMAT = 1
_GIB = 1 << 30
# A CPU "device" is the host's available memory, shared with everything else on it, so the
# KV cache on a CPU is capped by default: vLLM's CPU backend precedent (VLLM_CPU_KVCACHE_SPACE,
# 4 GiB). It holds 3.5 full-context (32,768-token, f32) Gemma 3 270M sequences.
# Engine(kv_cache_max_gib=), `jaxrt generate --kv-cache-max-gib`, plan-kv-cache{max-cache-gib}.
CPU_KV_CACHE_CAP_GIB = 4.0


@dataclass
class Target:
    """What the pipeline is compiled for; filled from the local JAX device by default.

    `device_memory_bytes` is the accelerator's memory, or on a CPU the host memory available
    now. `kv_cache_cap_bytes` bounds the KV cache alone (0 = no cap: on GPUs the memory
    fraction does); plan-kv-cache reads both from `module.attributes["target"]`.
    """

    backend: str
    device_memory_bytes: int
    dtype: str  # float compute dtype: f32 or bf16
    kv_cache_cap_bytes: int = 0

    @classmethod
    def detect(cls, dtype: str | None = None, *,
               kv_cache_max_gib: float | None = None) -> "Target":
        """`kv_cache_max_gib` caps the cache (default: CPU_KV_CACHE_CAP_GIB on a CPU, none on
        an accelerator that reports its memory)."""
        import jax
        dev = jax.devices()[0]
        backend = dev.platform
        memory = 0
        if backend != "cpu":
            stats = dev.memory_stats() or {}
            memory = int(stats.get("bytes_limit", 0))
        cap_gib = kv_cache_max_gib
        if not memory:  # a CPU, or a device that does not report its memory: the host's
            memory = available_host_memory()
            cap_gib = CPU_KV_CACHE_CAP_GIB if cap_gib is None else cap_gib
        if cap_gib is not None and not cap_gib > 0:
            raise SettingError(f"kv_cache_max_gib must be > 0, got {cap_gib}")
        default = "f32" if backend == "cpu" else "bf16"
        return cls(backend, memory, _dtype_name(dtype) if dtype else default,
                   int(cap_gib * _GIB) if cap_gib else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device_memory_bytes": self.device_memory_bytes,
                "dtype": self.dtype, "kv_cache_cap_bytes": self.kv_cache_cap_bytes}


def available_host_memory(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of host memory available now without swapping: Linux's MemAvailable, else
    the free physical pages (POSIX sysconf), else 0 (unknown)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, *unit = line.split()[1:]
                    return int(value) * (1024 if unit == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def layers_choice(text: str) -> bool | None:
    """--layers auto|scan|unrolled -> default_pipeline's outline_layers."""
    return {"auto": None, "scan": True, "unrolled": False}[text]


def _dtype_name(dtype: str) -> str:
    aliases = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "auto": None}
    name = aliases.get(dtype, dtype)
    if name not in ("f32", "bf16", "f16"):
        raise SettingError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


@dataclass
class CompiledModel:
    module: Module
    weights: Mapping[str, np.ndarray]
    tokenizer: Tokenizer
    config: ModelConfig
    chat_template: str | None = None
    source: str = ""
    pipeline: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_plan(self) -> dict[str, Any]:
        return self.module.attributes["kv_cache"]

    def executable(self, **kwargs):
        from .lowering.executable import StepExecutable
        plan = self.kv_plan
        dtype = self.module.attributes.get("float_dtype", "f32")
        return StepExecutable(self.module, self.weights, num_pages=plan["num_pages"],
                              page_size=plan["page_size"], dtype=kwargs.pop("dtype", dtype),
                              max_model_len=kwargs.pop("max_model_len",
                                                       plan.get("max_model_len")),
                              **kwargs)


# The fusion passes default_pipeline runs (jaxrt/passes/fuse_*.py): the projections on
# the frontend's f32 ops, before anything that reads weights as units (cast-float,
# quantize, outline-layers stack the concatenations); the norm after outline-layers, whose
# layer cuts need a point where only the residual and the cache are live (a fused add
# carries the sum and its norm across the boundary: nothing would outline).
PROJECTION_FUSIONS = ("fuse-qkv", "fuse-gate-up")  # refused by shard{tp>1}
NORM_FUSIONS = ("fuse-add-rmsnorm",)
# Fusion on a CPU too: SmolLM2-135M f32 batch-1 decode steps (context 100) cost the same or
# less fused, with the same greedy tokens: outlined layers (the CPU default) 54.9 vs 56.9
# ms of CPU time per step, unrolled 51.3 vs 57.1 ms wall (medians, alternating runs on a
# shared 2-core host whose wall times vary ~2x between runs). One pipeline shape on every
# target also keeps the CPU tests on the IR accelerators run.
FUSE_ON_CPU = True


def default_pipeline(target: Target, *, page_size: int = 16, memory_fraction: float = 0.9,
                     max_model_len: int = 0, max_num_seqs: int = 64,
                     max_num_batched_tokens: int = 2048, num_pages: int = 0,
                     outline_layers: bool | None = None, tensor_parallel: int = 1,
                     data_parallel: int = 1, quantize: str = "", calib: str = "",
                     quant_method: str = "rtn",
                     fuse: bool | None = None, kv_reserve_gib: float = 0.0,
                     kv_companion_bytes_per_token: int = 0, plan: bool = True) -> str:
    """The pipeline `load` runs (`plan=False`: without its final plan-kv-cache). `outline_layers` compiles the repeated layers once (a scan
    over stacked weights); False keeps the stack unrolled. None picks by target: scan on
    CPUs, where compile time dominates start-up, unrolled on accelerators, where it decodes
    faster (one H200, bf16, batch 1: 169 vs 80 tok/s for Llama-3.1-8B; see
    bench/results/layers_h200.json). `tensor_parallel` / `data_parallel` > 1 add the
    `shard` pass (docs/parallelism.md); at 1 the pipeline is unchanged.

    `quantize` names a quantize mode (int8-weight, fp8-weight, w8a8, fp8; per-channel
    scales). It runs after cast-float (scales stay f32) and before outline-layers, so
    those two swap places when quantizing. Quantized weights are not sharded yet: the
    two together are refused. `kv-int8` / `kv-fp8` quantize the KV cache
    (quantize-kv-cache, right before plan-kv-cache, which then sizes the smaller cache;
    the cache's per-head rows shard like a float cache's); a weight mode and a KV mode
    combine as `int8-weight+kv-int8` (the spelling `quantize_mode` reads back).
    `calib` is the calibration directory (jaxrt calibrate) that w8a8-smoothquant needs;
    the pass smooths at the alpha the calibration was made with. `quant_method="gptq"`
    takes the weight codes GPTQ chose in `calib` (jaxrt calibrate --gptq MODE) instead of
    rounding to nearest ("rtn").

    `kv_reserve_gib` / `kv_companion_bytes_per_token`: memory another model on the device
    holds besides its cache, and the bytes per token of its cache, which shares this
    plan's pages (a speculative draft; plan-kv-cache's reserve-gib and
    companion-bytes-per-token). Left out of the pipeline at 0.

    `fuse` runs the fusion passes: PROJECTION_FUSIONS right after dce, NORM_FUSIONS after
    outline-layers (with outlined layers they fuse within a layer only). None picks by
    target (FUSE_ON_CPU on a CPU, on elsewhere). Under tensor_parallel > 1 the projection
    fusions are left out (a column split of a concatenated weight would hand devices rows
    of the wrong projection): only fuse-add-rmsnorm runs, and fuse=True is refused."""
    passes = ["canonicalize", "cse", "dce"]
    if fuse and tensor_parallel != 1:
        raise SettingError(f"fuse=True with tensor_parallel={tensor_parallel}: fused q/k/v "
                           f"and gate/up projections cannot be split over tp; leave fuse "
                           f"unset (only fuse-add-rmsnorm runs) or pass fuse=False")
    if fuse is None:
        fuse = target.backend != "cpu" or FUSE_ON_CPU
    if fuse and tensor_parallel == 1:
        passes += PROJECTION_FUSIONS
    if outline_layers is None:
        outline_layers = target.backend == "cpu"
    from .passes.quantize_kv_cache import kv_quant_pass
    cast = [f"cast-float{{dtype={target.dtype}}}"] if target.dtype != "f32" else []
    quantize, kv_mode = split_quantize(quantize)
    kv_quant = [kv_quant_pass(kv_mode)] if kv_mode else []
    if quantize:
        passes += cast + [_quantize_pass(quantize, calib, quant_method)]
        cast = []
    elif calib or quant_method != "rtn":
        what = "calib: a calibration" if calib else f"quant_method={quant_method!r}"
        raise SettingError(f"{what} is for a weight quantization (w8a8-smoothquant, or "
                           f"quant_method='gptq'); no weight quantization was asked for")
    if outline_layers:
        passes.append("outline-layers")
    if fuse:
        passes += NORM_FUSIONS
    passes += cast
    if tensor_parallel != 1 or data_parallel != 1:
        if quantize:
            raise SettingError(f"quantize={quantize!r} with tensor_parallel="
                               f"{tensor_parallel}, data_parallel={data_parallel}: the "
                               f"shard pass does not split quantized weights yet")
        # After the casts and stacks: it annotates the weights the step reads. Before the
        # plan, which budgets per device.
        passes.append(f"shard{{tp={tensor_parallel} dp={data_parallel}}}")
    passes += kv_quant
    if not plan:
        return ",".join(passes)
    shared = (f" reserve-gib={kv_reserve_gib!r}" if kv_reserve_gib else "") + \
        (f" companion-bytes-per-token={int(kv_companion_bytes_per_token)}"
         if kv_companion_bytes_per_token else "")
    passes.append(
        f"plan-kv-cache{{page-size={page_size} memory-fraction={memory_fraction} "
        f"max-model-len={max_model_len} max-num-seqs={max_num_seqs} "
        f"max-num-batched-tokens={max_num_batched_tokens} num-pages={num_pages}{shared}}}")
    return ",".join(passes)


# Named pipelines (`jaxrt opt -p default-gpu`): the graph passes of `default_pipeline`
# for a target, without plan-kv-cache (the cache's sizing needs the device's memory and the
# serving limits: `jaxrt compile` plans it).
NAMED_PIPELINES = {"default-gpu": ("gpu", "bf16"), "default-cpu": ("cpu", "f32")}


def named_pipeline(name: str) -> str | None:
    """The pass pipeline a NAMED_PIPELINES name stands for; None for any other text."""
    if name.strip() not in NAMED_PIPELINES:
        return None
    backend, dtype = NAMED_PIPELINES[name.strip()]
    return default_pipeline(Target(backend, 0, dtype), plan=False)


def split_quantize(quantize: str) -> tuple[str, str]:
    """(weight mode, KV-cache mode), "" where absent, of `quantize`: a weight mode, a KV
    mode, or one of each joined by '+'."""
    parts = [m.strip() for m in quantize.split("+")] if quantize else []
    kv_modes = [m for m in parts if m.startswith("kv-")]
    weight_modes = [m for m in parts if not m.startswith("kv-")]
    if len(kv_modes) > 1 or len(weight_modes) > 1 or "" in parts:
        raise SettingError(f"quantize={quantize!r}: give one weight mode, one KV-cache "
                           f"mode (kv-int8, kv-fp8), or one of each joined by '+' "
                           f"(e.g. int8-weight+kv-int8)")
    return (weight_modes or [""])[0], (kv_modes or [""])[0]


def needs_calibration(quantize: str) -> bool:
    from .passes.quantize import CALIBRATED_MODES
    return any(m.strip() in CALIBRATED_MODES for m in (quantize or "").split("+"))


def _quantize_pass(mode: str, calib: str, method: str = "rtn") -> str:
    """quantize{mode=...}, with the calibration and its alpha for a calibrated mode, or
    the calibration holding GPTQ's codes for method gptq."""
    from .passes.quantize import CALIBRATED_MODES, Quantize
    if method != "rtn":
        return str(Quantize(mode=mode, method=method,
                            calib=os.path.abspath(calib) if calib else ""))
    if mode not in CALIBRATED_MODES:
        Quantize(mode=mode, calib=calib)  # refuses a stray calib
        return f"quantize{{mode={mode}}}"  # spelled out, the default mode too
    if not calib:
        Quantize(mode=mode)  # the one-line refusal
    from .calibration import read_calibration
    cal = read_calibration(calib)
    return str(Quantize(mode=mode, calib=os.path.abspath(calib), alpha=cal.alpha))


def quantize_mode(module: Module) -> str:
    """The `quantize=` spelling of what `module` was quantized with ("" for none): the
    weight mode (quantize pass), the cache's (kv-int8 / kv-fp8), or both joined by '+'
    (a hand-written pipeline running both passes)."""
    modes = [module.attributes.get(key, {}).get("mode", "")
             for key in ("quantization", "kv_quantization")]
    return "+".join(m for m in modes if m)


def load(spec: str, *, pipeline: str | None = None, target: Target | None = None,
         dtype: str | None = None, **plan_options) -> CompiledModel:
    """Read `spec`, build its IR and run `pipeline` (default: `default_pipeline`).

    Engine directories load as they were compiled: no passes run, and a setting that
    would change what the directory fixed (another pipeline, dtype, quantization, mesh,
    page size, cache size or a longer max_model_len) is refused, never ignored.
    """
    from .frontends.sources import load_model, resolve_model
    kind, path = resolve_model(spec)
    if kind == "engine":
        model = load_engine(path)
        check_engine_settings(model, spec, pipeline=pipeline, target=target, dtype=dtype,
                              **plan_options)
        return model
    start = time.perf_counter()
    loaded = load_model(spec)
    read_s = time.perf_counter() - start
    model = compile_loaded(loaded, pipeline=pipeline, target=target, dtype=dtype,
                           **plan_options)
    model.stats["read_seconds"] = read_s
    return model


def check_engine_settings(model: CompiledModel, spec: str, *, pipeline: str | None = None,
                          target: Target | None = None, dtype: str | None = None,
                          **plan_options) -> None:
    """SettingError naming the first setting (given, and not what the engine directory
    `model` was compiled with) that loading it would have to ignore. Unset settings (None,
    0 for the sizes planned from the device, the defaults of memory_fraction, tp/dp and
    quantize) mean "as compiled"."""
    plan = model.kv_plan
    mesh = dict(model.module.attributes.get("mesh") or {})
    quant = quantize_mode(model.module)
    method = model.module.attributes.get("quantization", {}).get("method", "rtn")
    float_dtype = model.module.attributes.get("float_dtype", "f32")
    outlined = "outline-layers" in (model.pipeline or "").split(",")
    fused = any(p.split("{")[0].startswith("fuse-") for p in (model.pipeline or "").split(","))

    def refuse(setting: str, fixed: str):
        raise SettingError(f"{setting}: {spec} is an engine directory, compiled with "
                           f"{fixed}; compile it again (jaxrt compile) to change it")

    if pipeline and pipeline != model.pipeline:
        refuse(f"pipeline={pipeline!r}", f"pipeline {model.pipeline!r} (no passes run "
                                         f"when an engine loads)")
    want_dtype = _dtype_name(dtype) if dtype not in (None, "auto") else None
    if want_dtype is None and target is not None:
        want_dtype = target.dtype
    if want_dtype is not None and want_dtype != float_dtype:
        refuse(f"dtype={dtype or want_dtype!r}", f"dtype {float_dtype}")
    given = dict(plan_options)
    checks = (  # (option, unset value, compiled value, a different value conflicts?)
        ("quantize", "", quant, None),
        ("quant_method", "rtn", method, None),
        ("tensor_parallel", 1, int(mesh.get("tp", 1)), None),
        ("data_parallel", 1, int(mesh.get("dp", 1)), None),
        ("page_size", None, plan["page_size"], None),
        ("num_pages", 0, plan["num_pages"], None),
        ("memory_fraction", 0.9, None, None),
        ("kv_reserve_gib", 0.0, None, None),
        ("kv_companion_bytes_per_token", 0, None, None),
        ("max_model_len", 0, plan["max_model_len"], lambda v, fixed: v > fixed),
        ("outline_layers", None, outlined, None),
        ("fuse", None, fused, None))
    for name, unset, fixed, conflicts in checks:
        value = given.pop(name, unset)
        if value is None or value == unset or value == fixed:
            continue
        if conflicts is not None and not conflicts(value, fixed):
            continue
        what = ("its KV cache planned" if fixed is None else f"no {name}" if fixed == ""
                else f"{name}={fixed!r}")
        refuse(f"{name}={value!r}", what)
    if given.pop("calib", ""):
        refuse("calib", "its quantization (and any smoothing) fixed")
    unknown = set(given) - {"max_num_seqs", "max_num_batched_tokens"}  # runtime limits
    if unknown:
        raise SettingError(f"load: unknown option(s) {', '.join(sorted(unknown))}")


def compile_loaded(loaded, *, pipeline: str | None = None, target: Target | None = None,
                   dtype: str | None = None, **plan_options) -> CompiledModel:
    """A LoadedModel (config, weights, tokenizer) -> IR -> pipeline -> CompiledModel."""
    from .frontends.build import build_module
    from .passes import PassManager
    from .passes.manager import VerifyHook
    from .weight_cache import cached_weights
    start = time.perf_counter()
    module = build_module(loaded.config)
    module.attributes["config"] = loaded.config.to_dict()
    target = target or Target.detect(dtype)
    module.attributes["target"] = target.to_dict()
    if pipeline is None:
        if needs_calibration(plan_options.get("quantize", "")) and \
                not plan_options.get("calib"):
            from .calibration import default_calibration
            plan_options["calib"] = default_calibration(loaded)  # data-free
        pipeline = default_pipeline(target, **plan_options)
    pm = PassManager(pipeline, [VerifyHook(every_pass=False)])  # (tests verify each pass)
    pm.run(module)
    # The weights the functions read, from the persistent cache when this model file and
    # pipeline were materialized before (jaxrt/weight_cache.py): no dequantization then.
    weights, cache_info = cached_weights(module, loaded)
    return CompiledModel(module, weights, loaded.tokenizer, loaded.config,
                         loaded.chat_template, loaded.source, pm.stats.pipeline,
                         {"build_and_passes_seconds": time.perf_counter() - start,
                          "passes": pm.stats.to_json(), "weight_cache": cache_info})


# ---- engine directories -----------------------------------------------------------------

def save_engine(model: CompiledModel, out_dir: str) -> None:
    """model.jxr, weights.safetensors (module dtypes), tokenizer.json, chat_template.jinja,
    engine.json."""
    from safetensors.numpy import save_file

    from . import __version__
    from .ir.weights import materialize, resident_weights
    os.makedirs(out_dir, exist_ok=True)
    # Weight definitions (stacks, casts) are evaluated now: the engine stores what the
    # functions read, as plain weights, and loading it does no weight work.
    resident = resident_weights(model.module)
    arrays = materialize(model.module, model.weights, resident,
                         on_result=lambda _, a: np.ascontiguousarray(a))
    module = copy.copy(model.module)
    module.weights = {n: model.module.weights[n] for n in resident}
    module.weight_defs = {}
    with open(os.path.join(out_dir, "model.jxr"), "w") as f:
        f.write(str(module))
    save_file(arrays, os.path.join(out_dir, "weights.safetensors"))
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(model.tokenizer.to_json_str())
    if model.chat_template:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(model.chat_template)
    meta = {"format": ENGINE_FORMAT, "jaxrt_version": __version__, "source": model.source,
            "pipeline": model.pipeline, "config": model.config.to_dict(),
            "kv_cache": model.module.attributes.get("kv_cache"),
            "tokenizer": {"bos_id": model.tokenizer.bos_id,
                          "eos_ids": list(model.tokenizer.eos_ids)}}
    with open(os.path.join(out_dir, "engine.json"), "w") as f:
        json.dump(meta, f, indent=1)


# safetensors dtype -> IR dtype name, for the types an engine may store
_SAFETENSORS_DTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16", "I8": "i8", "I32": "i32",
                      "F8_E4M3": "f8e4m3fn", "F8_E5M2": "f8e5m2"}


def load_engine(path: str) -> CompiledModel:

    from .frontends.hf_reader import read_safetensors_header
    from .ir.parser import parse
    from .ir.verify import verify
    from .engine_format import (check_kv_budget, check_module, check_tokenizer_file,
                                read_engine_meta)
    from .errors import InputError, read_text_file
    if not os.path.isdir(path):
        raise ModelFormatError(path, "not an engine directory")
    meta_path = os.path.join(path, "engine.json")
    meta = read_engine_meta(path, ENGINE_FORMAT)  # schema-checked; config is a ModelConfig
    ir_path = os.path.join(path, "model.jxr")
    try:
        text = read_text_file(ir_path, "an IR text file (model.jxr)")
    except InputError as e:
        raise ModelFormatError(ir_path, str(e).removeprefix(ir_path + ": ")) from None
    module = parse(text, ir_path)
    del text
    verify(module)
    check_module(module, meta, ir_path, meta_path)
    # The cache is sized by the file: refuse one over this device's budget before any
    # allocation (the weights come out of the same memory).
    # On a mesh, per device (its weight shards; fake CPU devices share the host).
    target = Target.detect()
    mesh = mesh_of(module)
    shared = math.prod(mesh.values()) if mesh and target.backend == "cpu" else 1
    budget = int(target.device_memory_bytes * 0.9) // shared - sum(
        device_bytes(t, spec_of(module, n), mesh) for n, t in module.weights.items())
    if target.kv_cache_cap_bytes:
        budget = min(budget, target.kv_cache_cap_bytes // shared)
    check_kv_budget(module, ir_path, budget)
    weights_path = os.path.join(path, "weights.safetensors")
    header = read_safetensors_header(weights_path)  # validates before the library reads
    for name, t in module.weights.items():
        if name not in header:
            raise ModelFormatError(weights_path, f"weight {name} missing")
        if tuple(header[name].shape) != t.shape:
            raise ModelFormatError(weights_path, f"weight {name} has shape "
                                                 f"{tuple(header[name].shape)}, IR says {t}")
        if _SAFETENSORS_DTYPE.get(header[name].dtype) != t.dtype.value:
            raise ModelFormatError(weights_path, f"weight {name} is {header[name].dtype}, "
                                                 f"IR says {t}")
    weights = _read_engine_weights(weights_path, header, module)
    tok_path = os.path.join(path, "tokenizer.json")
    check_tokenizer_file(tok_path)
    tokenizer = Tokenizer.from_file(tok_path, **_tokenizer_meta(meta))
    template = None
    tpath = os.path.join(path, "chat_template.jinja")
    if os.path.lexists(tpath):
        try:
            template = read_text_file(tpath, "a chat template")
        except InputError as e:
            raise ModelFormatError(tpath, str(e).removeprefix(tpath + ": ")) from None
    config = meta["config"]
    return CompiledModel(module, weights, tokenizer, config, template, path,
                         meta.get("pipeline", ""))


def _read_engine_weights(path: str, header, module: Module) -> dict[str, np.ndarray]:
    """The module's weights from a validated safetensors file. safetensors' numpy reader
    has no fp8 dtype: fp8 codes are read as their bytes (offsets from the header)."""
    from safetensors import safe_open
    fp8 = {n for n, t in module.weights.items() if t.dtype in (DType.f8e4m3, DType.f8e5m2)}
    with safe_open(path, framework="numpy") as f:
        weights = {n: f.get_tensor(n) for n in module.weights if n not in fp8}
    if fp8:
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for n in fp8:
            t, e = module.weights[n], header[n]
            raw = np.fromfile(path, np.uint8, e.end - e.begin, offset=data_start + e.begin)
            weights[n] = raw.view(t.dtype.to_numpy()).reshape(t.shape)
    return weights


def _tokenizer_meta(meta: dict) -> dict[str, Any]:
    t = meta.get("tokenizer", {})
    return {"bos_id": t.get("bos_id"), "eos_ids": tuple(t.get("eos_ids", ()))}
