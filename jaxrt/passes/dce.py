"""dce: remove pure ops whose results are unused; optionally prune unreferenced weights."""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.ir.module import Function, Module
from jaxrt.ir.opdef import Trait
from jaxrt.ir.ops import weight
from jaxrt.ir.weights import prune_weights

from .manager import Pass, PassContext, register_pass


def eliminate_dead_code(fn: Function) -> int:
    """Remove dead pure ops of `fn` in place (one backward walk); returns how many."""
    live = set(fn.results)
    kept = []
    for op in reversed(fn.ops):
        if not op.opdef.has(Trait.PURE) or any(r in live for r in op.results):
            kept.append(op)
            live.update(op.operands)
    removed = len(fn.ops) - len(kept)
    if removed:
        fn.set_ops(reversed(kept))
    return removed


def referenced_weights(module: Module) -> set[str]:
    return {op.attrs.name for fn in module.functions.values() for op in fn.ops
            if op.opdef is weight}


@register_pass
@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove unused pure ops; with prune-weights, also weights no function references."""

    name = "dce"
    prune_weights: bool = False

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.count("ops-removed", sum(eliminate_dead_code(fn)
                                     for fn in module.functions.values()))
        if self.prune_weights:  # definitions keep their sources
            ctx.count("weights-pruned", len(prune_weights(module)))
