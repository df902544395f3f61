"""insert-kv-cache: a whole-sequence causal LM forward -> the serving `@step` (run after
raise-llm-ops).

    func @forward(%tokens: i32[T]) -> f32[T, V]      (no cache: every token, every call)
      -> func @step(%tokens, %positions, %slot_mapping, %page_table, %context_lens,
                    %q_index, %logit_index, %kv) -> (f32[N, V], kv)

Each `llm.attention {causal}` becomes `kv.update` (this step's K/V into the cache) then
`llm.paged_attention` over the sequence's pages (layer = its order in the function); the
forward's token positions (`iota` over T) become `%positions`; the logits are taken at
`%logit_index`, and the take is moved above row-wise ops (final norm, head) so only the
returned rows are computed, as the builders do.

It refuses, naming the reason, any forward it cannot serve: one that mixes tokens other
than through causal attention (a [T, T] value, a reduction or contraction over T — a
bidirectional or unrecognized attention), with the raise pass's explanations of what it
did not raise. Never a wrong model.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.errors import InputError
from jaxrt.ir import ops
from jaxrt.ir.module import Builder, Function, Module, Value, make_op
from jaxrt.ir.opdef import Trait
from jaxrt.ir.types import DType, TensorType

from .manager import Pass, PassContext, register_pass
from .pattern import Pat
from .rewrite import Rule, RuleSet, apply_rules

I32 = DType.int32
STEP_ARGS = (("tokens", ("T",)), ("positions", ("T",)), ("slot_mapping", ("T",)),
             ("page_table", ("S", "MP")), ("context_lens", ("S",)), ("q_index", ("S", "Q")),
             ("logit_index", ("N",)))  # the contract of docs/architecture.md (builder.py)


class CacheInsertionError(InputError):
    """The forward is not a causal LM the KV cache can serve."""


def _fail(module: Module, message: str):
    misses = module.attributes.get("raise_misses") or {}
    why = "; ".join(f"{rule}: {reason}" for rule, reason in misses.items())
    raise CacheInsertionError(f"insert-kv-cache: {message}"
                              + (f" (raise-llm-ops did not raise: {why})" if why else ""))


def _mixes_tokens(op, t_dim: str) -> str | None:
    """Why op combines different tokens (other than causal attention), else None."""
    for r in op.results:
        if list(r.shape).count(t_dim) > 1:
            return f"{op.opdef.name} makes a [{t_dim}, {t_dim}] value {r.type}"
    if op.opdef in (ops.reduce_sum, ops.reduce_max, ops.reduce_mean):
        x = op.operands[0]
        if any(x.shape[a] == t_dim for a in op.attrs.axes):
            return f"{op.opdef.name} reduces over the token axis of {x.type}"
    if op.opdef is ops.dot_general:
        lhs, rhs = op.operands
        if any(lhs.shape[a] == t_dim for a in op.attrs.lhs_contract) or \
                any(rhs.shape[a] == t_dim for a in op.attrs.rhs_contract):
            return "dot_general contracts over the token axis (unraised attention?)"
    if op.opdef is ops.softmax and op.operands[0].shape[op.attrs.axis] == t_dim:
        return "softmax over the token axis (unraised attention?)"
    if op.opdef is ops.scan:
        return "a scan (layers in a kept scan: import with scan='unroll')"
    return None


@register_pass
@dataclass(frozen=True)
class InsertKVCache(Pass):
    """Turn @forward(tokens[T]) -> logits[T, V] into the serving @step."""

    name = "insert-kv-cache"
    function: str = "forward"

    def run(self, module: Module, ctx: PassContext) -> None:
        fn = module.functions.get(self.function)
        if fn is None:
            _fail(module, f"no function @{self.function}")
        if len(fn.args) != 1 or fn.args[0].dtype != I32 or fn.args[0].type.rank != 1 or \
                not isinstance(fn.args[0].shape[0], str):
            _fail(module, f"@{fn.name} must take one i32[T] token vector with a symbolic "
                          f"length, takes ({', '.join(str(a.type) for a in fn.args)})")
        t = fn.args[0].shape[0]
        if len(fn.results) != 1 or fn.results[0].type.rank != 2 or \
                fn.results[0].shape[0] != t or not fn.results[0].dtype.is_float:
            _fail(module, f"@{fn.name} must return logits [{t}, vocab]")
        attn = [op for op in fn.ops if op.opdef is ops.attention]
        if not attn:
            _fail(module, "no causal attention was raised")
        kv_type = self._cache_type(module, attn)
        args = [(n, TensorType(tuple(t if d == "T" else d for d in s), I32)) for n, s in STEP_ARGS]
        args.append(("kv", kv_type))
        step = Function("step", [Value(ty, None, i, hint=n) for i, (n, ty) in enumerate(args)])
        sb = Builder(module, step)
        a = {v.hint: v for v in step.args}
        env: dict[Value, Value] = {fn.args[0]: a["tokens"]}
        kv, layer = a["kv"], 0
        for op in fn.ops:
            operands = [env[v] for v in op.operands]
            if op.opdef is ops.iota and op.results[0].type == TensorType((t,), I32):
                env[op.results[0]] = a["positions"]
                continue
            if op.opdef is ops.attention:
                kv, out = self._attention(module, sb, op, operands, kv, layer, a, t)
                layer += 1
                env[op.results[0]] = out
                continue
            why = _mixes_tokens(op, t)
            if why:
                _fail(module, f"@{fn.name} is not a causal LM the cache can serve: {why}")
            new = make_op(op.opdef, operands, op.attrs, [r.type for r in op.results])
            step.ops.append(new)
            env.update(zip(op.results, new.results))
        logits = env[fn.results[0]]
        rows = sb(ops.take, logits, a["logit_index"], axis=0)  # [N, V]
        if rows.dtype != DType.f32:
            rows = sb(ops.convert, rows, dtype=DType.f32)
        sb.ret(rows, kv)
        del module.functions[fn.name]
        module.functions = {"step": step, **module.functions}
        apply_rules(step, TAKE_RULES, module=module, stats=ctx.stats.rules)
        _head_to_logits(step)
        module.attributes.setdefault("config", {}).update(
            {"num_layers": layer, "vocab_size": int(fn.results[0].shape[1])})
        ctx.count("attention-layers", layer)

    @staticmethod
    def _cache_type(module, attn) -> TensorType:
        k = attn[0].operands[1].type  # [1, S, KVH, D]
        for op in attn:
            if op.operands[1].type.shape[2:] != k.shape[2:] or op.operands[1].dtype != k.dtype:
                _fail(module, "layers differ in kv heads or head_dim (one paged cache "
                              "holds every layer)")
        return TensorType((len(attn), 2, "pages", "page_size") + k.shape[2:], k.dtype)

    @staticmethod
    def _attention(module, sb, op, operands, kv, layer, a, t):
        q4, k4, v4 = operands
        at = op.attrs
        if not at.causal:
            _fail(module, f"attention {layer} is bidirectional: a KV cache serves only "
                          f"causal attention")
        if q4.shape[0] != 1 or q4.shape[1] != t or k4.shape[1] != t:
            _fail(module, f"attention {layer} is not over the one token sequence "
                          f"({q4.type}, {k4.type})")
        q = sb(ops.reshape, q4, shape=q4.shape[1:])  # [T, H, D]
        k = sb(ops.reshape, k4, shape=k4.shape[1:])  # [T, KVH, D]
        v = sb(ops.reshape, v4, shape=v4.shape[1:])
        kv = sb(ops.kv_update, kv, k, v, a["slot_mapping"], layer=layer)
        out = sb(ops.paged_attention, q, kv, a["page_table"], a["context_lens"], a["q_index"],
                 a["positions"], layer=layer, scale=at.scale, causal=True, window=at.window,
                 softcap=at.softcap)  # [T, H, D]
        return kv, sb(ops.reshape, out, shape=op.results[0].shape)


# ---- computing only the returned rows ---------------------------------------------------------

def _row_op(v: Value) -> bool:
    """v's op works row by row on operand 0 and its other operands are row-independent."""
    op = v.owner
    if op.opdef in (ops.linear, ops.logits, ops.rms_norm, ops.layer_norm):
        return op.operands[0].type.rank == 2
    if op.opdef.has(Trait.ELEMENTWISE) and len(op.operands) == 1:
        return v.type.rank == 2
    if op.opdef.has(Trait.ELEMENTWISE) and len(op.operands) == 2:
        c = op.operands[1]
        return v.type.rank == 2 and c.type.rank < 2 and op.operands[0].type == v.type
    return False


def take_first(rw, y, idx):
    """take(op(x, w), idx) -> op(take(x, idx), w) for row-wise ops."""
    op = y.owner
    rows = rw(ops.take, op.operands[0], idx, axis=0)
    return rw(op.opdef, rows, *op.operands[1:], **dict(op.attrs))


def _head_to_logits(step: Function) -> None:
    """The returned f32 linear(h, w[V, H]) without bias is the logits head: llm.logits;
    soft-capped, tanh(linear / c) * c, it is llm.logits {softcap = c}."""
    from .raise_llm_ops import _softcapped
    r = step.results[0]
    head, softcap = _softcapped(r)
    op = head.owner
    if op is not None and op.opdef is ops.linear and len(op.operands) == 2 and \
            r.dtype == DType.f32 and head.dtype == DType.f32:
        new = make_op(ops.logits, op.operands, {"softcap": softcap})
        step.ops[step.ops.index(r.owner)] = new  # the cap's ops become dead
        step.replace_uses(r, new.results[0])


TAKE_RULES = RuleSet([
    # take(op(x, w), idx) -> op(take(x, idx), w), op row-wise (norm, head, activations)
    Rule("take-before-row-op", Pat(ops.take, Pat(None, name="y", where=_row_op), "idx",
                                   attrs={"axis": 0}), take_first),
])
