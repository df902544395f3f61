"""fuse-add-rmsnorm: a residual add and the RMSNorm of its sum as one op.

    %s = add(%a, %b), %n = llm.rms_norm(%s, @w) {eps, offset}
      -> %s, %n = llm.add_rms_norm(%a, %b, @w) {eps, offset}

The sum stays a result: the residual stream goes on from it. The norm reads the sum as
rounded to its dtype, exactly as before (llm.add_rms_norm's reference and lowering), and
Gemma's `1 + w` scale is the `offset` attribute, carried over. Left alone: an add that
broadcasts (a and b of different shapes), and an add whose sum is used before the norm
(the fused op, placed at the norm, would come after that use). Kernels can then read the
residual once and write both results.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.ir import ops

from .manager import RewritePass, register_pass
from .pattern import Pat
from .rewrite import Rule, RuleSet


def fuse_add_norm(rw, y, s, a, b, w):
    if not (a.type == b.type == s.type):
        return None  # a broadcasting add (a bias, a scalar)
    if not all(u is y.owner or rw.after_root(u) for u in rw.users(s)):
        return None
    total, normed = rw(ops.add_rms_norm, a, b, w, **dict(y.owner.attrs))
    rw.replace(s, total)
    return normed


RULES = RuleSet([
    # rms_norm(add(a, b), w) -> add_rms_norm(a, b, w)[1]; add(a, b) -> add_rms_norm(...)[0]
    Rule("fuse-add-rmsnorm", Pat(ops.rms_norm, Pat(ops.add, "a", "b", name="s"), "w",
                                 name="y"), fuse_add_norm),
])


@register_pass
@dataclass(frozen=True)
class FuseAddRMSNorm(RewritePass):
    """Residual add + RMSNorm of the sum -> llm.add_rms_norm returning both."""

    name = "fuse-add-rmsnorm"
    rules = RULES
