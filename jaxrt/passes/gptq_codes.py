"""GPTQ's codes as weight definitions, for quantize{method=gptq} (quantize.py).

A calibration made with `jaxrt calibrate --gptq MODE` holds, per linear weight W of the
unfused module, `W.gptq_codes` and `W.gptq_scale` (jaxrt/calibration.py). A weight the
quantize pass meets is W itself, or made of such weights by row concatenations (fuse-qkv,
fuse-gate-up) and float casts (cast-float); its codes and scales are

    weight @W.i8.scale : f32[out, 1] = calibration() {file, tensor = "W.gptq_scale", ...}
    weight @W.i8 : i8[out, in] = calibration() {file, tensor = "W.gptq_codes", ..., dtype}

or, for a concatenation, the row concatenation of its parts' (each part's read as above).
Nothing is recomputed: the loaded codes are exactly the file's.
"""
from __future__ import annotations

from jaxrt.calibration import Calibration
from jaxrt.errors import InputError, SettingError
from jaxrt.ir.module import Module
from jaxrt.ir.weights import WeightDef, define_weight, row_parts

from .manager import PipelineError


class GPTQCodes:
    """Defines the GPTQ codes and scales of a module's weights from one calibration."""

    def __init__(self, module: Module, cal: Calibration, mode: str):
        from .quantize import MODES
        self.module, self.cal = module, cal
        self.dtype = MODES[mode][0]
        if cal.gptq_dtype is None:
            raise SettingError(f"quantize: method=gptq needs GPTQ codes, and calibration "
                               f"{cal.file} has none (calibrate with --gptq {mode})")
        if cal.gptq_dtype != self.dtype:
            raise SettingError(
                f"quantize: calibration {cal.file} holds {cal.gptq_dtype.value} GPTQ codes "
                f"(made for {cal.meta['gptq'].get('mode')}); mode {mode} needs "
                f"{self.dtype.value} codes (calibrate with --gptq {mode})")
        self.read: dict[str, tuple[str, str]] = {}  # calibrated weight -> (codes, scales)

    def parts(self, name: str) -> list[str]:
        """The calibrated weights `name` is made of: itself, or through row
        concatenations (fused projections) and float casts."""
        shapes = self.cal.gptq_shapes
        found = row_parts(self.module, name, shapes.__contains__)
        for part in found:
            if part not in shapes:
                raise InputError(f"calibration {self.cal.file} does not match the model: "
                                 f"no GPTQ codes for weight {part}")
            t = self.module.weights[part]
            if t.shape != shapes[part]:
                raise InputError(f"calibration {self.cal.file} does not match the model: "
                                 f"weight {part} is {t}, its GPTQ codes are "
                                 f"{list(shapes[part])}")
        return found

    def _tensor(self, name: str, weight: str, kind: str) -> str:
        shape = self.cal.gptq_shapes[weight]
        attrs = (("file", self.cal.file), ("tensor", f"{weight}.gptq_{kind}"),
                 ("shape", shape if kind == "codes" else (shape[0], 1)),
                 ("sha256", self.cal.sha256))
        if kind == "codes":
            attrs += (("dtype", self.dtype),)
        return define_weight(self.module, name, WeightDef("calibration", (), attrs))

    def define(self, wname: str) -> tuple[str, str]:
        """(codes, scales) weights for the weight `wname` reads, defined in the module."""
        t = self.module.weights[wname]
        if not t.dtype.is_float or t.dtype.itemsize == 1:
            raise PipelineError(f"quantize: weight {wname} is {t}, not a float weight")
        parts = self.parts(wname)
        if len(parts) == 1:
            return self._read(f"{wname}.{self.dtype.value}", parts[0])
        for p in parts:
            if p not in self.read:
                self.read[p] = self._read(f"{p}.{self.dtype.value}", p)
        codes, scales = zip(*(self.read[p] for p in parts))
        q = define_weight(self.module, f"{wname}.{self.dtype.value}",
                    WeightDef("concat", codes, (("axis", 0),)))
        return q, define_weight(self.module, q + ".scale", WeightDef("concat", scales,
                                                               (("axis", 0),)))

    def _read(self, qname: str, weight: str) -> tuple[str, str]:
        q = self._tensor(qname, weight, "codes")
        return q, self._tensor(q + ".scale", weight, "scale")
