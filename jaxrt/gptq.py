"""GPTQ (Frantar et al. 2022): weight codes chosen so the layer's output stays close to
float on calibration inputs, not each weight on its own (numpy, no jax).

For a linear y = x W^T whose inputs X [n, in] have H = X^T X / n, the output error of
codes Q is ||X W^T - X Q^T||_F^2 = n tr((W - Q) H (W - Q)^T). GPTQ quantizes W one
input column at a time and pushes each column's rounding error onto the columns not yet
quantized, where H says it can be compensated (the optimal update of OBQ):

    e = (w_j - q_j) / [U]_jj,    W[:, j+1:] -= e [U]_j,j+1:

with U the upper Cholesky factor of H^-1 (H^-1 = U^T U; row j of U is H^-1's row j once
the columns before j are fixed). As the reference implementation:
- act order: columns by decreasing diag(H), the inputs with the most energy first, while
  many columns remain to absorb their error;
- dead columns (diag 0: an input that was always 0) are zeroed, with H_jj = 1;
- damping: damp * mean(diag(H)) on the diagonal (H is singular when the calibration has
  fewer tokens than inputs: 512 tokens for SmolLM2's 1,536-wide down_proj input);
- lazy batches: within a block of `block` columns the updates go column by column, to the
  columns after it once per block (one matmul instead of `block` rank-1 updates).

Scales are fixed first, per output channel, exactly as the RTN path computes them
(`compute_scale` of the float weight), and every code is `quantize(v, scale)` of some
value v: a code RTN could produce, which dequantizes and re-quantizes to itself.

`jaxrt calibrate --gptq MODE` (jaxrt/calibration.py) accumulates the Hessians in its
interpreter pass and calls `gptq_calibration` on each group of linears reading one input.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import InputError, SettingError
from .ir.quant import compute_scale, dequantize, quantize
from .ir.types import DType

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def gptq_modes() -> tuple[str, ...]:
    """The quantize modes GPTQ calibrates for: all but the smoothed one."""
    from .passes.quantize import CALIBRATED_MODES, MODES
    return tuple(m for m in MODES if m not in CALIBRATED_MODES)


def check_gptq_options(mode: str | None, damp: float, block: int) -> None:
    from .passes.quantize import CALIBRATED_MODES
    if mode is None:
        return
    if mode in CALIBRATED_MODES:
        raise SettingError(f"--gptq {mode}: SmoothQuant's smoothing changes the weights "
                           f"GPTQ would quantize; give --gptq {', '.join(gptq_modes())}")
    if mode not in gptq_modes():
        raise SettingError(f"--gptq must be one of {', '.join(gptq_modes())}, got {mode!r}")
    if not 0.0 < damp <= 1.0:
        raise SettingError(f"--gptq-damp must be in (0, 1], got {damp}")
    if block < 1:
        raise SettingError(f"--gptq-block must be >= 1, got {block}")


class Hessians:
    """H = X^T X / n (float64) per input, accumulated over the batches `add` sees."""

    def __init__(self):
        self.sums: dict[object, np.ndarray] = {}
        self.counts: dict[object, int] = {}

    def add(self, key, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])  # [tokens, in]
        if key in self.sums:
            self.sums[key] += x.T @ x
            self.counts[key] += len(x)
        else:
            self.sums[key], self.counts[key] = x.T @ x, len(x)

    def get(self, key) -> np.ndarray:
        return self.sums[key] / max(self.counts[key], 1)


def gptq_quantize(w: np.ndarray, h: np.ndarray, dtype: DType, *, damp: float = DEFAULT_DAMP,
                  block: int = DEFAULT_BLOCK, act_order: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(codes [out, in] in `dtype`, f32 scale [out, 1]) of weight w [out, in] for inputs of
    Hessian h [in, in] (module docstring)."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    if np.shape(h) != (cols, cols):
        raise ValueError(f"gptq: H is {np.shape(h)}, the weight has {cols} inputs")
    scale = compute_scale(w, dtype, (rows, 1))  # [out, 1], as RTN's
    h = np.array(h, np.float64)
    diag = np.diag(h).copy()
    dead = diag == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    # Transposed, [in, out]: a column of W is a contiguous row here
    wt = np.asarray(w, np.float64).T[order].copy()  # [in, out]
    wt[dead[order]] = 0.0
    try:
        u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T  # upper, [in, in]
    except np.linalg.LinAlgError:
        raise InputError(f"gptq: the inputs' Hessian is not positive definite at damping "
                         f"{damp}; give a larger damping (--gptq-damp)") from None
    if not np.all(np.isfinite(u)):
        raise InputError(f"gptq: the inputs' Hessian is not finite (an activation "
                         f"overflowed?); damping {damp}")
    codes = np.empty((cols, rows), dtype.to_numpy())  # [in, out]
    row_scale = scale.reshape(1, rows)  # one column of W, as a [1, out] row
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = np.empty((i2 - i1, rows))  # [block, out]
        for j in range(i1, i2):
            q = quantize(wt[j][None], row_scale, dtype)  # [1, out]
            codes[j] = q[0]
            e = (wt[j] - dequantize(q, row_scale)[0]) / u[j, j]
            wt[j + 1:i2] -= np.outer(u[j, j + 1:i2], e)
            err[j - i1] = e
        wt[i2:] -= u[i1:i2, i2:].T @ err
    return np.ascontiguousarray(codes[np.argsort(order)].T), scale


def output_error(x: np.ndarray, w: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> float:
    """||X W^T - X Q^T||_F in float64, Q = the dequantized codes."""
    x = np.asarray(x, np.float64)
    diff = np.asarray(w, np.float64) - dequantize(codes, scale).astype(np.float64)
    return float(np.linalg.norm(x @ diff.T))


def gptq_calibration(weights, groups: list[list[str]], hessians: Hessians, mode: str,
                     damp: float, block: int, tensors: dict[str, np.ndarray]) -> dict:
    """GPTQ codes and scales of every group's weights (concatenated along their output
    rows: one H per input) into `tensors`; returns the JSON metadata entry."""
    from .passes.quantize import MODES
    dtype = MODES[mode][0]
    start = time.perf_counter()
    done: set[str] = set()
    for group in groups:
        names = list(dict.fromkeys(group))
        if done & set(names):
            raise InputError(f"calibrate --gptq: weight {sorted(done & set(names))[0]} "
                             f"is read by linears of different inputs; GPTQ needs one")
        done.update(names)
        ws = [np.asarray(weights[n], np.float32) for n in names]
        codes, scale = gptq_quantize(np.concatenate(ws), hessians.get(group[0]), dtype,
                                     damp=damp, block=block)
        row = 0
        for n, w in zip(names, ws):
            c = codes[row:row + len(w)]
            tensors[f"{n}.gptq_codes"] = c if dtype == DType.int8 else c.view(np.uint8)
            tensors[f"{n}.gptq_scale"] = scale[row:row + len(w)]
            row += len(w)
    return {"mode": mode, "dtype": dtype.value, "damp": damp, "block": block,
            "act_order": True, "seconds": round(time.perf_counter() - start, 2)}
