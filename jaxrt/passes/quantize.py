"""quantize: store linear-projection weights as int8 / fp8 e4m3fn codes with f32 scales.

    quantize{mode=int8-weight granularity=channel exclude="down_proj"}

Every `llm.linear` whose weight operand is a module weight (its name not matching
`exclude`, a name pattern: `re.search` syntax matched in linear time,
jaxrt/passes/name_pattern.py) becomes `quant.linear(x, @w.<dtype>,
@w.<dtype>.scale, bias?)`, where the codes and scales are weight definitions

    weight @w.i8.scale : f32[out, 1] = quant_scale(@w) {dtype = i8, granularity = "channel"}
    weight @w.i8 : i8[out, in] = quantize(@w, @w.i8.scale) {dtype = i8}

evaluated once at load (and stored as such in engine directories). A fused projection
(a weight defined as the concat of q/k/v or gate/up) is one weight here, so it is
quantized as one: per-tensor granularity gives the fused weight a single scale.

Modes: `int8-weight` and `fp8-weight` quantize weights only (activations stay in the
compute dtype); `w8a8` (int8) and `fp8` also quantize activations, per token at run
time (dynamic: no calibration). `w8a8-smoothquant` is `w8a8` after SmoothQuant's
smoothing (jaxrt/passes/smooth_quant.py): the activations' per-channel ranges from a
calibration (`jaxrt calibrate`, named by `calib=DIR`) give factors s (at `alpha`) that
divide the activation (folded into the preceding norm's weight, or an explicit scale)
and multiply the weight's columns before its int8 codes are taken; activations are then
quantized per token at run time, as in w8a8 (no static activation scales). Without
`calib` it is refused.

`method=gptq` (modes int8-weight, fp8-weight, w8a8, fp8; granularity=channel) takes the
codes and scales GPTQ chose at calibration (`jaxrt calibrate --gptq MODE`, jaxrt/gptq.py)
instead of rounding to nearest (`method=rtn`): `calib=DIR` names a calibration holding
codes of the mode's dtype, read as weight definitions

    weight @w.i8.scale : f32[out, 1] = calibration() {file, tensor = "w.gptq_scale", ...}
    weight @w.i8 : i8[out, in] = calibration() {file, tensor = "w.gptq_codes", ..., dtype}

and a fused projection concatenates its parts' codes and scales along the output rows
(per-channel scales are per row, so that is what RTN gives the fused weight too). A cast
weight (cast-float) takes the codes of its f32 source: GPTQ quantized the f32 weights.

Not quantized: the embedding table and the LM head (`llm.embedding`, `llm.logits`).
An embedding lookup reads one row per token (quantizing it saves memory, not time), and
the small models here tie the head to that table (SmolLM2, Gemma 3): a quantized head
would be a second copy. Errors in the head also reach the logits undamped by any later
layer. Only `llm.linear` ops are candidates, so these need no `exclude`.

Order: after cast-float (scales stay f32; cast-float refuses a quantized module) and
before outline-layers (which stacks the codes and scales like any weight; this pass
refuses a module whose layers are already outlined).
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxrt.calibration import read_calibration
from jaxrt.errors import SettingError
from jaxrt.ir import ops
from jaxrt.ir.module import Module, Op, make_op
from jaxrt.ir.quant import GRANULARITIES, group_count
from jaxrt.ir.types import DType
from jaxrt.ir.weights import WeightDef, infer_def, prune_weights

from .gptq_codes import GPTQCodes
from .manager import Pass, PassContext, PipelineError, register_pass
from .name_pattern import compile_name_pattern
from .smooth_quant import Smoother, check_calibration

# mode -> (code dtype, activation quantization of quant.linear)
MODES = {"int8-weight": (DType.int8, "none"), "fp8-weight": (DType.f8e4m3, "none"),
         "w8a8": (DType.int8, "token"), "fp8": (DType.f8e4m3, "token"),
         "w8a8-smoothquant": (DType.int8, "token")}
CALIBRATED_MODES = ("w8a8-smoothquant",)
METHODS = ("rtn", "gptq")  # round to nearest; GPTQ's codes from a calibration
QUANT_OPS = (ops.quantize, ops.dequantize, ops.quantized_linear)


def is_quantized(module: Module) -> bool:
    return "quantization" in module.attributes or any(
        op.opdef in QUANT_OPS for fn in module.functions.values() for op in fn.ops)


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    mode: str = "int8-weight"
    granularity: str = "channel"
    group_size: int = 128  # input elements per scale (granularity=group)
    exclude: str = ""  # name pattern (a linear-time regex) of weights left in float
    calib: str = ""  # calibration directory (jaxrt calibrate): w8a8-smoothquant, gptq
    alpha: float = 0.5  # SmoothQuant's migration strength: s = max|X|^a / max|W|^(1-a)
    method: str = "rtn"  # rtn: round to nearest; gptq: the calibration's GPTQ codes

    def __post_init__(self):
        if self.method not in METHODS:
            raise SettingError(f"quantize: method must be one of {', '.join(METHODS)}, got "
                               f"{self.method!r}")
        if self.method == "gptq":
            self._check_gptq()
        if self.mode in CALIBRATED_MODES and not self.calib:
            raise SettingError(f"quantize: mode {self.mode} needs a calibration: run "
                               f"`jaxrt calibrate MODEL -o DIR` and give calib=DIR (--calib)")
        if self.calib and self.mode not in CALIBRATED_MODES and self.method != "gptq":
            raise SettingError(f"quantize: calib is for mode "
                               f"{'/'.join(CALIBRATED_MODES)} or method=gptq, not "
                               f"{self.mode}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SettingError(f"quantize: alpha must be in [0, 1], got {self.alpha}")
        if self.mode not in MODES:
            raise SettingError(f"quantize: mode must be one of {', '.join(MODES)}, got "
                               f"{self.mode!r}")
        if self.granularity not in GRANULARITIES:
            raise SettingError(f"quantize: granularity must be one of "
                               f"{', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.group_size < 1:
            raise SettingError(f"quantize: group-size must be >= 1, got {self.group_size}")
        try:  # linear-time matching: a pipeline's pattern cannot hang the compiler
            compile_name_pattern(self.exclude)
        except SettingError as e:
            raise SettingError(f"quantize: exclude is not a regular expression jaxrt "
                               f"accepts: {e}") from None

    def _check_gptq(self) -> None:
        if self.mode in CALIBRATED_MODES:
            raise SettingError(f"quantize: method=gptq does not combine with {self.mode} "
                               f"(smoothing changes the weights GPTQ quantized); use w8a8")
        if not self.calib:
            raise SettingError("quantize: method=gptq needs calib=DIR, a calibration with "
                               "GPTQ codes (`jaxrt calibrate MODEL --gptq MODE -o DIR`)")
        if self.granularity != "channel":
            raise SettingError(f"quantize: method=gptq has per-channel scales; "
                               f"granularity={self.granularity} is not available with it")

    def run(self, module: Module, ctx: PassContext) -> None:
        if is_quantized(module):
            done = module.attributes.get("quantization", {}).get("mode", "quant.* ops")
            raise PipelineError(f"quantize: the module is already quantized ({done}); "
                                f"quantizing codes again would scale them twice")
        if any(op.opdef is ops.scan for fn in module.functions.values() for op in fn.ops):
            raise PipelineError("quantize: the layers are already outlined (a scan); run "
                                "quantize before outline-layers")
        dtype, act = MODES[self.mode]
        exclude = compile_name_pattern(self.exclude) if self.exclude else None
        made: dict[str, tuple[str, str]] = {}  # float weight -> (codes, scales)
        excluded: set[str] = set()
        smoother = gptq = None
        if self.mode in CALIBRATED_MODES:
            cal = read_calibration(self.calib)
            check_calibration(module, cal)
            smoother = Smoother(module, cal, self.alpha)
        elif self.method == "gptq":
            gptq = GPTQCodes(module, read_calibration(self.calib), self.mode)

        def candidate(op: Op) -> bool:
            src = op.operands[1].owner if op.opdef is ops.linear else None
            if src is None or src.opdef is not ops.weight:
                return False
            if exclude is not None and exclude.search(src.attrs.name):
                excluded.add(src.attrs.name)
                return False
            return True

        for fn in module.functions.values():
            linears = [op for op in fn.ops if candidate(op)]
            smoothed = smoother.run(fn, linears) if smoother and linears else {}
            chosen = set(linears)
            new_ops: list[Op] = []
            for op in fn.ops:
                if op not in chosen:
                    new_ops.append(op)
                    continue
                wname = smoothed.get(op) or op.operands[1].owner.attrs.name
                if wname not in made:
                    made[wname] = gptq.define(wname) if gptq else \
                        self._define(module, wname, dtype)
                qname, sname = made[wname]
                wq = make_op(ops.weight, [], {"name": qname}, [module.weights[qname]])
                ws = make_op(ops.weight, [], {"name": sname}, [module.weights[sname]])
                new = make_op(ops.quantized_linear,
                              [op.operands[0], wq.result, ws.result, *op.operands[2:]],
                              {"act": act})
                new_ops += [wq, ws, new]
                fn.replace_uses(op.result, new.result)
            fn.set_ops(_drop_dead_weight_reads(fn, new_ops))
        if not made:
            why = f" (exclude={self.exclude!r} matched all {len(excluded)})" if excluded else ""
            raise PipelineError(f"quantize: no llm.linear reads a weight to quantize{why}")
        prune_weights(module)
        module.attributes["quantization"] = {
            "mode": self.mode, "method": self.method, "granularity": self.granularity,
            "group_size": self.group_size if self.granularity == "group" else 0,
            "weights": len(made), "excluded": sorted(excluded)}
        if smoother is not None:
            module.attributes["quantization"].update(
                alpha=self.alpha, folded_inputs=smoother.folded,
                scaled_inputs=smoother.scaled)
            ctx.count("smoothing_folded_into_norms", smoother.folded)
            ctx.count("smoothing_scale_ops", smoother.scaled)
        ctx.count("quantized_weights", len(made))
        ctx.count("excluded_weights", len(excluded))

    def _define(self, module: Module, wname: str, dtype: DType) -> tuple[str, str]:
        """Declare `wname`'s scales and codes as weight definitions; returns their names."""
        t = module.weights[wname]
        if not t.dtype.is_float or t.dtype.itemsize == 1:
            raise PipelineError(f"quantize: weight {wname} is {t}, not a float weight")
        if self.granularity == "group":
            try:
                group_count("group", *t.shape, self.group_size)
            except ValueError as e:
                raise SettingError(f"quantize: weight {wname} {t}: {e}") from None
        qname = _fresh(module, f"{wname}.{dtype.value}")
        sname = _fresh(module, qname + ".scale")
        attrs = (("dtype", dtype), ("granularity", self.granularity))
        if self.granularity == "group":
            attrs += (("group_size", self.group_size),)
        for name, d in ((sname, WeightDef("quant_scale", (wname,), attrs)),
                        (qname, WeightDef("quantize", (wname, sname), (("dtype", dtype),)))):
            module.weights[name] = infer_def(d, [module.weights[s] for s in d.sources])
            module.weight_defs[name] = d
        return qname, sname


def _fresh(module: Module, name: str) -> str:
    while name in module.weights:
        name += "_"
    return name


def _drop_dead_weight_reads(fn, new_ops: list[Op]) -> list[Op]:
    """The float weights' reads that only the replaced linears used."""
    used = {v for op in new_ops for v in op.operands} | set(fn.results)
    return [op for op in new_ops if op.opdef is not ops.weight or op.result in used]
