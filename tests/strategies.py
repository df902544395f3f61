"""Hypothesis strategies for random, well-typed IR modules.

    from tests.strategies import modules
    @given(modules())
    def test_something(m): ...

`modules()` draws functions whose arguments mix static and symbolic dims, then appends random
ops from the registry: each op kind has a small generator that builds valid operands (reusing
earlier values when their type fits, else adding an argument, a weight or a constant) and
random attributes. Module attributes, weight and function names include characters that need
quoting in the text format. NaN attribute values are always `math.nan` (NaN != NaN, so only the
same object compares equal inside attribute tuples and dicts).

`numeric_modules()` draws `(module, inputs, weights)`: one function `@f` with static f32, i32 and
i1 types and tame attributes, plus data to run it with `jaxrt.ir.interpreter` (for soundness
properties of passes and lowerings; results may still hold inf/nan, e.g. from log or div).
"""
from __future__ import annotations

import math
from typing import Callable

from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxrt.ir import Builder, DType, Module, TensorType, Value, ops
from jaxrt.ir.opdef import OpDef
from jaxrt.ir.quant import KV_SCALE_ELEMS, QUANT_DTYPES, kv_head_dim

FLOAT_DTYPES = (DType.f32, DType.bf16, DType.f16, DType.f8e4m3, DType.f8e5m2)
ALL_DTYPES = tuple(DType)
ARITH_DTYPES = tuple(d for d in DType if d != DType.bool_)  # add, sub, ..., neg reject i1
NUMERIC_DTYPES = (DType.f32, DType.int32, DType.bool_)
SYMBOLIC_DIMS = ("T", "S", "B", "pages", "page_size", "n_1", "ñ")

_identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,6}", fullmatch=True)
_odd_text = st.text(st.characters(codec="utf-8"), max_size=6)  # quotes, newlines, unicode
symbol_names = st.one_of(
    _identifiers,
    st.from_regex(r"model\.layers\.[0-9]{1,2}\.(self_attn|mlp)\.[a-z_]{1,8}\.weight",
                  fullmatch=True),
    st.sampled_from(['has space', 'quote"d', 'back\\slash', 'new\nline', '0starts', 'ü-ñ',
                     'tab\t', 'emoji \U0001f600', 'a-b', 'x.', 'dash-', '-lead']),
    _odd_text.filter(bool))
# Attribute floats: anything finite or infinite, and NaN only as the math.nan object.
attr_floats = st.one_of(st.floats(allow_nan=False), st.just(math.nan))
attr_scalars = st.one_of(st.none(), st.booleans(), st.integers(), attr_floats, _odd_text,
                         st.sampled_from(ALL_DTYPES))
attribute_values = st.recursive(
    attr_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(tuple), st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(_identifiers, _odd_text), inner,
                                            max_size=3)),
    max_leaves=8)
module_attributes = st.dictionaries(st.one_of(_identifiers, _odd_text), attribute_values,
                                    max_size=4)


class _Gen:
    """Builds one function: fresh operands on demand, op results collected for reuse."""

    def __init__(self, draw, module: Module, name: str, static: bool, numeric: bool = False):
        self.draw = draw
        self.module = module
        self.static = static or numeric
        self.numeric = numeric
        self.b = Builder.new_function(module, name, [])
        self.values: list[Value] = []

    # ---- dims and types ------------------------------------------------------------------

    def dim(self, static: bool = False, lo: int = 1, hi: int = 5) -> int | str:
        if static or self.static or self.draw(st.integers(0, 3)):
            return self.draw(st.integers(lo, hi))
        return self.draw(st.sampled_from(SYMBOLIC_DIMS))

    def shape(self, min_rank: int = 0, max_rank: int = 3, static: bool = False) -> tuple:
        rank = self.draw(st.integers(min_rank, max_rank))
        return tuple(self.dim(static) for _ in range(rank))

    def dtype(self, choices=ALL_DTYPES) -> DType:
        if self.numeric:  # every caller's choices include f32 or i32
            choices = [d for d in choices if d in NUMERIC_DTYPES]
        return self.draw(st.sampled_from(choices))

    def real(self, lo: float, hi: float) -> float:
        """A float attribute: in [lo, hi] for numeric modules, else any float (inf, nan)."""
        return self.draw(st.floats(lo, hi) if self.numeric else attr_floats)

    def type(self, dtypes=ALL_DTYPES, min_rank=0, max_rank=3, static=False) -> TensorType:
        return TensorType(self.shape(min_rank, max_rank, static), self.dtype(dtypes))

    def partner(self, shape: tuple) -> tuple:
        """A shape that broadcasts against `shape` without changing it."""
        keep = self.draw(st.integers(0, len(shape)))
        return tuple(1 if self.draw(st.integers(0, 3)) == 0 else d
                     for d in shape[len(shape) - keep:])

    # ---- operands --------------------------------------------------------------------------

    def value(self, pred: Callable[[TensorType], bool], make: Callable[[], TensorType]) -> Value:
        """An earlier value satisfying `pred`, or a fresh operand of type `make()`."""
        fits = [v for v in self.values if pred(v.type)]
        if fits and self.draw(st.integers(0, 3)):
            return self.draw(st.sampled_from(fits))
        return self.operand(make())

    def operand(self, t: TensorType) -> Value:
        """A value of exactly type `t`: an earlier one, or a new argument/weight/constant."""
        same = [v for v in self.values if v.type == t]
        if same and self.draw(st.integers(0, 2)):
            return self.draw(st.sampled_from(same))
        source = self.draw(st.integers(0, 3)) if t.is_static else 0
        if source == 1:
            v = self.weight(t)
        elif source == 2 and t.num_elements() <= 16:
            v = self.constant(t)
        else:
            v = self.argument(t)
        return v

    def argument(self, t: TensorType) -> Value:
        fn = self.b.fn
        taken = set(fn.arg_names)
        i = len(fn.args)
        hint = self.draw(st.one_of(st.none(), _identifiers))
        if (hint or f"arg{i}") in taken:
            hint = f"a{i}"
            while hint in taken:
                hint += "_"
        v = Value(t, None, i, hint=hint)
        fn.args.append(v)
        self.values.append(v)
        return v

    def weight(self, t: TensorType) -> Value:
        same = [n for n, wt in self.module.weights.items() if wt == t and n]
        if same and self.draw(st.booleans()):
            name = self.draw(st.sampled_from(same))
        else:
            name = self.draw(symbol_names)
            while name in self.module.weights:
                name += "'"
        v = self.b.weight(name, t)
        self.values.append(v)
        return v

    def constant(self, t: TensorType) -> Value:
        if t.dtype.is_int:
            nums = st.integers(-100, 100)
        else:
            nums = st.floats(-4, 4) if self.numeric else attr_floats
        if self.draw(st.booleans()):
            value = self.draw(nums)
        else:
            value = tuple(self.draw(st.lists(nums, min_size=t.num_elements(),
                                             max_size=t.num_elements())))
        return self.emit(ops.constant, value=value, result_types=[t])

    def emit(self, opdef: OpDef, *operands: Value, result_types=None, **attrs):
        out = self.b(opdef, *operands, result_types=result_types, **attrs)
        results = out if isinstance(out, tuple) else (out,)
        self.values.extend(results)
        return out

    # ---- frequently used value shapes -----------------------------------------------------

    def any_value(self, min_rank=0, dtypes=ALL_DTYPES) -> Value:
        if self.numeric:
            dtypes = tuple(d for d in dtypes if d in NUMERIC_DTYPES)
        return self.value(lambda t: t.rank >= min_rank and t.dtype in dtypes,
                          lambda: self.type(dtypes, min_rank=min_rank))

    def float_value(self, min_rank=0) -> Value:
        return self.any_value(min_rank, FLOAT_DTYPES)

    def axis(self, rank: int) -> int:
        return self.draw(st.integers(-rank, rank - 1))


# ---- one generator per op --------------------------------------------------------------------

def _binary(opdef, dtypes=ALL_DTYPES, **attr_strategies):
    def gen(g: _Gen):
        x = g.any_value(dtypes=dtypes)
        y = g.operand(TensorType(g.partner(x.shape), x.dtype))
        if g.draw(st.booleans()):
            x, y = y, x
        g.emit(opdef, x, y, **{k: g.draw(s) for k, s in attr_strategies.items()})
    return gen


def _unary(opdef, dtypes=FLOAT_DTYPES, **attr_strategies):
    def gen(g: _Gen):
        x = g.any_value(dtypes=dtypes)
        g.emit(opdef, x, **{k: g.draw(s) for k, s in attr_strategies.items()})
    return gen


def _convert(g: _Gen):
    g.emit(ops.convert, g.any_value(), dtype=g.dtype())


def _select(g: _Gen):
    a = g.any_value()
    b = g.operand(TensorType(g.partner(a.shape), a.dtype))
    pred = g.operand(TensorType(g.partner(a.shape), DType.bool_))
    g.emit(ops.select, pred, a, b)


def _reduce(opdef):
    def gen(g: _Gen):
        x = g.any_value(min_rank=1)
        axes = g.draw(st.lists(st.integers(0, x.type.rank - 1), unique=True, max_size=x.type.rank))
        axes = tuple(a - x.type.rank if g.draw(st.booleans()) else a for a in axes)
        g.emit(opdef, x, axes=axes, keepdims=g.draw(st.booleans()))
    return gen


def _reshape(g: _Gen):
    x = g.any_value()
    factors = []
    for d in x.shape:
        if isinstance(d, int):
            factors += _prime_factors(d) if d else [0]  # slice can make empty dims
    groups: list[int | str] = []
    for f in factors:
        if groups and isinstance(groups[-1], int) and g.draw(st.booleans()):
            groups[-1] *= f
        else:
            groups.append(f)
    groups += [d for d in x.shape if isinstance(d, str)]
    groups += [1] * g.draw(st.integers(0, 1))
    shape = g.draw(st.permutations(groups))
    g.emit(ops.reshape, x, shape=tuple(shape))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _transpose(g: _Gen):
    x = g.any_value()
    g.emit(ops.transpose, x, perm=tuple(g.draw(st.permutations(range(x.type.rank)))))


def _broadcast(g: _Gen):
    x = g.any_value()
    lead = g.shape(0, 2)
    shape = lead + tuple(g.dim() if d == 1 and g.draw(st.booleans()) else d for d in x.shape)
    g.emit(ops.broadcast, x, shape=shape)


def _concat(g: _Gen):
    x = g.value(lambda t: t.rank >= 1 and any(isinstance(d, int) for d in t.shape),
                lambda: g.type(min_rank=1))
    static_axes = [i for i, d in enumerate(x.shape) if isinstance(d, int)]
    if static_axes:
        ax = g.draw(st.sampled_from(static_axes))
    else:  # fresh operand had only symbolic dims: use a static variant of its type
        ax = 0
        x = g.operand(x.type.with_shape((2,) + x.shape[1:]))
    parts = [x]
    for _ in range(g.draw(st.integers(0, 2))):
        shape = list(x.shape)
        shape[ax] = g.dim(static=True)
        parts.append(g.operand(x.type.with_shape(shape)))
    parts = g.draw(st.permutations(parts))
    g.emit(ops.concat, *parts, axis=ax - x.type.rank if g.draw(st.booleans()) else ax)


def _slice(g: _Gen):
    x = g.value(lambda t: any(isinstance(d, int) for d in t.shape),
                lambda: g.type(min_rank=1, static=True))
    ax = g.draw(st.sampled_from([i for i, d in enumerate(x.shape) if isinstance(d, int)]))
    n = x.shape[ax]
    empty_ok = not g.numeric  # valid IR, but take/embedding cannot read from an empty axis
    start = g.draw(st.integers(0, n if empty_ok else n - 1))
    limit = g.draw(st.integers(start if empty_ok else start + 1, n))
    g.emit(ops.slice_, x, axis=ax, start=start, limit=limit, stride=g.draw(st.integers(1, 3)))


def _take(g: _Gen):
    x = g.any_value(min_rank=1)
    idx = g.operand(g.type((DType.int32,), max_rank=2))
    g.emit(ops.take, x, idx, axis=g.axis(x.type.rank))


def _iota(g: _Gen):
    t = g.type((DType.int32, DType.f32), min_rank=1)
    g.emit(ops.iota, dimension=g.axis(t.rank), result_types=[t])


def _constant(g: _Gen):
    g.constant(g.type(max_rank=2, static=True))


def _weight(g: _Gen):
    g.weight(g.type(FLOAT_DTYPES + (DType.int8,), max_rank=3, static=True))


def _dot_general(g: _Gen):
    lhs = g.any_value()
    roles = [g.draw(st.sampled_from("bcf")) for _ in lhs.shape]  # batch, contract, free
    batch = [i for i, r in enumerate(roles) if r == "b"]
    contract = [i for i, r in enumerate(roles) if r == "c"]
    rhs_dims = ([("b", i) for i in batch] + [("c", i) for i in contract]
                + [("f", g.dim()) for _ in range(g.draw(st.integers(0, 2)))])
    rhs_dims = g.draw(st.permutations(rhs_dims))
    rhs_shape = tuple(lhs.shape[x] if r in "bc" else x for r, x in rhs_dims)
    rhs = g.operand(TensorType(rhs_shape, lhs.dtype))
    where = {(r, x): j for j, (r, x) in enumerate(rhs_dims) if r in "bc"}
    g.emit(ops.dot_general, lhs, rhs, lhs_contract=tuple(contract),
           rhs_contract=tuple(where[("c", i)] for i in contract), lhs_batch=tuple(batch),
           rhs_batch=tuple(where[("b", i)] for i in batch))


def _matmul(g: _Gen):
    x = g.any_value(min_rank=1)
    w = g.operand(TensorType((x.shape[-1], g.dim()), x.dtype))
    g.emit(ops.matmul, x, w)


def _embedding(g: _Gen):
    ids = g.any_value(dtypes=(DType.int32,))
    table = g.operand(g.type(FLOAT_DTYPES, min_rank=2, max_rank=2))
    g.emit(ops.embedding, ids, table)


def _linear(g: _Gen):
    x = g.float_value(min_rank=1)
    out = g.dim()
    w = g.operand(TensorType((out, x.shape[-1]), x.dtype))
    bias = [g.operand(TensorType((out,), x.dtype))] if g.draw(st.booleans()) else []
    g.emit(ops.linear, x, w, *bias)


def _rms_norm(g: _Gen):
    x = g.float_value(min_rank=1)
    w = g.operand(TensorType((x.shape[-1],), x.dtype))
    g.emit(ops.rms_norm, x, w, eps=g.real(1e-6, 0.1), offset=g.real(-1, 1))


def _even_head_dim(t: TensorType) -> bool:
    return t.rank >= 2 and isinstance(t.shape[-1], int) and t.shape[-1] % 2 == 0


def _rope(g: _Gen):
    x = g.value(lambda t: _even_head_dim(t) and t.dtype.is_float,
                lambda: TensorType(g.shape(0, 2) + (g.dim(), 2 * g.dim(True, 1, 4)),
                                   g.dtype(FLOAT_DTYPES)))
    pos = g.operand(TensorType(x.shape[:-2], DType.int32))
    g.emit(ops.rope, x, pos, theta=g.real(1, 1e6),
           style=g.draw(st.sampled_from(("half", "interleaved"))),
           scaling=g.draw(st.sampled_from(("none", "linear", "llama3"))),
           factor=g.real(1, 32), low_freq_factor=g.real(0.5, 2),
           high_freq_factor=g.real(2.5, 8),
           original_max_position=g.draw(st.integers(1, 1 << 20)))


def _logits(g: _Gen):
    h = g.float_value(min_rank=1)
    w = g.operand(TensorType((g.dim(), h.shape[-1]), h.dtype))
    g.emit(ops.logits, h, w, softcap=None if g.draw(st.booleans()) else g.real(1, 50))


def _heads(g: _Gen) -> tuple:
    """(query heads, kv heads): a static multiple, or one symbolic name for both."""
    if g.draw(st.integers(0, 3)) or g.static:
        kvh = g.dim(True, 1, 3)
        return kvh * g.dim(True, 1, 3), kvh
    return ("H",) * 2


def _attn_attrs(g: _Gen) -> dict:
    return dict(scale=g.real(0.01, 2), causal=g.draw(st.booleans()),
                window=g.draw(st.one_of(st.none(), st.integers(1, 1 << 16))),
                softcap=None if g.draw(st.booleans()) else g.real(1, 50))


def _attention(g: _Gen):
    (h, kvh), dt = _heads(g), g.dtype(FLOAT_DTYPES)
    b, s, length, d = g.dim(), g.dim(), g.dim(), g.dim()
    q = g.operand(TensorType((b, s, h, d), dt))
    k = g.operand(TensorType((b, length, kvh, d), dt))
    v = g.operand(TensorType((b, length, kvh, g.dim()), dt))
    g.emit(ops.attention, q, k, v, **_attn_attrs(g))


def _cache_type(g: _Gen, kvh, dt) -> TensorType:
    layers = g.dim()
    pages = g.dim() if g.static else g.draw(st.sampled_from(("pages", 4)))
    page_size = g.dim() if g.static else g.draw(st.sampled_from(("page_size", 2)))
    # an i8 / f8e4m3fn cache is quantized: each row is head_dim codes + 4 scale bytes
    scale = KV_SCALE_ELEMS if dt in QUANT_DTYPES else 0
    return TensorType((layers, 2, pages, page_size, kvh, g.dim(True, 1, 4) + scale), dt)


def _cache_io_dtype(g: _Gen, kv: TensorType) -> DType:
    """The dtype of what a cache takes in and gives back: its own, or a float for a
    quantized cache (codes are written and read by the ops themselves)."""
    return g.dtype((DType.f32, DType.bf16, DType.f16)) if kv.dtype in QUANT_DTYPES \
        else kv.dtype


def _is_cache(t: TensorType) -> bool:
    """A value usable as a paged cache: [L, 2, pages, page_size, kv_heads, D], and for an
    i8 / f8e4m3fn (quantized) cache rows of codes plus the scale."""
    if t.rank != 6 or t.shape[1] != 2:
        return False
    return t.dtype not in QUANT_DTYPES or (isinstance(t.shape[5], int)
                                           and t.shape[5] > KV_SCALE_ELEMS)


def _layer(g: _Gen, kv: TensorType) -> int:
    return g.draw(st.integers(0, kv.shape[0] - 1 if isinstance(kv.shape[0], int) else 40))


def _kv_update(g: _Gen):
    kv = g.value(_is_cache, lambda: _cache_type(g, g.dim(), g.dtype(FLOAT_DTYPES)))
    tokens, io = g.dim(), _cache_io_dtype(g, kv.type)
    row = (kv.shape[4], kv_head_dim(kv.type))
    k = g.operand(TensorType((tokens,) + row, io))
    v = g.operand(TensorType((tokens,) + row, io))
    slots = g.operand(TensorType((tokens,), DType.int32))
    g.emit(ops.kv_update, kv, k, v, slots, layer=_layer(g, kv.type))


def _paged_attention(g: _Gen):
    h, kvh = _heads(g)
    kv = g.value(lambda t: _is_cache(t) and t.shape[4] == kvh,
                 lambda: _cache_type(g, kvh, g.dtype(FLOAT_DTYPES)))
    tokens, seqs = g.dim(), g.dim()
    i32 = DType.int32
    q = g.operand(TensorType((tokens, h, kv_head_dim(kv.type)), _cache_io_dtype(g, kv.type)))
    page_table = g.operand(TensorType((seqs, g.dim()), i32))
    context_lens = g.operand(TensorType((seqs,), i32))
    q_index = g.operand(TensorType((seqs, g.dim()), i32))
    positions = g.operand(TensorType((tokens,), i32))
    g.emit(ops.paged_attention, q, kv, page_table, context_lens, q_index, positions,
           layer=_layer(g, kv.type), **_attn_attrs(g))


def _with_axis(opdef, **attr_strategies):
    def gen(g: _Gen):
        x = g.float_value(min_rank=1)
        g.emit(opdef, x, axis=g.axis(x.type.rank),
               **{k: g.draw(s) for k, s in attr_strategies.items()})
    return gen


_DIRECTIONS = st.sampled_from(("eq", "ne", "lt", "le", "gt", "ge"))
_APPROX = st.sampled_from(("tanh", "none"))

GENERATORS: dict[str, Callable[[_Gen], None]] = {
    **{op.name: _binary(op, ARITH_DTYPES) for op in (ops.add, ops.sub, ops.mul, ops.div,
                                                      ops.pow_)},
    **{op.name: _binary(op) for op in (ops.maximum, ops.minimum)},
    **{op.name: _unary(op) for op in (ops.exp, ops.log, ops.tanh, ops.rsqrt, ops.sqrt,
                                       ops.cos, ops.sin, ops.silu)},
    ops.neg.name: _unary(ops.neg, ARITH_DTYPES),
    ops.gelu.name: _unary(ops.gelu, approximate=_APPROX),
    ops.convert.name: _convert,
    ops.compare.name: _binary(ops.compare, direction=_DIRECTIONS),
    ops.select.name: _select,
    ops.swiglu.name: _binary(ops.swiglu, FLOAT_DTYPES),
    ops.geglu.name: _binary(ops.geglu, FLOAT_DTYPES, approximate=_APPROX),
    **{op.name: _reduce(op) for op in (ops.reduce_sum, ops.reduce_max, ops.reduce_mean)},
    ops.reshape.name: _reshape,
    ops.transpose.name: _transpose,
    ops.broadcast.name: _broadcast,
    ops.concat.name: _concat,
    ops.slice_.name: _slice,
    ops.take.name: _take,
    ops.iota.name: _iota,
    ops.constant.name: _constant,
    ops.weight.name: _weight,
    ops.dot_general.name: _dot_general,
    ops.matmul.name: _matmul,
    ops.softmax.name: _with_axis(ops.softmax),
    ops.argmax.name: _with_axis(ops.argmax),
    ops.embedding.name: _embedding,
    ops.linear.name: _linear,
    ops.rms_norm.name: _rms_norm,
    ops.rope.name: _rope,
    ops.logits.name: _logits,
    ops.attention.name: _attention,
    ops.kv_update.name: _kv_update,
    ops.paged_attention.name: _paged_attention,
}


@st.composite
def functions(draw, module: Module, name: str, max_ops: int = 8, static: bool = False,
              op_names: tuple[str, ...] | None = None, numeric: bool = False) -> None:
    """Add one random function named `name` to `module`."""
    g = _Gen(draw, module, name, static, numeric)
    for _ in range(draw(st.integers(0, 2))):
        g.argument(g.type())
    names = op_names or tuple(sorted(GENERATORS))
    for _ in range(draw(st.integers(0, max_ops))):
        GENERATORS[draw(st.sampled_from(names))](g)
    if g.values:
        g.b.fn.results = draw(st.lists(st.sampled_from(g.values), max_size=3))


@st.composite
def modules(draw, max_functions: int = 2, max_ops: int = 8, static: bool = False,
            op_names: tuple[str, ...] | None = None) -> Module:
    """A random module that passes `verify`: functions of random ops, weights, attributes.

    `static=True` uses static dims only; `op_names` restricts the ops drawn (by name)."""
    m = Module(draw(st.one_of(st.just("module"), symbol_names)),
               attributes=draw(module_attributes))
    for i in range(draw(st.integers(0, max_functions))):
        name = draw(st.one_of(st.sampled_from(("step", "prefill", "decode")), symbol_names))
        while name in m.functions:
            name += f"_{i}"
        draw(functions(m, name, max_ops, static, op_names))
    for _ in range(draw(st.integers(0, 2))):  # declared but unused weights
        name = draw(st.one_of(symbol_names, st.just("")))
        if name not in m.weights:
            m.weights[name] = TensorType(tuple(draw(st.lists(st.integers(0, 4), max_size=2))),
                                         draw(st.sampled_from(ALL_DTYPES)))
    return m


def arrays_for(t: TensorType):
    """Data of static type `t`: small floats, small ints (in and out of index ranges), bools."""
    if t.dtype == DType.bool_:
        elements = st.booleans()
    elif t.dtype.is_int:
        elements = st.integers(-2, 9)
    else:
        elements = st.floats(-4, 4, width=32)
    return hnp.arrays(t.dtype.to_numpy(), t.shape, elements=elements)


@st.composite
def numeric_modules(draw, max_ops: int = 8, op_names: tuple[str, ...] | None = None):
    """(module, inputs, weights): a verified module with one function @f and data for it."""
    m = Module("numeric")
    draw(functions(m, "f", max_ops, op_names=op_names, numeric=True))
    inputs = [draw(arrays_for(a.type)) for a in m.functions["f"].args]
    weights = {name: draw(arrays_for(t)) for name, t in m.weights.items()}
    return m, inputs, weights
