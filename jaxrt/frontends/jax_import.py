"""Import a JAX function through its jaxpr into an IR module of primitive ops.

    module = import_function(fn, jnp.zeros((4, 8)), jax.ShapeDtypeStruct((T,), jnp.int32))
    imported = import_jax(fn, params, tokens_struct, weight_argnums=(0,))  # + weight data

Arguments given as `jax.ShapeDtypeStruct`s with `jax.export.symbolic_shape` dims keep
those dims symbolic (`"T"` in the IR). Arguments listed in `weight_argnums` are pytrees of
arrays that become module weights named by their pytree paths (`layers.0.attn.q.kernel`);
the others become function arguments. `jit`/`pjit`, `custom_jvp`/`custom_vjp` calls and
checkpoints are inlined; `scan` becomes an IR `scan` over a body function (compiled once),
or is unrolled with `scan="unroll"`. Equations whose inputs are all compile-time constants
are evaluated by JAX at import time (RoPE frequency tables, masks of static shape), so the
IR sees their values. A primitive without an import rule raises `JaxImportError` naming it
and the user's source line it came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.extend.core
from jax.extend.core import DropVar as _DropVar
import numpy as np

from jaxrt.errors import InputError
from ..ir import Builder, DType, Function, Module, TensorType, Value, ops
from ..ir.module import make_op

CONST_LIMIT = 1 << 16  # constants above this many elements become module weights


class JaxImportError(InputError):
    """A jaxpr construct jaxrt cannot import: names the primitive and its source line."""

    def __init__(self, primitive: str, message: str, where: str = ""):
        self.primitive, self.where = primitive, where
        super().__init__(f"{where + ': ' if where else ''}cannot import JAX primitive "
                         f"'{primitive}': {message}")


@dataclass
class Imported:
    module: Module
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> data
    arg_names: list[str] = field(default_factory=list)


def path_name(path) -> str:
    """A pytree key path as a dotted weight name: `layers.0.attn.q_proj.kernel`."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k).strip(".[]'\""))
    return ".".join(p for p in parts if p not in ("value",)) or "w"


def _dtype(dt, where="", prim="convert_element_type") -> DType:
    try:
        return DType.from_numpy(np.dtype(dt))
    except (KeyError, TypeError, ValueError):
        raise JaxImportError(prim, f"dtype {np.dtype(dt).name} has no IR type", where) from None


def _dim(d, where, prim):
    if isinstance(d, (int, np.integer)):
        return int(d)
    text = str(d)
    if text.isidentifier():
        return text
    raise JaxImportError(prim, f"symbolic dimension '{text}' is an expression; the IR "
                               f"keeps only plain symbols", where)


def _where(eqn) -> str:
    from jax._src import source_info_util
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a location is a courtesy, never a failure
        return ""


class _Importer:
    def __init__(self, module: Module, weights: dict[str, np.ndarray], scan_mode: str):
        self.module, self.weights, self.scan_mode = module, weights, scan_mode
        self.n_consts = 0
        self.n_bodies = 0
        self.outer_where = ""  # the user's call site of an inlined jit (e.g. jnp.cumsum)

    # ---- values -------------------------------------------------------------------------

    def ir_type(self, aval, where="", prim="") -> TensorType:
        return TensorType(tuple(_dim(d, where, prim) for d in aval.shape),
                          _dtype(aval.dtype, where, prim))

    def materialize(self, b: Builder, x) -> Value:
        """An IR value for `x`: a Value already, or a numpy constant."""
        if isinstance(x, Value):
            return x
        arr = np.asarray(x)
        t = TensorType(arr.shape, _dtype(arr.dtype))
        flat = arr.reshape(-1)
        if flat.size and np.all(flat == flat[0]) and not np.isnan(flat[0]):
            return b(ops.constant, value=_scalar(flat[0]), result_types=[t])
        if arr.size > CONST_LIMIT:
            name = f"const.{self.n_consts}"
            self.n_consts += 1
            self.weights[name] = arr
            return b.weight(name, t)
        return b(ops.constant, value=tuple(_scalar(v) for v in flat), result_types=[t])

    # ---- jaxprs -------------------------------------------------------------------------

    def run_jaxpr(self, b: Builder, jaxpr, consts: Sequence, args: Sequence) -> list:
        env: dict = {}

        def read(a):
            if isinstance(a, jax.extend.core.Literal):
                return np.asarray(a.val, dtype=a.aval.dtype)
            return env[a]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            outs = self.eqn(b, eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, _DropVar):
                    env[v] = o
        return [read(a) for a in jaxpr.outvars]

    def eqn(self, b: Builder, eqn, ins: list) -> list:
        prim = eqn.primitive.name
        where = _where(eqn) or self.outer_where
        inner = _inner_jaxpr(eqn)
        if inner is not None:  # jit / custom_jvp / custom_vjp / checkpoint: inline
            jaxpr, consts = inner
            saved, self.outer_where = self.outer_where, where
            try:
                return self.run_jaxpr(b, jaxpr, consts, ins)
            finally:
                self.outer_where = saved
        if prim == "scan":
            return self.scan(b, eqn, ins, where)
        static = all(d for d in (_static(o.aval) for o in eqn.outvars))
        if (all(not isinstance(x, Value) for x in ins) and static and prim not in _NO_FOLD
                and sum(int(np.prod(o.aval.shape)) for o in eqn.outvars) <= CONST_LIMIT):
            with jax.ensure_compile_time_eval():
                res = eqn.primitive.bind(*ins, **eqn.params)
            res = res if eqn.primitive.multiple_results else [res]
            return [np.asarray(r) for r in res]
        rule = RULES.get(prim)
        if rule is None:
            raise JaxImportError(prim, "no import rule (supported: "
                                       f"{', '.join(sorted(RULES))}, jit, custom_jvp/vjp, "
                                       "scan)", where)
        ctx = _Ctx(self, b, eqn, where)
        try:
            out = rule(ctx, *ins, **eqn.params)
        except JaxImportError:
            raise
        except InputError as e:  # an op the rule built does not verify: name the line
            raise JaxImportError(prim, str(e), where) from None
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        for v, o in zip(eqn.outvars, outs):
            want = self.ir_type(v.aval, where, prim)
            got = o.type if isinstance(o, Value) else TensorType(np.shape(o), want.dtype)
            if got != want:
                raise AssertionError(f"{where}: import rule for {prim} made {got}, "
                                     f"JAX says {want}")
        return outs

    def scan(self, b: Builder, eqn, ins, where):
        p = eqn.params
        nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
        body, consts = p["jaxpr"].jaxpr, p["jaxpr"].consts
        n_ys = len(eqn.outvars) - nk
        if p["reverse"]:
            raise JaxImportError("scan", "reverse scans are not supported", where)
        if self.scan_mode == "unroll":
            carry = list(ins[nc:nc + nk])
            ys = [[] for _ in range(n_ys)]
            for i in range(length):
                xs = [self.index(b, x, i) for x in ins[nc + nk:]]
                outs = self.run_jaxpr(b, body, consts, list(ins[:nc]) + carry + xs)
                carry = outs[:nk]
                for acc, y in zip(ys, outs[nk:]):
                    acc.append(y)
            stacked = [self.stack(b, acc) for acc in ys]
            return carry + stacked
        live_ys = [v for v in eqn.outvars[nk:] if not isinstance(v, _DropVar)]
        if live_ys:
            raise JaxImportError("scan", "stacked outputs (ys) of a kept scan are not "
                                         "supported; pass scan='unroll'", where)
        if nk == 0:
            raise JaxImportError("scan", "a scan without carried values", where)
        operands = [self.materialize(b, x) for x in ins[nc:nc + nk] + ins[:nc] + ins[nc + nk:]]
        name = f"scan_body{self.n_bodies}"
        self.n_bodies += 1
        k, m = nk, nc
        args = [("i", TensorType((), DType.int32))]
        args += [(f"c{j}", v.type) for j, v in enumerate(operands[:k])]
        args += [(f"inv{j}", v.type) for j, v in enumerate(operands[k:k + m])]
        args += [(f"x{j}", TensorType(v.type.shape[1:], v.dtype))
                 for j, v in enumerate(operands[k + m:])]
        bb = Builder.new_function(self.module, name, args)
        fa = bb.fn.args
        carry_args, inv_args, x_args = fa[1:1 + k], fa[1 + k:1 + k + m], fa[1 + k + m:]
        outs = self.run_jaxpr(bb, body, consts, list(inv_args) + list(carry_args) + list(x_args))
        bb.ret(*[self.materialize(bb, o) for o in outs[:nk]])
        res = b(ops.scan, *operands, body=name, length=length, carried=k, invariant=m)
        res = res if isinstance(res, tuple) else (res,)
        dropped = [None] * n_ys
        return list(res) + dropped

    def index(self, b: Builder, x, i: int):
        if not isinstance(x, Value):
            return np.asarray(x)[i]
        s = b(ops.slice_, x, axis=0, start=i, limit=i + 1)
        return b(ops.reshape, s, shape=x.type.shape[1:])

    def stack(self, b: Builder, xs: list):
        if all(not isinstance(x, Value) for x in xs):
            return np.stack(xs)
        vals = [self.materialize(b, x) for x in xs]
        vals = [b(ops.reshape, v, shape=(1,) + v.type.shape) for v in vals]
        return b(ops.concat, *vals, axis=0)


_NO_FOLD = {"scan", "while", "cond", "rng_bit_generator", "random_bits", "random_seed",
            "random_wrap", "random_unwrap"}


def _static(aval) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in aval.shape)


def _scalar(v):
    v = v.item() if hasattr(v, "item") else v
    return float(v) if not isinstance(v, bool) else float(v)


def _inner_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation whose body is inlined, else None."""
    p = eqn.params
    name = eqn.primitive.name
    if name in ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                "custom_lin"):
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            j = p.get(key)
            if j is None:
                continue
            if hasattr(j, "jaxpr"):  # ClosedJaxpr
                return j.jaxpr, j.consts
            return j, ()
    return None


# ---- import rules: (ctx, *inputs, **params) -> IR value(s) --------------------------------

class _Ctx:
    def __init__(self, imp: _Importer, b: Builder, eqn, where: str):
        self.imp, self.b, self.eqn, self.where = imp, b, eqn, where

    def v(self, x) -> Value:
        return self.imp.materialize(self.b, x)

    def __call__(self, opdef, *operands, **attrs):
        return self.b(opdef, *[self.v(o) for o in operands], **attrs)

    def out_type(self, i=0) -> TensorType:
        return self.imp.ir_type(self.eqn.outvars[i].aval, self.where, self.eqn.primitive.name)

    def fail(self, message: str):
        raise JaxImportError(self.eqn.primitive.name, message, self.where)

    def shape(self, shape) -> tuple:
        return tuple(_dim(d, self.where, self.eqn.primitive.name) for d in shape)


RULES: dict[str, Callable] = {}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def _binary(opdef, int_ok=True):
    def imp(ctx, x, y, **_):
        if not int_ok and ctx.out_type().dtype.is_int:
            ctx.fail("integer division rounds toward zero in JAX; the IR's floors")
        return ctx(opdef, x, y)
    return imp


for _n, _op in {"add": ops.add, "sub": ops.sub, "mul": ops.mul, "max": ops.maximum,
                "min": ops.minimum, "pow": ops.pow_}.items():
    RULES[_n] = _binary(_op)
RULES["div"] = _binary(ops.div, int_ok=False)
RULES["add_any"] = _binary(ops.add)

for _n, _op in {"neg": ops.neg, "exp": ops.exp, "log": ops.log, "tanh": ops.tanh,
                "rsqrt": ops.rsqrt, "sqrt": ops.sqrt, "cos": ops.cos, "sin": ops.sin}.items():
    RULES[_n] = (lambda op: lambda ctx, x, **_: ctx(op, x))(_op)

for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    RULES[_n] = (lambda d: lambda ctx, x, y, **_: ctx(ops.compare, x, y, direction=d))(_n)


@rule("stop_gradient", "copy", "copy_p", "optimization_barrier", "sharding_constraint",
      "reduce_precision_noop")
def _identity(ctx, *xs, **_):
    return xs if len(xs) > 1 else xs[0]


@rule("logistic")
def _logistic(ctx, x, **_):
    # 1 / (1 + exp(-x)); raise-llm-ops turns x * logistic(x) back into silu
    one = np.asarray(1.0, np.dtype(ctx.out_type().dtype.to_numpy()))
    return ctx(ops.div, one, ctx(ops.add, ctx(ops.exp, ctx(ops.neg, x)), one))


@rule("integer_pow")
def _integer_pow(ctx, x, *, y, **_):
    # square-and-multiply, as JAX lowers integer_pow (same rounding)
    if y == 0:
        return ctx.b(ops.constant, value=1.0, result_types=[ctx.out_type()])
    n, base, acc = abs(y), ctx.v(x), None
    while n:
        if n & 1:
            acc = base if acc is None else ctx(ops.mul, acc, base)
        n >>= 1
        if n:
            base = ctx(ops.mul, base, base)
    if y < 0:
        one = np.asarray(1.0, np.dtype(ctx.out_type().dtype.to_numpy()))
        acc = ctx(ops.div, one, acc)
    return acc


@rule("square")
def _square(ctx, x, **_):
    return ctx(ops.mul, x, x)


@rule("and", "or")
def _and_or(ctx, x, y, **_):
    if ctx.out_type().dtype != DType.bool_:
        ctx.fail("bitwise and/or on integers")
    return ctx(ops.minimum if ctx.eqn.primitive.name == "and" else ops.maximum, x, y)


@rule("not")
def _not(ctx, x, **_):
    if ctx.out_type().dtype != DType.bool_:
        ctx.fail("bitwise not on integers")
    return ctx(ops.compare, x, np.asarray(False), direction="eq")


@rule("select_n")
def _select_n(ctx, pred, *cases, **_):
    if len(cases) != 2:
        ctx.fail(f"select_n with {len(cases)} cases (only 2 are supported)")
    p = ctx.v(pred)
    if p.dtype != DType.bool_:
        p = ctx(ops.compare, p, np.asarray(0, np.int32), direction="ne")
    return ctx(ops.select, p, cases[1], cases[0])  # select_n(p, a, b) = p ? b : a


@rule("clamp")
def _clamp(ctx, lo, x, hi, **_):
    return ctx(ops.minimum, ctx(ops.maximum, x, lo), hi)


@rule("convert_element_type")
def _convert(ctx, x, *, new_dtype, **_):
    return ctx(ops.convert, x, dtype=_dtype(new_dtype, ctx.where))


def _reduce(opdef):
    def imp(ctx, x, *, axes, **_):
        return ctx(opdef, x, axes=tuple(int(a) for a in axes))
    return imp


RULES["reduce_sum"] = _reduce(ops.reduce_sum)
RULES["reduce_max"] = _reduce(ops.reduce_max)


@rule("reduce_min")
def _reduce_min(ctx, x, *, axes, **_):
    return ctx(ops.neg, ctx(ops.reduce_max, ctx(ops.neg, x), axes=tuple(axes)))


@rule("argmax")
def _argmax(ctx, x, *, axes, index_dtype, **_):
    if np.dtype(index_dtype) != np.int32 or len(axes) != 1:
        ctx.fail("argmax over one axis to int32 only")
    return ctx(ops.argmax, x, axis=int(axes[0]))


@rule("reshape")
def _reshape(ctx, x, *, new_sizes, dimensions=None, **_):
    if dimensions is not None:
        ctx.fail("reshape with a dimension order")
    return ctx(ops.reshape, x, shape=ctx.shape(new_sizes))


@rule("squeeze")
def _squeeze(ctx, x, *, dimensions, **_):
    return ctx(ops.reshape, x, shape=ctx.out_type().shape)


@rule("expand_dims")
def _expand_dims(ctx, x, **_):
    return ctx(ops.reshape, x, shape=ctx.out_type().shape)


@rule("broadcast_in_dim")
def _broadcast_in_dim(ctx, x, *dyn, shape, broadcast_dimensions, **_):
    if dyn:
        ctx.fail("dynamic shapes")
    out = ctx.shape(shape)
    v = ctx.v(x)
    expanded = [1] * len(out)
    for src, dst in enumerate(broadcast_dimensions):
        expanded[dst] = v.type.shape[src]
    if tuple(expanded) != v.type.shape:
        v = ctx.b(ops.reshape, v, shape=tuple(expanded))
    return ctx.b(ops.broadcast, v, shape=out) if v.type.shape != out else v


@rule("transpose")
def _transpose(ctx, x, *, permutation, **_):
    return ctx(ops.transpose, x, perm=tuple(int(p) for p in permutation))


@rule("concatenate")
def _concatenate(ctx, *xs, dimension, **_):
    return ctx(ops.concat, *xs, axis=int(dimension))


@rule("stack")
def _stack(ctx, *xs, axis, **_):
    # stack(xs, axis) = concat(reshape(x) with a size-1 axis inserted, ..., axis)
    out = ctx.out_type()
    parts = []
    for x in xs:
        v = ctx.v(x)
        a = int(axis) % out.rank
        parts.append(ctx.b(ops.reshape, v, shape=v.type.shape[:a] + (1,) + v.type.shape[a:]))
    return ctx.b(ops.concat, *parts, axis=int(axis) % out.rank)


@rule("slice")
def _slice(ctx, x, *, start_indices, limit_indices, strides=None, **_):
    v = ctx.v(x)
    for ax, (s, e) in enumerate(zip(start_indices, limit_indices)):
        st = 1 if strides is None else int(strides[ax])
        if (int(s), st) != (0, 1) or e != v.type.shape[ax]:
            v = ctx.b(ops.slice_, v, axis=ax, start=int(s), limit=int(e), stride=st)
    return v


@rule("split")
def _split(ctx, x, *, sizes, axis, **_):
    outs, start = [], 0
    for n in sizes:
        outs.append(ctx(ops.slice_, x, axis=int(axis), start=start, limit=start + int(n)))
        start += int(n)
    return outs


@rule("dynamic_slice")
def _dynamic_slice(ctx, x, *starts, slice_sizes, **_):
    if any(isinstance(s, Value) for s in starts):
        ctx.fail("start indices computed at run time (only constant starts import)")
    v = ctx.v(x)
    for ax, (s, n) in enumerate(zip(starts, slice_sizes)):
        dim = v.type.shape[ax]
        s = int(np.clip(int(s), 0, dim - int(n))) if isinstance(dim, int) else int(s)
        if (s, int(n)) != (0, dim):
            v = ctx.b(ops.slice_, v, axis=ax, start=s, limit=s + int(n))
    return v


@rule("iota")
def _iota(ctx, *, dtype, shape, dimension, **_):
    t = ctx.out_type()
    if t.dtype not in (DType.int32, DType.f32):
        ctx.fail(f"iota of {t.dtype.value}")
    return ctx.b(ops.iota, dimension=int(dimension), result_types=[t])


@rule("gather")
def _gather(ctx, x, idx, *, dimension_numbers, slice_sizes, **_):
    # The form jnp.take(x, idx, axis=a) and x[idx] produce: one collapsed axis.
    dn = dimension_numbers
    v = ctx.v(x)
    r = v.type.rank
    if (not dn.collapsed_slice_dims and not dn.operand_batching_dims
            and not isinstance(idx, Value) and np.ndim(idx) == 1
            and tuple(dn.offset_dims) == tuple(range(r))):
        # a static slice with constant starts (x[..., a:b] on symbolic shapes)
        for ax, s in zip(dn.start_index_map, np.asarray(idx)):
            n, dim = _dim(slice_sizes[ax], "", "gather"), v.type.shape[ax]
            if not isinstance(dim, int):
                ctx.fail(f"slice of symbolic axis {ax}")
            s = int(np.clip(int(s), 0, dim - n))
            if (s, n) != (0, dim):
                v = ctx.b(ops.slice_, v, axis=int(ax), start=s, limit=s + n)
        return v
    i = ctx.v(idx)
    if (len(dn.collapsed_slice_dims) != 1 or tuple(dn.start_index_map) != tuple(
            dn.collapsed_slice_dims) or dn.operand_batching_dims or i.type.shape[-1] != 1):
        ctx.fail(f"gather form {dn} (only take along one axis imports)")
    a = dn.collapsed_slice_dims[0]
    # (sizes compared as IR dims: a symbolic size stays a symbol, never int()-ed)
    if any(_dim(n, "", "gather") != (1 if d == a else v.type.shape[d])
           for d, n in enumerate(slice_sizes)):
        ctx.fail(f"gather slice sizes {slice_sizes} (only whole slices import)")
    nb = i.type.rank - 1
    if tuple(dn.offset_dims) != tuple(range(a)) + tuple(range(a + nb, nb + r - 1)):
        ctx.fail(f"gather offset dims {dn.offset_dims} (only the take layout imports)")
    i = ctx.b(ops.reshape, i, shape=i.type.shape[:-1])
    if i.dtype != DType.int32:
        i = ctx.b(ops.convert, i, dtype=DType.int32)
    # ids outside the table: JAX clamps or fills; the IR's take clamps (never a valid id)
    return ctx.b(ops.take, v, i, axis=a)


@rule("dot_general")
def _dot_general(ctx, x, y, *, dimension_numbers, preferred_element_type=None, **_):
    (lc, rc), (lb, rb) = dimension_numbers
    out = ctx(ops.dot_general, x, y, lhs_contract=tuple(int(d) for d in lc),
              rhs_contract=tuple(int(d) for d in rc), lhs_batch=tuple(int(d) for d in lb),
              rhs_batch=tuple(int(d) for d in rb))
    want = ctx.out_type().dtype
    return out if out.dtype == want else ctx.b(ops.convert, out, dtype=want)


# ---- entry points ----------------------------------------------------------------------------

def _spec(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.asarray(x).dtype))


def import_jax(fn: Callable, *example_args, weight_argnums: Sequence[int] = (),
               arg_names: Sequence[str] | None = None, name: str = "forward",
               scan: str = "keep") -> Imported:
    """Trace `fn(*example_args)` and import it. Leaves of the arguments in `weight_argnums`
    become module weights (data in `Imported.weights`), the others function arguments."""
    if scan not in ("keep", "unroll"):
        raise ValueError(f"scan must be 'keep' or 'unroll', got {scan!r}")
    specs = [jax.tree_util.tree_map(_spec, a) for a in example_args]
    closed = jax.make_jaxpr(fn)(*specs)
    module = Module(name)
    weights: dict[str, np.ndarray] = {}
    fn_args, flat_inputs, names = [], [], []
    for i, a in enumerate(example_args):
        leaves = jax.tree_util.tree_flatten_with_path(a)[0]
        for path, leaf in leaves:
            if i in weight_argnums:
                flat_inputs.append(("weight", path_name(path), leaf))
            else:
                base = arg_names[i] if arg_names else f"arg{i}"
                n = base if len(leaves) == 1 else f"{base}.{path_name(path)}"
                flat_inputs.append(("arg", n, leaf))
    imp = _Importer(module, weights, scan)
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != len(flat_inputs):
        raise AssertionError("jaxpr inputs do not match the flattened arguments")
    for (kind, n, leaf), var in zip(flat_inputs, jaxpr.invars):
        if kind == "arg":
            fn_args.append((n, imp.ir_type(var.aval, n, "argument")))
            names.append(n)
    b = Builder.new_function(module, name, fn_args)
    inputs, args = [], iter(b.fn.args)
    for (kind, n, leaf), var in zip(flat_inputs, jaxpr.invars):
        if kind == "arg":
            inputs.append(next(args))
        else:
            if n in module.weights:
                raise JaxImportError("argument", f"two weights named {n!r}")
            inputs.append(b.weight(n, imp.ir_type(var.aval, n, "weight")))
            weights[n] = np.asarray(leaf)
    consts = [np.asarray(c) for c in closed.consts]
    outs = imp.run_jaxpr(b, jaxpr, consts, inputs)
    b.ret(*[imp.materialize(b, o) for o in outs])
    _order_functions(module, name)
    return Imported(module, weights, names)


def _order_functions(module: Module, main: str) -> None:
    """The imported function first, then scan bodies (printing order)."""
    fns = module.functions
    module.functions = {main: fns[main], **{k: f for k, f in fns.items() if k != main}}


def import_function(fn: Callable, *example_args, name: str = "forward",
                    scan: str = "keep") -> Module:
    """Trace `fn` with `example_args` (arrays or ShapeDtypeStructs, possibly symbolic) and
    return an IR Module whose function `@name` computes the same results."""
    imported = import_jax(fn, *example_args, name=name, scan=scan)
    if imported.weights:  # large closed-over constants: data the module cannot carry
        big = ", ".join(sorted(imported.weights))
        raise JaxImportError("constant", f"closed-over constants above {CONST_LIMIT} "
                                         f"elements ({big}) need import_jax, which returns "
                                         f"their data as weights")
    return imported.module


__all__ = ["import_function", "import_jax", "Imported", "JaxImportError", "path_name"]
