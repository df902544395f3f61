"""fuse-qkv: the query, key and value projections of one input as one matmul.

    %q = llm.linear(%x, @q), %k = llm.linear(%x, @k), %v = llm.linear(%x, @v)
      -> %y = llm.linear(%x, @qkv)   weight @qkv = concat(@q, @k, @v) {axis = 0}
         %q, %k, %v = slices of %y on its last axis

One read of x and one wide matmul instead of three narrow ones (decode is bound by weight
reads; small models by launch counts). Widths may differ (GQA: k and v narrower than q);
biases (Qwen2) are concatenated likewise, and must be on all three or none.

The rule fires at the first of exactly three plain projections of one value (llm.linear
reading module weights): a value projected twice or four times, or by a linear whose
weight is computed, is left alone. Run after canonicalize/cse (one spelling of x) and
before cast-float, quantize and outline-layers, which treat the concat as one weight. Not
with shard{tp>1}: a column split of the concatenation would give each device rows of the
wrong projection (the shard pass refuses fused projections).
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.ir import ops

from .manager import RewritePass, register_pass
from .pattern import Pat
from .projections import fuse_projections, plain_projection
from .rewrite import Rule, RuleSet

PROJECTIONS = 3


def fuse_three(rw, y):
    x = y.owner.operands[0]
    group = [op for op in rw.users(x) if op.opdef is ops.linear and op.operands[0] is x]
    if len(group) != PROJECTIONS or group[0] is not y.owner:
        return None  # not three projections, or not the first: that one fuses the group
    # the others come after the root (program order), and so do their users: the slices,
    # built before the root, dominate them
    parts = fuse_projections(rw, x, group)
    if parts is None:
        return None
    for op, part in zip(group[1:], parts[1:]):
        rw.replace(op.result, part)
    return parts[0]


def _reads_weights(y) -> bool:
    return plain_projection(y.owner, y.owner.operands[0])


RULES = RuleSet([
    # linear(x, @q), linear(x, @k), linear(x, @v) -> slices of linear(x, concat(@q, @k, @v))
    Rule("fuse-qkv", Pat(ops.linear, name="y", where=_reads_weights), fuse_three),
])


@register_pass
@dataclass(frozen=True)
class FuseQKV(RewritePass):
    """Three projections of one input -> one matmul over concatenated weights + slices."""

    name = "fuse-qkv"
    rules = RULES
