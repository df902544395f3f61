"""A JSON-able summary of a module: what `jaxrt inspect` reports."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from ..module import Module
from ..sharding import device_bytes, device_split, kv_spec, mesh_of, spec_of
from ..types import TensorType
from ..weights import resident_weights
from .graph import peak_memory


def symbolic_dims(module: Module) -> list[str]:
    dims = set()
    for fn in module.functions.values():
        for v in list(fn.args) + [r for op in fn.ops for r in op.results]:
            dims.update(d for d in v.type.shape if isinstance(d, str))
    return sorted(dims)


def _is_kv_cache(v) -> bool:
    """The serving cache and its updated versions: sized by the KV plan, not activations."""
    if v.owner is None:
        return v.hint == "kv"
    return v.owner.opdef.name == "kv.update"


def module_summary(module: Module, bindings: dict[str, int] | None = None) -> dict[str, Any]:
    """Op histograms, values and peak activations per function; weights by dtype.

    Symbolic dims not in `bindings` are sized 1 for the activation estimate; the summary
    lists which dims were assumed. The KV cache (the `%kv` argument and kv.update results,
    updated in place) is reported by the KV plan, not counted as activations.
    """
    bindings = dict(bindings or {})
    assumed = [d for d in symbolic_dims(module) if d not in bindings]
    sizes = {**{d: 1 for d in assumed}, **bindings}
    by_dtype: dict[str, dict[str, int]] = {}
    resident = resident_weights(module)  # f32 sources of cast weights are not resident
    for t in (module.weights[n] for n in resident):
        entry = by_dtype.setdefault(t.dtype.value, {"count": 0, "bytes": 0, "params": 0})
        entry["count"] += 1
        entry["bytes"] += t.nbytes()
        entry["params"] += t.num_elements()
    functions = {}
    for name, fn in module.functions.items():
        hist = Counter(op.opdef.name for op in fn.ops)
        peak = peak_memory(fn, sizes, exclude=_is_kv_cache, module=module)
        functions[name] = {
            "ops": len(fn.ops),
            "values": len(fn.args) + sum(len(op.results) for op in fn.ops),
            "op_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
            "peak_activation_bytes": peak.peak_bytes,
            "peak_at_op": peak.op_index,
            "signature": {"args": {a: str(v.type) for a, v in zip(fn.arg_names, fn.args)},
                          "results": [str(v.type) for v in fn.results]},
        }
    out: dict[str, Any] = {
        "module": module.name,
        "weights": {"count": len(resident),
                    "defined": sum(n in module.weight_defs for n in resident),
                    "bytes": sum(e["bytes"] for e in by_dtype.values()),
                    "params": sum(e["params"] for e in by_dtype.values()),
                    "by_dtype": by_dtype},
        "functions": functions,
        "dim_bindings": sizes,
        "assumed_dims": assumed,
    }
    for key in ("config", "kv_cache", "pass_stats", "float_dtype"):
        if key in module.attributes:
            out[key] = module.attributes[key]
    mesh = mesh_of(module)
    if mesh:
        out["sharding"] = _sharding(module, mesh, resident)
    return out


def _sharding(module: Module, mesh: dict[str, int], resident: list[str]) -> dict[str, Any]:
    """Per-device bytes on the shard pass's mesh: each device's weight shards and its
    KV heads of the cache (the cache's size when planned, else per token)."""
    split = sum(1 for n in resident if spec_of(module, n).dims != (None,) * module.weights[
        n].rank)
    info = {"mesh": mesh, "devices": int(math.prod(mesh.values())),
            "weights_split": split, "weights_replicated": len(resident) - split,
            "device_weight_bytes": sum(device_bytes(module.weights[n], spec_of(module, n),
                                                    mesh) for n in resident)}
    kv_types = [a.type for fn in module.functions.values() for a in fn.args
                if a.hint == "kv"]
    if kv_types:
        t = kv_types[0]
        layers, two, _, _, heads, dim = t.shape
        parts = device_split(kv_spec(module), mesh)
        info["device_kv_heads"] = heads // parts
        info["device_kv_bytes_per_token"] = layers * two * heads * dim * t.dtype.itemsize // parts
        if t.is_static:
            info["device_kv_cache_bytes"] = t.nbytes() // parts
    shard = module.attributes.get("shard")
    if isinstance(shard, dict):
        info["kv_replicas"] = shard.get("kv_replicas", 1)
    return info


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"module @{s['module']}"]
    if "config" in s:
        c = s["config"]
        lines.append(f"  architecture: {c.get('arch')} ({c.get('model_type') or '?'}), "
                     f"{c.get('num_layers')} layers, hidden {c.get('hidden_size')}, heads "
                     f"{c.get('num_heads')}/{c.get('num_kv_heads')} kv, head_dim "
                     f"{c.get('head_dim')}, ffn {c.get('intermediate_size')}, vocab "
                     f"{c.get('vocab_size')}, context {c.get('max_position')}")
    w = s["weights"]
    lines.append(f"  weights: {w['count']} tensors, {w['params']:,} parameters, "
                 f"{_human(w['bytes'])}")
    for dt, e in sorted(w["by_dtype"].items()):
        lines.append(f"    {dt:<9} {e['count']:>5} tensors  {_human(e['bytes']):>12}")
    if "kv_cache" in s:
        kv = s["kv_cache"]
        lines.append(f"  kv cache: {kv['layout']}, page size {kv['page_size']}, "
                     f"{kv['num_pages']} pages, {kv['dtype']}, {kv['bytes_per_token']:,} "
                     f"bytes/token, max concurrent tokens {kv['max_concurrent_tokens']:,} "
                     f"({_human(kv['cache_bytes'])})")
    if "sharding" in s:
        sh = s["sharding"]
        mesh = " x ".join(f"{k}={v}" for k, v in sh["mesh"].items())
        lines.append(f"  sharding: mesh {mesh} ({sh['devices']} devices), "
                     f"{sh['weights_split']} weights split, {sh['weights_replicated']} "
                     f"replicated; per device: weights {_human(sh['device_weight_bytes'])}")
        if "device_kv_heads" in sh:
            cache = sh.get("device_kv_cache_bytes")
            lines.append(f"    per device kv cache: {sh['device_kv_heads']} kv heads "
                         f"(each kv head stored {sh.get('kv_replicas', 1)}x), "
                         f"{sh['device_kv_bytes_per_token']:,} bytes/token"
                         + (f", {_human(cache)}" if cache is not None else ""))
    for name, f in s["functions"].items():
        lines.append(f"  func @{name}: {f['ops']} ops, {f['values']} values, peak activations "
                     f"{_human(f['peak_activation_bytes'])}")
        for op, n in f["op_histogram"].items():
            lines.append(f"    {op:<24} {n:>6}")
    if s["assumed_dims"]:
        lines.append(f"  (activation estimate with symbolic dims {', '.join(s['assumed_dims'])}"
                     f" = 1; bind them with --bind NAME=N)")
    for run in s.get("pass_stats", []):
        lines.append(f"  passes: {run['pipeline']} ({run['seconds'] * 1e3:.1f} ms)")
        for p in run["passes"]:
            rules = p.get("rules", {})
            fired = {r: st.get("rewrites", st.get("matches", 0)) for r, st in rules.items()
                     if isinstance(st, dict) and st.get("rewrites", st.get("matches"))}
            extra = "  " + ", ".join(f"{r}x{n}" for r, n in fired.items()) if fired else ""
            lines.append(f"    {p['pass']:<28} {p['seconds'] * 1e3:>8.2f} ms{extra}")
    return "\n".join(lines)


def format_rule_stats(s: dict[str, Any]) -> str:
    """Every rule of every rewrite pass in the recorded pass statistics: how often it was
    tried, matched its pattern and rewrote the IR (`inspect --stats`). Rules that never
    fired are listed too."""
    lines = []
    for run in s.get("pass_stats", []):
        lines.append(f"rule statistics: {run['pipeline']}")
        lines.append(f"  {'pass':<20} {'rule':<26} {'attempts':>8} {'matches':>8} "
                     f"{'rewrites':>8}")
        for p in run["passes"]:
            for rule, st in (p.get("rules") or {}).items():
                if isinstance(st, dict):
                    lines.append(f"  {p['pass'].split('{')[0]:<20} {rule:<26} "
                                 f"{st.get('attempts', 0):>8} {st.get('matches', 0):>8} "
                                 f"{st.get('rewrites', 0):>8}")
    return "\n".join(lines) if lines else "(no pass statistics recorded: run jaxrt opt --stats)"
