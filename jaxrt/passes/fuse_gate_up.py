"""fuse-gate-up: the gate and up projections of a gated MLP as one matmul.

    %g = llm.linear(%x, @gate), %u = llm.linear(%x, @up), %h = llm.swiglu(%g, %u)
      -> %y = llm.linear(%x, @gate_up)   weight @gate_up = concat(@gate, @up) {axis = 0}
         %h = llm.swiglu(slice(%y)[:ffn], slice(%y)[ffn:])

Likewise for llm.geglu (Gemma), keeping its `approximate` attribute. Both projections must
read the same input and module weights (biases on both or neither), and be used by the
activation alone: a gate or up value used elsewhere is left unfused. Order and limits as
fuse-qkv (before cast-float, quantize and outline-layers; not with shard{tp>1}).
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.ir import ops

from .manager import RewritePass, register_pass
from .pattern import Pat
from .projections import fuse_projections
from .rewrite import Rule, RuleSet

GATED = (ops.swiglu, ops.geglu)


def fuse_pair(rw, act, g, u):
    if g is u or rw.num_uses(g) != 1 or rw.num_uses(u) != 1:
        return None
    x = g.owner.operands[0]
    parts = fuse_projections(rw, x, [g.owner, u.owner])
    if parts is None:
        return None
    return rw(act.owner.opdef, *parts, **dict(act.owner.attrs))


RULES = RuleSet([
    # swiglu(linear(x, @g), linear(x, @u)) -> swiglu(slices of linear(x, concat(@g, @u)))
    Rule("fuse-gate-up", Pat(GATED, Pat(ops.linear, name="g"), Pat(ops.linear, name="u"),
                             name="act"), fuse_pair),
])


@register_pass
@dataclass(frozen=True)
class FuseGateUp(RewritePass):
    """A gated activation's two projections of one input -> one matmul + slices."""

    name = "fuse-gate-up"
    rules = RULES
