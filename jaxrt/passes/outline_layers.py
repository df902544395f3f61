"""outline-layers: find a function's repeated layers and run them as one `scan`.

A decoder repeats the same layer body with different weights. Compiling 30 unrolled
copies makes XLA compile time grow with depth; one `scan` over stacked weights compiles
the body once. The pass finds the repetition from the graph alone (no weight names, no
model knowledge):

1. *Free* values need no layer: non-threaded arguments (tokens, positions, ...) and
   leaves (weights, constants). *Threaded* arguments (the KV cache: an argument whose type
   a result has) and every computed value are state.
2. A *cut* is a point in the op order where at most `max-carried` state values are live
   (the residual stream and the cache between two half-layers). Cuts split the function
   into segments.
3. Segments get a structural key (op names, attributes except `layer`, types, operand
   wiring, weights by slot and type). The longest periodic run of keys (start, period P,
   R >= 2 repeats) is the layer stack: P = 2 segments for Llama, 12 for Gemma 3's five
   sliding layers and one global layer.
4. The run is checked exactly (same wiring, weights of equal types, `layer` attributes in
   arithmetic progression, shared values identical) and replaced by
   `scan(carried..., invariant..., stacked weights...) {body = @layer, length = R}`.
   Per-layer weights become `stack` weight definitions; a `layer` attribute becomes the
   first repeat's value plus a dynamic `base = i * stride` operand.

Layers outside the run (a remainder that is not a whole period) stay unrolled. Without
this pass (a pipeline choice) the layers stay unrolled everywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jaxrt.errors import SettingError
from jaxrt.ir.module import Function, Module, Op, Value, make_op
from jaxrt.ir.ops import constant, mul, scan, weight
from jaxrt.ir.ops.control import slice_type
from jaxrt.ir.types import DType, TensorType
from jaxrt.ir.weights import WeightDef, infer_def

from .dce import eliminate_dead_code
from .manager import Pass, PassContext, register_pass

I32_SCALAR = TensorType((), DType.int32)


@dataclass
class _Block:
    """One repeat: its state ops in order, live-in state values in slot order."""

    ops: list[Op]
    live_in: list[Value]


@dataclass
class _Wiring:
    """A repeat read structurally: its key plus what differs between repeats."""

    key: tuple
    weights: list[str]            # weight slot -> name
    invariants: list[Value]       # invariant slot -> the (free) value
    layers: list[int]             # `layer` attribute of each layer-indexed op, in order
    local: dict[Value, tuple]     # value -> its structural reference in this repeat


class _Analysis:
    def __init__(self, fn: Function, max_carried: int):
        self.fn = fn
        result_types = {v.type for v in fn.results}
        threaded = {a for a in fn.args if a.type in result_types}
        # Free: non-threaded arguments and leaves (weights, constants). Everything computed
        # is state, even from free values only: the embedding starts the residual stream.
        self.free: set[Value] = {a for a in fn.args if a not in threaded}
        self.index = {op: i for i, op in enumerate(fn.ops)}
        for op in fn.ops:
            if not op.operands:
                self.free.update(op.results)
        n = len(fn.ops)
        self.last_use: dict[Value, int] = {}
        for i, op in enumerate(fn.ops):
            for v in op.operands:
                self.last_use[v] = i
        for v in fn.results:
            self.last_use[v] = n
        self.defined_at: dict[Value, int] = {a: -1 for a in threaded}
        for i, op in enumerate(fn.ops):
            if op.results[0] not in self.free:
                for r in op.results:
                    self.defined_at[r] = i
        # live[p]: state values defined before op p and used at or after it
        delta = [0] * (n + 2)
        for v, d in self.defined_at.items():
            u = self.last_use.get(v, d)
            if u > d:
                delta[d + 1] += 1
                delta[u + 1] -= 1
        live, running = [], 0
        for p in range(n + 1):
            running += delta[p]
            live.append(running)
        self.segments: list[list[Op]] = []
        current: list[Op] = []
        for i, op in enumerate(fn.ops):
            if live[i] <= max_carried and current:
                self.segments.append(current)
                current = []
            if op.results and op.results[0] not in self.free:
                current.append(op)
        if current:
            self.segments.append(current)

    def live_at(self, op: Op) -> list[Value]:
        """State values live just before `op`, ordered by first use from there on."""
        p = self.index[op]
        live = [v for v, d in self.defined_at.items()
                if d < p and self.last_use.get(v, d) >= p]
        first_use = {}
        for i in range(p, len(self.fn.ops)):
            for v in self.fn.ops[i].operands:
                first_use.setdefault(v, i)
        return sorted(live, key=lambda v: first_use.get(v, len(self.fn.ops)))

    def wiring(self, block: _Block) -> _Wiring:
        local: dict[Value, tuple] = {v: ("carried", i) for i, v in enumerate(block.live_in)}
        weights: list[str] = []
        invariants: list[Value] = []
        layers: list[int] = []
        key = []
        for op in block.ops:
            refs = []
            for v in op.operands:
                if v in local:
                    refs.append(local[v])
                elif v.owner is not None and v.owner.opdef is weight:
                    name = v.owner.attrs.name
                    if name not in weights:
                        weights.append(name)
                    refs.append(("weight", weights.index(name), v.type))
                elif v.owner is not None and v.owner.opdef is constant:
                    refs.append(("constant", v.owner.attrs, v.type))
                elif v in self.free:
                    if v not in invariants:
                        invariants.append(v)
                    refs.append(("invariant", invariants.index(v)))
                else:
                    refs.append(("foreign",))  # state from outside: not a clean cut
            attrs = op.attrs
            if "layer" in op.opdef.attrs:
                layers.append(attrs.layer)
                attrs = attrs.replace(layer=0)
            key.append((op.opdef.name, tuple(refs), attrs, tuple(r.type for r in op.results)))
            for r in op.results:
                local[r] = ("local", len(local))
        return _Wiring(tuple(key), weights, invariants, layers, local)


def _segment_key(analysis: _Analysis, seg: list[Op]) -> tuple:
    return analysis.wiring(_Block(seg, analysis.live_at(seg[0]))).key


def _candidates(keys: list[tuple], sizes: list[int], min_repeats: int):
    """(covered ops, period, start, repeats), best first: most ops covered, then the
    shortest period."""
    n = len(keys)
    found = []
    for start in range(n):
        for period in range(1, (n - start) // min_repeats + 1):
            pattern = keys[start:start + period]
            reps = 1
            while (start + (reps + 1) * period <= n
                   and keys[start + reps * period:start + (reps + 1) * period] == pattern):
                reps += 1
            if reps >= min_repeats:
                found.append((reps * sum(sizes[start:start + period]), period, start, reps))
    found.sort(key=lambda c: (-c[0], c[1], c[2]))
    return found


def stacked_name(names: list[str], taken) -> str:
    """`model.layers.0:30.mlp.up_proj.weight` for names that differ in one integer field
    (`a:b:step` when the stride is not 1); otherwise `stack.<first name>`."""
    parts = [re.split(r"(\d+)", n) for n in names]
    base = None
    if len({len(p) for p in parts}) == 1:
        diff = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(diff) == 1 and all(p[diff[0]].isdigit() for p in parts):
            vals = [int(p[diff[0]]) for p in parts]
            step = vals[1] - vals[0]
            if step > 0 and all(b - a == step for a, b in zip(vals, vals[1:])):
                span = f"{vals[0]}:{vals[-1] + step}" + (f":{step}" if step != 1 else "")
                base = "".join(parts[0][:diff[0]] + [span] + parts[0][diff[0] + 1:])
    name = base or f"stack.{names[0]}"
    while name in taken:
        name += ".s"
    return name


def _unique_function_name(module: Module, base: str) -> str:
    name, i = base, 1
    while name in module.functions:
        name, i = f"{base}_{i}", i + 1
    return name


@register_pass
@dataclass(frozen=True)
class OutlineLayers(Pass):
    """Replace the longest run of repeated layers in @function by a scan over stacked
    weights (see the module docstring); a function without one is left alone."""

    name = "outline-layers"
    function: str = "step"
    max_carried: int = 2
    min_repeats: int = 2

    def __post_init__(self):
        if self.max_carried < 1 or self.min_repeats < 2:
            raise SettingError("outline-layers needs max-carried >= 1 and min-repeats >= 2")

    def run(self, module: Module, ctx: PassContext) -> None:
        fn = module.functions.get(self.function)
        if fn is None or any(op.opdef is scan for op in fn.ops):
            return
        analysis = _Analysis(fn, self.max_carried)
        segs = analysis.segments
        keys = [_segment_key(analysis, s) for s in segs]
        for covered, period, start, reps in _candidates(keys, [len(s) for s in segs],
                                                        self.min_repeats):
            blocks = [_Block([op for s in segs[start + j * period:start + (j + 1) * period]
                              for op in s], [])
                      for j in range(reps)]
            for b in blocks:
                b.live_in = analysis.live_at(b.ops[0])
            if self._outline(module, fn, analysis, blocks):
                ctx.count("layers-outlined", reps)
                ctx.count("ops-outlined", covered)
                ctx.count("period-segments", period)
                return

    def _outline(self, module: Module, fn: Function, analysis: _Analysis,
                 blocks: list[_Block]) -> bool:
        wirings = [analysis.wiring(b) for b in blocks]
        first = wirings[0]
        if any(w.key != first.key or w.invariants != first.invariants for w in wirings):
            return False
        if any(("foreign",) in refs for _, refs, _, _ in first.key):
            return False
        if len(blocks[0].live_in) > self.max_carried:
            return False
        # live-out of repeat j is live-in of repeat j + 1, wired the same way each time
        after_last = blocks[-1].ops[-1]
        nxt = analysis.index[after_last] + 1
        outs_last = (analysis.live_at(fn.ops[nxt]) if nxt < len(fn.ops)
                     else [v for v in fn.results if v not in analysis.free])
        out_refs = [wirings[0].local.get(v) for v in blocks[1].live_in]
        for j in range(1, len(blocks)):
            live_out = blocks[j + 1].live_in if j + 1 < len(blocks) else None
            if live_out is not None and [wirings[j].local.get(v) for v in live_out] != out_refs:
                return False
        if None in out_refs or len(out_refs) != len(blocks[0].live_in):
            return False
        last_local = {ref: v for v, ref in wirings[-1].local.items()}
        results_last = [last_local.get(ref) for ref in out_refs]
        if None in results_last or set(results_last) != set(outs_last):
            return False
        types = [v.type for v in blocks[0].live_in]
        if [v.type for v in results_last] != types:
            return False
        # layer attributes: layer_j = layer_0 + j * stride for every layer-indexed op
        stride = None
        if first.layers:
            stride = wirings[1].layers[0] - first.layers[0]
            for j, w in enumerate(wirings):
                if w.layers != [x + j * stride for x in first.layers]:
                    return False
            if any(len(op.operands) > op.opdef.num_operands[0] for op in blocks[0].ops
                   if "layer" in op.opdef.attrs and isinstance(op.opdef.num_operands, tuple)):
                return False  # already has a dynamic layer operand
        # weights: one name in every repeat -> invariant operand; else a stacked weight
        reps = len(blocks)
        names = [[w.weights[s] for w in wirings] for s in range(len(first.weights))]
        wtypes = [[module.weights[n] for n in ns] for ns in names]
        if any(len(set(ts)) != 1 for ts in wtypes):
            return False
        stacked_slots = [s for s, ns in enumerate(names) if len(set(ns)) > 1]
        shared_slots = [s for s, ns in enumerate(names) if len(set(ns)) == 1]
        self._rewrite(module, fn, blocks, first, names, stacked_slots, shared_slots, stride,
                      out_refs, results_last, reps)
        return True

    def _rewrite(self, module, fn, blocks, first: _Wiring, names, stacked_slots,
                 shared_slots, stride, out_refs, results_last, reps) -> None:
        # ---- the body function --------------------------------------------------------
        body_name = _unique_function_name(module, "layer")
        args: list[Value] = [Value(I32_SCALAR, None, 0, hint="i")]

        def new_arg(t: TensorType, hint: str) -> Value:
            hints = {a.hint for a in args}
            h, k = hint, 1
            while h in hints:
                h, k = f"{hint}{k}", k + 1
            v = Value(t, None, len(args), hint=h)
            args.append(v)
            return v

        carried = [new_arg(v.type, v.hint or f"c{i}") for i, v in enumerate(blocks[0].live_in)]
        weight_arg: dict[int, Value] = {}
        for s in shared_slots:
            weight_arg[s] = new_arg(module.weights[names[s][0]], f"w{s}")
        invariant_args = [new_arg(v.type, v.hint or f"inv{i}")
                          for i, v in enumerate(first.invariants)]
        for s in stacked_slots:
            weight_arg[s] = new_arg(module.weights[names[s][0]], f"w{s}")
        body_ops: list[Op] = []
        env: dict[tuple, Value] = {("carried", i): a for i, a in enumerate(carried)}
        constants: dict[tuple, Value] = {}
        base: list[Value] = []

        def layer_base() -> Value:
            if not base:
                i = args[0]
                if stride == 1:
                    base.append(i)
                else:
                    c = make_op(constant, [], {"value": float(stride)}, [I32_SCALAR])
                    m = make_op(mul, [i, c.result])
                    body_ops.extend([c, m])
                    base.append(m.result)
            return base[0]

        for op, (_, refs, _, _) in zip(blocks[0].ops, first.key):
            operands = []
            for ref in refs:
                if ref[0] == "weight":
                    operands.append(weight_arg[ref[1]])
                elif ref[0] == "invariant":
                    operands.append(invariant_args[ref[1]])
                elif ref[0] == "constant":
                    key = (ref[1], ref[2])
                    if key not in constants:
                        c = make_op(constant, [], ref[1], [ref[2]])
                        body_ops.append(c)
                        constants[key] = c.result
                    operands.append(constants[key])
                else:
                    operands.append(env[ref])
            if "layer" in op.opdef.attrs:
                operands.append(layer_base())
            new = make_op(op.opdef, operands, op.attrs,
                          None if op.opdef.infer is not None else [r.type for r in op.results])
            body_ops.append(new)
            for r, nr in zip(op.results, new.results):
                env[first.local[r]] = nr
        body = Function(body_name, args, body_ops, [env[ref] for ref in out_refs])
        # ---- stacked weights and the scan op in the caller ------------------------------
        new_ops: list[Op] = []

        def weight_value(name: str) -> Value:
            w = make_op(weight, [], {"name": name}, [module.weights[name]])
            new_ops.append(w)
            return w.result

        stacked_values = []
        for s in stacked_slots:
            name = stacked_name(names[s], module.weights)
            d = WeightDef("stack", tuple(names[s]), (("axis", 0),))
            module.weights[name] = infer_def(d, [module.weights[n] for n in names[s]])
            module.weight_defs[name] = d
            stacked_values.append(weight_value(name))
        invariant_values = [weight_value(names[s][0]) for s in shared_slots]
        invariant_values += list(first.invariants)
        loop = make_op(scan, [*blocks[0].live_in, *invariant_values, *stacked_values],
                       {"body": body_name, "length": reps, "carried": len(carried),
                        "invariant": len(invariant_values)})
        new_ops.append(loop)
        module.add_function(body)
        # ---- splice: drop the repeats' state ops, keep free ops, rewire the results -----
        removed = {op for b in blocks for op in b.ops}
        at = fn.ops.index(blocks[0].ops[0])
        kept = [op for op in fn.ops if op not in removed]
        before = [op for op in fn.ops[:at] if op not in removed]
        fn.set_ops(before + new_ops + kept[len(before):])
        for old, new in zip(results_last, loop.results):
            fn.replace_uses(old, new)
        fn.toposort()
        eliminate_dead_code(fn)


def outline_summary(module: Module) -> list[dict[str, Any]]:
    """The scans of each function: body, length and operand counts (for `inspect`)."""
    out = []
    for fn in module.functions.values():
        for op in fn.ops:
            if op.opdef is scan:
                out.append({"function": fn.name, "body": op.attrs.body,
                            "length": op.attrs.length, "carried": op.attrs.carried,
                            "invariant": op.attrs.invariant,
                            "stacked": len(op.operands) - op.attrs.carried
                            - op.attrs.invariant})
    return out
