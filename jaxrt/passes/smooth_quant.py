"""SmoothQuant's smoothing, the first half of quantize{mode=w8a8-smoothquant} (quantize.py).

Activation outliers sit in a few input channels; dividing those channels by s_j and
multiplying the weight's matching columns by s_j leaves x @ W^T unchanged and moves the
range from the activation (quantized per token at run time) to the weight (quantized per
output channel, where one column's range hurts less):

    y = (x / s) @ (W * s)^T,   s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)

The linears reading one input share one s (a fused qkv or gate-up is one such linear;
unfused q, k, v are three): its weight maximum is over all their rows. Everything is a
weight definition evaluated at load (jaxrt/ir/weights.py):

    weight @q.act_max : f32[in] = calibration() {file, tensor, shape, sha256}
    weight @q.smooth : f32[in] = smooth_factor(@q.act_max, @qkv) {alpha}
    weight @qkv.smoothed : f32[out, in] = scale_columns(@qkv, @q.smooth)

and the division by s goes where it costs nothing when it can:
- folded into the norm weight when the input is an `llm.rms_norm` (or the norm result of
  `llm.add_rms_norm`) read only by these linears: `smooth_norm(@g, @s) {offset}`,
  the standard SmoothQuant fold (attention and MLP inputs of Llama and Gemma);
- otherwise an explicit `mul(x, @s.inv)` with `@s.inv = reciprocal(@s) {dtype}` before
  the linears (o_proj after attention, down_proj after the gated activation).
"""
from __future__ import annotations

from jaxrt.calibration import Calibration
from jaxrt.errors import InputError
from jaxrt.ir import ops
from jaxrt.ir.module import Function, Module, Op, Value, make_op
from jaxrt.ir.weights import WeightDef, define_weight, row_parts


def check_calibration(module: Module, cal: Calibration) -> None:
    """Every calibrated weight is a [out, in] weight of the module with that `in`."""
    for name, (cols,) in cal.act_shapes.items():
        t = module.weights.get(name)
        if t is None:
            raise InputError(f"calibration {cal.file} does not match the model: it has no "
                             f"weight {name}")
        if t.rank != 2 or t.shape[1] != cols:
            raise InputError(f"calibration {cal.file} does not match the model: weight "
                             f"{name} is {t}, the calibration's input has {cols} channels")


def _calibrated_sources(module: Module, name: str, cal: Calibration) -> list[str]:
    """The calibrated weights `name` is made of: itself, or through row concatenations
    (fused projections) and casts."""
    return [n for n in row_parts(module, name, cal.act_shapes.__contains__)
            if n in cal.act_shapes]


class Smoother:
    """Smooths the linears of a module's functions, defining weights as it goes."""

    def __init__(self, module: Module, cal: Calibration, alpha: float):
        self.module, self.cal, self.alpha = module, cal, alpha
        self.act: dict[str, str] = {}  # calibrated weight -> its calibration() weight
        self.folded = self.scaled = 0

    def act_range(self, weights: list[str]) -> str:
        found = [s for w in weights for s in _calibrated_sources(self.module, w, self.cal)]
        for w in weights:
            if not _calibrated_sources(self.module, w, self.cal):
                raise InputError(f"calibration {self.cal.file} does not match the model: "
                                 f"no activation range for the input of weight {w}")
        src = found[0]  # one input: the calibration recorded the same range for each
        if src not in self.act:
            shape = self.cal.act_shapes[src]
            self.act[src] = define_weight(self.module, self.cal.tensor_name(src), WeightDef(
                "calibration", (), (("file", self.cal.file),
                                    ("tensor", self.cal.tensor_name(src)),
                                    ("shape", shape), ("sha256", self.cal.sha256))))
        return self.act[src]

    def run(self, fn: Function, linears: list[Op]) -> dict[Op, str]:
        """Smooth `linears` (llm.linear ops reading a module weight) of `fn`; returns
        linear -> the smoothed weight it must quantize."""
        groups: dict[Value, list[Op]] = {}
        for op in linears:
            groups.setdefault(op.operands[0], []).append(op)
        uses = fn.uses()
        before: dict[Op, list[Op]] = {}
        smoothed: dict[Op, str] = {}
        m = self.module
        for x, group in groups.items():
            names = list(dict.fromkeys(op.operands[1].owner.attrs.name for op in group))
            s = define_weight(m, f"{names[0]}.smooth", WeightDef(
                "smooth_factor", (self.act_range(names), *names), (("alpha", self.alpha),)))
            scaled = {n: define_weight(m, f"{n}.smoothed", WeightDef("scale_columns", (n, s)))
                      for n in names}
            for op in group:
                smoothed[op] = scaled[op.operands[1].owner.attrs.name]
            norm = x.owner
            widx = {ops.rms_norm: (0, 1), ops.add_rms_norm: (1, 2)}.get(
                norm.opdef if norm is not None else None)
            only_group = all(u in group for u, _ in uses.get(x, []))
            if widx is not None and x.index == widx[0] and only_group and \
                    norm.operands[widx[1]].owner.opdef is ops.weight:
                g = norm.operands[widx[1]].owner.attrs.name
                g2 = define_weight(m, f"{g}.smoothed", WeightDef(
                    "smooth_norm", (g, s), (("offset", float(norm.attrs.offset)),)))
                read = make_op(ops.weight, [], {"name": g2}, [m.weights[g2]])
                norm.operands = [*norm.operands[:widx[1]], read.result,
                                 *norm.operands[widx[1] + 1:]]
                before.setdefault(norm, []).append(read)
                self.folded += 1
            else:
                inv = define_weight(m, f"{s}.inv", WeightDef("reciprocal", (s,),
                                                       (("dtype", x.type.dtype),)))
                read = make_op(ops.weight, [], {"name": inv}, [m.weights[inv]])
                mul = make_op(ops.mul, [x, read.result])
                before.setdefault(group[0], []).extend([read, mul])
                for op in group:
                    op.operands = [mul.result, *op.operands[1:]]
                self.scaled += 1
        fn.set_ops([new for op in fn.ops for new in (*before.get(op, ()), op)])
        return smoothed
