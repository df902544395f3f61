"""A sharded module's device mesh and its `NamedSharding`s (see jaxrt/ir/sharding.py).

`StepMesh.of(module)` is None for a module the `shard` pass never ran on: the lowering
then takes exactly the single-device path (nothing here is traced or placed).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import SettingError
from ..ir import Module
from ..ir.sharding import ShardSpec, device_split, kv_spec, mesh_of, spec_of


def partition_spec(spec: ShardSpec) -> PartitionSpec:
    return PartitionSpec(*spec.dims)


@dataclass(frozen=True)
class StepMesh:
    """The devices a sharded `@step` runs on, and how its weights and cache are split."""

    mesh: Mesh
    module: Module

    @classmethod
    def of(cls, module: Module, devices=None) -> "StepMesh | None":
        axes = mesh_of(module)
        if not axes:
            return None
        need = int(np.prod(list(axes.values())))
        devices = list(jax.devices() if devices is None else devices)
        if need == 1:
            devices = devices[:1]
        if len(devices) < need:
            raise SettingError(f"the module is sharded over {need} devices "
                               f"({' x '.join(f'{k}={v}' for k, v in axes.items())}); "
                               f"{len(devices)} {devices[0].platform if devices else ''} "
                               f"device(s) are available")
        grid = np.array(devices[:need], dtype=object).reshape(tuple(axes.values()))
        return cls(Mesh(grid, tuple(axes)), module)

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def weight(self, name: str) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(spec_of(self.module, name)))

    def kv(self) -> NamedSharding:
        spec = kv_spec(self.module)
        return NamedSharding(self.mesh, PartitionSpec() if spec is None
                             else partition_spec(spec))

    @property
    def kv_parts(self) -> int:
        """Into how many parts the cache is split (each device holds one)."""
        return device_split(kv_spec(self.module), self.mesh.shape)

    def logits(self) -> NamedSharding:
        """[N, vocab] split by vocabulary, as the vocabulary-parallel head computes it."""
        tp = "tp" if self.mesh.shape.get("tp", 1) > 1 else None
        return NamedSharding(self.mesh, PartitionSpec(None, tp))

    def rows(self) -> NamedSharding:
        """A batch dim split over dp (replicas of the model), the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec("dp" if "dp" in self.mesh.shape
                                                      else None))
