"""Tensor types: dtypes and shapes with static or named symbolic dims.

No jax here: the IR is pure Python + numpy so it can be parsed, printed and
rewritten on any machine.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from jaxrt.errors import InputError

try:  # ml_dtypes ships with jaxlib; without it bf16/fp8 references fall back to f32.
    import ml_dtypes as _mld
except ImportError:  # pragma: no cover - jaxlib always brings it
    _mld = None


class DType(enum.Enum):
    """Element types. The value is the spelling used in the text format."""

    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"
    int8 = "i8"
    int32 = "i32"
    bool_ = "i1"
    f8e4m3 = "f8e4m3fn"
    f8e5m2 = "f8e5m2"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.bf16, DType.f16, DType.f8e4m3, DType.f8e5m2)

    @property
    def is_int(self) -> bool:
        return self in (DType.int8, DType.int32)

    def to_numpy(self) -> np.dtype:
        """The numpy dtype that holds values of this type (ml_dtypes for bf16/fp8)."""
        if self in _NUMPY:
            return np.dtype(_NUMPY[self])
        if _mld is None:
            return np.dtype(np.float32)
        return np.dtype({DType.bf16: _mld.bfloat16, DType.f8e4m3: _mld.float8_e4m3fn,
                         DType.f8e5m2: _mld.float8_e5m2}[self])

    @staticmethod
    def parse(text: str) -> "DType":
        try:
            return _BY_SPELLING[text]
        except KeyError:
            raise InputError(f"unknown dtype {text!r}") from None

    @staticmethod
    def from_numpy(dt) -> "DType":
        name = np.dtype(dt).name
        table = {"float32": DType.f32, "bfloat16": DType.bf16, "float16": DType.f16,
                 "int8": DType.int8, "int32": DType.int32, "bool": DType.bool_,
                 "float8_e4m3fn": DType.f8e4m3, "float8_e5m2": DType.f8e5m2}
        if name not in table:
            raise InputError(f"no IR dtype for numpy dtype {name}")
        return table[name]

    def __repr__(self) -> str:
        return f"DType.{self.name}"


_ITEMSIZE = {DType.f32: 4, DType.bf16: 2, DType.f16: 2, DType.int8: 1, DType.int32: 4,
             DType.bool_: 1, DType.f8e4m3: 1, DType.f8e5m2: 1}
_NUMPY = {DType.f32: np.float32, DType.f16: np.float16, DType.int8: np.int8,
          DType.int32: np.int32, DType.bool_: np.bool_}
_BY_SPELLING = {d.value: d for d in DType}

Dim = int | str  # a static size, or the name of a symbolic dim ("batch", "tokens")


@dataclass(frozen=True, slots=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self):
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                raise TypeError(f"bad dim {d!r} in shape {self.shape}")
            if isinstance(d, int) and d < 0:
                raise InputError(f"negative dim {d} in shape {self.shape}")
            if isinstance(d, str) and not d.isidentifier():
                raise InputError(f"symbolic dim {d!r} is not an identifier")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def num_elements(self, bindings: dict[str, int] | None = None) -> int:
        """Element count; symbolic dims are looked up in `bindings` (KeyError if absent)."""
        n = 1
        for d in self.shape:
            n *= d if isinstance(d, int) else (bindings or {})[d]
        return n

    def nbytes(self, bindings: dict[str, int] | None = None) -> int:
        return self.num_elements(bindings) * self.dtype.itemsize

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(str(d) for d in self.shape)}]"


def substitute_dims(t: TensorType, bindings: dict[str, int]) -> TensorType:
    return TensorType(tuple(bindings.get(d, d) if isinstance(d, str) else d for d in t.shape),
                      t.dtype)


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting extended to symbolic dims (a named dim only matches itself or 1)."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif dim != d:
                raise InputError(f"shapes {list(shapes)} do not broadcast")
        out.append(dim)
    return tuple(out)
