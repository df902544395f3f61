"""shard{tp=N, dp=M}: split the model's weights and KV cache over a (dp, tp) device mesh.

Megatron-style tensor parallelism, decided from the graph (never from weight names):

- column-parallel (output dim split over tp): every `llm.linear` whose result reaches
  attention's queries, the cache's keys or values (`kv.update`), or a gated activation
  (`llm.swiglu`/`llm.geglu`: gate and up); their biases likewise;
- row-parallel (input dim split): a linear reading attention's output (o) or a gated
  activation's (down): XLA's SPMD partitioner ends each with one all-reduce;
- vocabulary-parallel: the `llm.embedding` table and the `llm.logits` head (rows split);
- the cache `%kv[layers, 2, pages, page_size, kv_heads, head_dim]` split by KV heads.
Anything else (norms, a linear in no such role) is replicated. Weights outline-layers
stacked (read through a `scan`) keep their leading layer dim whole.

When tp exceeds the KV heads (GQA/MQA) and is a multiple of them, each KV head is
replicated r = tp / kv_heads times, as vLLM does: k/v projection weights (and biases)
become `repeat(@w) {block = head_dim, times = r}` definitions, so the model has tp KV
heads [h0 x r, h1 x r, ...] and query head j still reads copy j // (heads / tp) of its
original KV head j // (heads / kv_heads). Each device then holds one KV head of the
cache: per-device cache bytes are those of one head, the total grows r-fold.

The pass records `attributes["mesh"] = {dp = M, tp = N}`, the cache's spec in
`attributes["kv_sharding"]`, the counts it checked in `attributes["shard"]`, and a
`ShardSpec` per split weight (`module.shardings`, printed `sharded [tp, _]`). A count
that does not divide (heads, KV heads, intermediate size, vocabulary) is refused,
naming the numbers. dp replicates the whole model: weights and cache are not split
over it (the lowering splits each step's batch rows over it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxrt.errors import SettingError
from jaxrt.ir import ops
from jaxrt.ir.module import Function, Module, Op, Value
from jaxrt.ir.ops import control
from jaxrt.ir.sharding import KV_ATTR, MESH_ATTR, SHARD_ATTR, ShardSpec
from jaxrt.ir.substitute import rebuild
from jaxrt.ir.weights import WeightDef, infer_def, prune_weights

from .manager import Pass, PassContext, register_pass

_GATED = (ops.swiglu, ops.geglu)
# Ops a projection's result passes through on its way to attention (per head, so a head
# split stays a head split).
_THROUGH = (ops.reshape, ops.rope, ops.rms_norm, ops.layer_norm, ops.convert)

COLUMN, ROW, VOCAB = "column", "row", "vocab"


@dataclass
class _Use:
    """A weight read by a function: the module weight and its stacked leading dims."""

    name: str
    lead: int


@dataclass
class _Analysis:
    roles: dict[str, tuple[str, int]]  # weight -> (role, leading dims)
    kv_weights: dict[str, int]         # k/v projection weights and biases -> leading dims
    kv_reshapes: set[int]              # id() of the reshapes that split k/v into heads
    heads: set[int]
    kv_heads: set[int]
    head_dims: set[int]
    intermediate: set[int]
    vocab: set[int]
    body_args: dict[Value, _Use]       # scan body arguments that are (slices of) weights
    fused: set[str] = field(default_factory=set)  # weights of fused projections (sliced)


@register_pass
@dataclass(frozen=True)
class ShardModel(Pass):
    """Annotate weights and the KV cache for a mesh of dp x tp devices."""

    name = "shard"
    tp: int = 1
    dp: int = 1

    def __post_init__(self):
        for opt in ("tp", "dp"):
            if getattr(self, opt) < 1:
                raise SettingError(f"shard: {opt} must be >= 1, got {getattr(self, opt)}")

    def run(self, module: Module, ctx: PassContext) -> None:
        if MESH_ATTR in module.attributes:
            raise SettingError(f"shard: module @{module.name} is already sharded "
                               f"({module.attributes[MESH_ATTR]})")
        a = analyze(module)
        tp = self.tp
        where = f"shard{{tp={tp}}}"
        if tp > 1 and a.fused:
            raise SettingError(f"{where}: fused projections ({', '.join(sorted(a.fused)[:2])}"
                               f"{', ...' if len(a.fused) > 2 else ''}) cannot be split over "
                               f"tp: a column split of the concatenation would give devices "
                               f"rows of the wrong projection; run shard without fuse-qkv "
                               f"and fuse-gate-up")
        heads, kv_heads = _one(a.heads, "heads"), _one(a.kv_heads, "kv heads")
        head_dim = _one(a.head_dims, "head dims")
        if heads % tp:
            raise SettingError(f"{where}: {heads} attention heads are not divisible by "
                               f"tp={tp}")
        replicas = 1
        if kv_heads % tp:
            if tp % kv_heads:
                raise SettingError(f"{where}: {kv_heads} KV heads neither divide by tp={tp} "
                                   f"nor divide it (KV heads are replicated only when tp "
                                   f"is a multiple of them)")
            replicas = tp // kv_heads
        for what, sizes in (("intermediate size", a.intermediate), ("vocabulary", a.vocab)):
            for n in sorted(sizes):
                if n % tp:
                    raise SettingError(f"{where}: {what} {n} is not divisible by tp={tp}")
        if replicas > 1:
            _replicate_kv_heads(module, a, replicas, head_dim)
            ctx.count("kv-heads-replicated", len(a.kv_weights))
        module.attributes[MESH_ATTR] = {"dp": self.dp, "tp": tp}
        module.attributes[SHARD_ATTR] = {
            "heads": heads, "kv_heads": kv_heads * replicas, "kv_replicas": replicas,
            "intermediate": max(a.intermediate, default=0), "vocab": max(a.vocab, default=0)}
        kv = [None] * 6
        if tp > 1:
            kv[4] = "tp"
        module.attributes[KV_ATTR] = ShardSpec(tuple(kv)).items()
        if tp == 1:
            return
        for name, (role, lead) in a.roles.items():
            name = _renamed(module, name, a, replicas)
            rank = module.weights[name].rank - lead
            if role in (VOCAB, COLUMN):
                dims = ("tp",) + (None,) * (rank - 1)
            elif rank == 2:  # row-parallel matrix: its input dim
                dims = (None, "tp")
            else:            # a row-parallel bias is added after the all-reduce
                continue
            module.shardings[name] = ShardSpec(dims).with_leading(lead)
            ctx.count(f"sharded-{role}")


def _one(values: set[int], what: str) -> int:
    if len(values) != 1:
        raise SettingError(f"shard: expected one count of {what} across layers, found "
                           f"{sorted(values) or 'none'} (no paged attention?)")
    return next(iter(values))


def _renamed(module: Module, name: str, a: _Analysis, replicas: int) -> str:
    return f"{name}.rep{replicas}" if replicas > 1 and name in a.kv_weights else name


# ---- analysis -----------------------------------------------------------------------

def analyze(module: Module) -> _Analysis:
    """Each weight's role, found from the ops that read it (through scans)."""
    a = _Analysis({}, {}, set(), set(), set(), set(), set(), set(), {})
    step = module.functions.get("step")
    if step is None:
        raise SettingError(f"shard: module @{module.name} has no @step function")
    seen: set[str] = set()

    def visit(fn: Function, uses: dict[Value, _Use]) -> None:
        if fn.name in seen:
            return
        seen.add(fn.name)
        users = fn.uses()
        for op in fn.ops:
            if op.opdef is ops.weight:
                uses[op.result] = _Use(op.attrs.name, 0)
            elif op.opdef is control.scan:
                body = module.functions[op.attrs.body]
                k, m = op.attrs.carried, op.attrs.invariant
                inner: dict[Value, _Use] = {}
                for j, v in enumerate(op.operands):
                    u = uses.get(v)
                    if u is not None:
                        inner[body.args[1 + j]] = _Use(u.name, u.lead + (j >= k + m))
                a.body_args.update(inner)
                visit(body, inner)
            else:
                _classify(op, uses, users, a)

    visit(step, {})
    return a


def _classify(op: Op, uses: dict[Value, _Use], users, a: _Analysis) -> None:
    if op.opdef is ops.embedding:
        _set(a, uses.get(op.operands[1]), VOCAB)
        a.vocab.add(op.operands[1].shape[0])
    elif op.opdef is ops.logits:
        _set(a, uses.get(op.operands[1]), VOCAB)
        a.vocab.add(op.operands[1].shape[0])
    elif op.opdef is ops.paged_attention:
        q, kv = op.operands[0], op.operands[1]
        a.heads.add(q.shape[-2])
        a.kv_heads.add(kv.shape[4])
        a.head_dims.add(kv.shape[5])
    elif op.opdef in _GATED:
        for x in op.operands:
            a.intermediate.add(x.shape[-1])
    elif op.opdef is ops.linear:
        w = uses.get(op.operands[1])
        bias = uses.get(op.operands[2]) if len(op.operands) > 2 else None
        if _producer(op.operands[0], (ops.paged_attention, *_GATED)):
            _set(a, w, ROW)
            _set(a, bias, ROW)
            return
        if w is not None and _sliced_to_roles(op.result, users):
            a.fused.add(w.name)  # fuse-qkv / fuse-gate-up
            return
        dest, reshape = _destination(op.result, users)
        if dest is None:
            return
        _set(a, w, COLUMN)
        _set(a, bias, COLUMN)
        if dest in ("k", "v"):
            for u in (w, bias):
                if u is not None:
                    a.kv_weights[u.name] = u.lead
            if reshape is not None:
                a.kv_reshapes.add(id(reshape))


def _set(a: _Analysis, use: _Use | None, role: str) -> None:
    if use is None:
        return
    prev = a.roles.get(use.name)
    if prev is not None and prev[0] != role:
        raise SettingError(f"shard: weight @{use.name} is read both {prev[0]}- and "
                           f"{role}-parallel; cannot split it one way")
    a.roles[use.name] = (role, use.lead)


def _producer(v: Value, wanted) -> bool:
    while v.owner is not None and v.owner.opdef in (ops.reshape, ops.convert):
        v = v.owner.operands[0]
    return v.owner is not None and v.owner.opdef in wanted


def _sliced_to_roles(v: Value, users) -> bool:
    """v's columns are sliced (on the last axis) into q/k/v or a gated activation."""
    return any(op is not None and op.opdef is ops.slice_ and op.attrs.axis == v.type.rank - 1
               and _destination(op.result, users)[0] is not None
               for op, _ in users.get(v, ()))


def _destination(v: Value, users) -> tuple[str | None, Op | None]:
    """Where a projection's result goes: "q", "k", "v", "ffn", or None; and the reshape
    that splits it into heads."""
    reshape = None
    frontier = [v]
    while frontier:
        x = frontier.pop()
        for op, i in users.get(x, ()):
            if op is None:
                continue
            if op.opdef is ops.paged_attention and i == 0:
                return "q", reshape
            if op.opdef is ops.kv_update and i in (1, 2):
                return ("k", "v")[i - 1], reshape
            if op.opdef in _GATED:
                return "ffn", None
            if op.opdef in _THROUGH and i == 0:
                if op.opdef is ops.reshape and reshape is None:
                    reshape = op
                frontier.append(op.result)
    return None, None


# ---- KV head replication ------------------------------------------------------------

def _replicate_kv_heads(module: Module, a: _Analysis, replicas: int, head_dim: int) -> None:
    """Give the model kv_heads x replicas KV heads (see the module docstring), in place."""
    renamed = {}
    for name, lead in a.kv_weights.items():
        new = _renamed(module, name, a, replicas)
        d = WeightDef("repeat", (name,), (("axis", lead), ("block", head_dim),
                                         ("times", replicas)))
        module.weights[new] = infer_def(d, [module.weights[name]])
        module.weight_defs[new] = d
        renamed[name] = new

    def attrs_of(op: Op):
        if op.opdef is ops.weight and op.attrs.name in renamed:
            return op.attrs.replace(name=renamed[op.attrs.name])
        if id(op) in a.kv_reshapes:
            *rest, heads, dim = op.attrs.shape
            return op.attrs.replace(shape=(*rest, heads * replicas, dim))
        return op.attrs

    def arg_type(v: Value):
        t, shape = v.type, list(v.type.shape)
        use = a.body_args.get(v)
        if use is not None and use.name in a.kv_weights:  # a layer's slice: [out, (in)]
            shape[0] *= replicas
        elif v.hint == "kv" and t.rank == 6:
            shape[4] *= replicas
        return type(t)(tuple(shape), t.dtype)

    new = rebuild(module, weight_type=lambda n, t: t, arg_type=arg_type, attrs_of=attrs_of,
                  given_type=lambda op, t: t)
    module.functions, module.weights = new.functions, new.weights
    prune_weights(module)
