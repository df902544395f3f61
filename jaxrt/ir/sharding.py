"""Sharding annotations: how a weight (and the KV cache) is split over a device mesh.

A module sharded by the `shard{tp=N, dp=M}` pass carries

- `module.attributes["mesh"] = {dp = M, tp = N}`: the named mesh (axis -> size, in
  order; the lowering builds a `jax.sharding.Mesh` of that shape);
- `module.shardings[weight] = ShardSpec`: one entry per mesh axis name or `_`
  (replicated) per dim, printed on the weight's declaration line and parsed back:

      weight @q : f32[576, 576] sharded [tp, _]

- `module.attributes["kv_sharding"]`: the cache argument's spec (a list like
  `["_", "_", "_", "_", "tp", "_"]`).

A weight without an entry is replicated. A spec is a typed, frozen value; the verifier
checks it against the weight's rank, the mesh's axes and divisibility (`check_module`).
Never imports jax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .opdef import VerifyError
from .types import TensorType

REPLICATED = "_"
MESH_ATTR, KV_ATTR, SHARD_ATTR = "mesh", "kv_sharding", "shard"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Per dim: the mesh axis it is split over, or None (replicated)."""

    dims: tuple[str | None, ...]

    @classmethod
    def replicated(cls, rank: int) -> "ShardSpec":
        return cls((None,) * rank)

    @classmethod
    def parse(cls, items) -> "ShardSpec":
        """From printed items: axis names and `_` (or None)."""
        dims = []
        for x in items:
            if x is None or x == REPLICATED:
                dims.append(None)
            elif isinstance(x, str) and x.isidentifier():
                dims.append(x)
            else:
                raise VerifyError(f"shard spec entries are mesh axis names or _, got {x!r}")
        return cls(tuple(dims))

    @property
    def is_replicated(self) -> bool:
        return all(d is None for d in self.dims)

    def items(self) -> list[str]:
        return [REPLICATED if d is None else d for d in self.dims]

    def with_leading(self, n: int) -> "ShardSpec":
        """The spec of `n` stacked copies (outline-layers' leading layer dims)."""
        return ShardSpec((None,) * n + self.dims)

    def __str__(self) -> str:
        return "[" + ", ".join(self.items()) + "]"


def mesh_of(module) -> dict[str, int]:
    """The module's mesh (axis -> size), {} when unsharded."""
    mesh = module.attributes.get(MESH_ATTR)
    return dict(mesh) if mesh else {}


def kv_spec(module) -> ShardSpec | None:
    items = module.attributes.get(KV_ATTR)
    return None if items is None else ShardSpec.parse(items)


def check_spec(spec: ShardSpec, t: TensorType, mesh: Mapping[str, int], what: str) -> None:
    if len(spec.dims) != t.rank:
        raise VerifyError(f"{what}: sharding {spec} has {len(spec.dims)} dims, type {t} has "
                          f"{t.rank}")
    used = [d for d in spec.dims if d is not None]
    if len(set(used)) != len(used):
        raise VerifyError(f"{what}: sharding {spec} splits two dims over one mesh axis")
    for i, (axis, n) in enumerate(zip(spec.dims, t.shape)):
        if axis is None:
            continue
        if axis not in mesh:
            raise VerifyError(f"{what}: sharding {spec} names axis {axis!r}, not in the mesh "
                              f"{dict(mesh)}")
        if isinstance(n, int) and n % mesh[axis]:
            raise VerifyError(f"{what}: dim {i} of {t} ({n}) is not divisible by "
                              f"{axis}={mesh[axis]}")


def check_module(module) -> None:
    """Shardings name known weights, fit their types and divide evenly over the mesh; the
    recorded head counts divide by tp (VerifyError, one line naming the numbers)."""
    mesh_attr = module.attributes.get(MESH_ATTR)
    if not module.shardings and mesh_attr is None and KV_ATTR not in module.attributes:
        return
    if not isinstance(mesh_attr, Mapping) or not mesh_attr or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in mesh_attr.items()):
        raise VerifyError(f"shardings need a mesh attribute {{axis = size, ...}} with sizes "
                          f">= 1, got {mesh_attr!r}")
    mesh = dict(mesh_attr)
    for name, spec in module.shardings.items():
        t = module.weights.get(name)
        if t is None:
            raise VerifyError(f"sharding of unknown weight @{name}")
        check_spec(spec, t, mesh, f"weight @{name}")
    spec = kv_spec(module)
    if spec is not None:
        kv_types = {a.type for fn in module.functions.values() for a in fn.args
                    if a.hint == "kv"}
        for t in kv_types:
            check_spec(spec, t, mesh, "kv cache")
    info = module.attributes.get(SHARD_ATTR)
    if isinstance(info, Mapping):
        tp = mesh.get("tp", 1)
        for key in ("heads", "kv_heads", "intermediate", "vocab"):
            n = info.get(key)
            if isinstance(n, int) and n % tp:
                raise VerifyError(f"shard: {key} = {n} is not divisible by tp = {tp}")


def spec_of(module, name: str) -> ShardSpec:
    """The sharding of weight `name`: its own, else derived through its definition (a
    cast or stack of annotated weights keeps their split; a stack adds a replicated dim),
    else replicated."""
    t = module.weights[name]
    spec = module.shardings.get(name)
    if spec is not None:
        return spec
    d = module.weight_defs.get(name)
    if d is not None:
        srcs = [spec_of(module, s) for s in d.sources]
        if len(set(srcs)) == 1:
            (src,) = set(srcs)
            axis = d.attr("axis", 0)
            if d.op == "cast":
                return src
            if d.op == "stack":
                dims = list(src.dims)
                dims.insert(axis % t.rank, None)
                return ShardSpec(tuple(dims))
            if d.op in ("concat", "slice", "repeat") and src.dims[axis % t.rank] is None:
                return src
            if d.op == "transpose":
                return ShardSpec(tuple(src.dims[i] for i in d.attr("perm")))
    return ShardSpec.replicated(t.rank)


def device_split(spec: ShardSpec | None, mesh: Mapping[str, int]) -> int:
    """Into how many parts `spec` splits a value (1: replicated or no mesh)."""
    n = 1
    if spec is not None:
        for axis in spec.dims:
            if axis is not None:
                n *= mesh[axis]
    return n


def device_bytes(t: TensorType, spec: ShardSpec | None, mesh: Mapping[str, int]) -> int:
    """Bytes one device holds of a value of type `t` split as `spec`."""
    return t.nbytes() // device_split(spec, mesh)

