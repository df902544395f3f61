"""Weight definitions: text round trip, verification, evaluation once at load, strict
dtypes, pruning of weights nothing uses."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.ir import Builder, DType, Module, TensorType, VerifyError, verify
from jaxrt.ir.parser import ParseError, parse
from jaxrt.ir.weights import (WeightDef, materialize, prune_weights, resident_weights,
                              source_weights, used_weights)

F32, BF16 = DType.f32, DType.bf16


def module_with(defs: list[tuple[str, WeightDef]], sources: dict[str, tuple],
                read: list[str]) -> Module:
    m = Module("m")
    b = Builder.new_function(m, "f", [])
    for name, shape in sources.items():
        m.weights[name] = TensorType(shape, F32)
    for name, d in defs:
        b.define_weight(name, d)
    b.ret(*[b.weight(n) for n in read])
    return m


def stack(*names, axis=0):
    return WeightDef("stack", names, (("axis", axis),))


def cast(name, dtype=BF16):
    return WeightDef("cast", (name,), (("dtype", dtype),))


EXAMPLE = [
    ("s", stack("a", "b")),                                        # f32[2, 3, 4]
    ("c", WeightDef("concat", ("a", "b"), (("axis", 1),))),        # f32[3, 8]
    ("t", WeightDef("transpose", ("c",), (("perm", (1, 0)),))),    # f32[8, 3]
    ("sl", WeightDef("slice", ("t",), (("axis", 0), ("start", 2), ("stop", 5)))),
    ("s.bf16", cast("s")),
]


def example() -> Module:
    return module_with(EXAMPLE, {"a": (3, 4), "b": (3, 4), "unused": (2,)},
                       ["s.bf16", "sl"])


def data():
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((3, 4)).astype(np.float32) for n in ("a", "b")} | {
        "unused": np.zeros(2, np.float32)}


def test_definitions_print_parse_and_verify():
    m = example()
    verify(m)
    text = str(m)
    assert 'weight @s : f32[2, 3, 4] = stack(@a, @b) {axis = 0}' in text
    assert 'weight @s.bf16 : bf16[2, 3, 4] = cast(@s) {dtype = bf16}' in text
    back = parse(text)
    assert back == m and str(back) == text
    verify(back)


def test_materialize_computes_each_definition():
    m, d = example(), data()
    got = materialize(m, d)
    assert list(got) == ["sl", "s.bf16"]  # what the functions read, declaration order
    np.testing.assert_array_equal(got["s.bf16"],
                                  np.stack([d["a"], d["b"]]).astype(BF16.to_numpy()))
    assert got["s.bf16"].dtype == BF16.to_numpy()
    np.testing.assert_array_equal(got["sl"], np.concatenate([d["a"], d["b"]], 1).T[2:5])


def test_materialize_reads_each_needed_source_once_and_nothing_else():
    reads = []

    class Lazy(dict):
        def __getitem__(self, k):
            reads.append(k)
            return super().__getitem__(k)

    m = example()
    materialize(m, Lazy(data()))
    assert sorted(reads) == ["a", "b"]  # "unused" is never read; a and b once each


def test_source_data_must_have_the_declared_type():
    m, d = example(), data()
    d["a"] = d["a"].astype(np.float64)
    with pytest.raises(ValueError, match="weight a: data is float64.*declares f32"):
        materialize(m, d)
    d = data()
    d["b"] = d["b"][:, :3]
    with pytest.raises(ValueError, match=r"weight b: data is float32\[3, 3\]"):
        materialize(m, d)
    with pytest.raises(ValueError, match="missing"):
        materialize(m, {"a": data()["a"]})


def test_used_resident_source_and_prune():
    m = example()
    assert resident_weights(m) == ["sl", "s.bf16"]  # declaration order
    assert source_weights(m) == ["a", "b"]
    assert set(used_weights(m)) == {"a", "b", "s", "c", "t", "sl", "s.bf16"}
    assert prune_weights(m) == ["unused"]
    verify(m)
    assert "unused" not in m.weights


@pytest.mark.parametrize("defn, declared, message", [
    (stack("a", "x"), (2, 3, 4), "unknown source weight @x"),
    (stack("a", "odd"), (2, 3, 4), "sources differ in type"),
    (stack("a", "b"), (3, 2, 4), "declared f32\\[3, 2, 4\\] but stack gives"),
    (stack("a", "b", axis=5), (2, 3, 4), "axis 5 out of range"),
    (WeightDef("concat", ("a", "odd"), (("axis", 0),)), (6, 4), "does not concatenate"),
    (WeightDef("slice", ("a",), (("axis", 0), ("start", 2), ("stop", 9))), (7, 4),
     "out of range"),
    (WeightDef("transpose", ("a",), (("perm", (0, 0)),)), (3, 3), "not a permutation"),
    (cast("a", DType.parse("i8")), (3, 4), "not a float cast"),
    (cast("a", DType.parse("f8e4m3fn")), (3, 4), "needs scales"),
    (WeightDef("smooth", ("a",)), (3, 4), "unknown weight definition 'smooth'"),
    (WeightDef("quantize", ("a",)), (3, 4), r"quantize: takes 2 source\(s\), got 1"),
    (WeightDef("transpose", ("a", "b"), (("perm", (1, 0)),)), (4, 3), "takes 1 source"),
])
def test_verifier_rejects_bad_definitions(defn, declared, message):
    m = Module("m")
    m.weights.update(a=TensorType((3, 4), F32), b=TensorType((3, 4), F32),
                     odd=TensorType((3, 5), F32))
    dtype = defn.attr("dtype") if defn.op == "cast" else F32
    m.weights["w"] = TensorType(declared, dtype if isinstance(dtype, DType) else F32)
    m.weight_defs["w"] = defn
    with pytest.raises(VerifyError, match=message):
        verify(m)


def test_a_source_must_be_declared_first():
    m = Module("m")
    m.weights["w"] = TensorType((1, 3), F32)
    m.weights["a"] = TensorType((3,), F32)
    m.weight_defs["w"] = stack("a")
    with pytest.raises(VerifyError, match="must be declared before"):
        verify(m)


@pytest.mark.parametrize("text, message", [
    ("weight @w : f32[2, 3] = stack(@a, @a) {axis = 0}", "unknown source weight @a"),
    ("weight @a : f32[3]\n weight @w : f32[3, 3] = stack(@a, @a) {axis = 0}",
     "declared f32\\[3, 3\\] but stack gives f32\\[2, 3\\]"),
    ("weight @a : f32[3]\n weight @w : bf16[3] = frobnicate(@a)", "unknown weight definition"),
    ("weight @a : f32[3]\n weight @w : f32[3] = cast(@a", "expected"),
])
def test_parser_reports_bad_definitions_with_a_location(text, message):
    with pytest.raises(ParseError, match=message) as e:
        parse("module @m {\n " + text + "\n}\n")
    assert e.value.line >= 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["stack", "concat0", "concat1", "transpose", "slice",
                                 "cast"]), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_random_definition_chains_round_trip_and_evaluate(chain, seed):
    """A chain of definitions over two sources prints, parses back to the same module,
    and evaluates to the numpy composition of the same steps."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    m = Module("m")
    m.weights["a"] = TensorType((2, 3), F32)
    b = Builder.new_function(m, "f", [])
    cur, arr, i = "a", a, 0
    for step in chain:
        name = f"w{i}"
        i += 1
        t = m.weights[cur]
        if step == "stack":
            d, arr = stack(cur, cur), np.stack([arr, arr])
        elif step.startswith("concat"):
            axis = min(int(step[-1]), t.rank - 1)
            d, arr = (WeightDef("concat", (cur, cur), (("axis", axis),)),
                      np.concatenate([arr, arr], axis))
        elif step == "transpose":
            perm = tuple(reversed(range(t.rank)))
            d, arr = WeightDef("transpose", (cur,), (("perm", perm),)), arr.transpose(perm)
        elif step == "slice":
            d, arr = (WeightDef("slice", (cur,), (("axis", 0), ("start", 0), ("stop", 1))),
                      arr[:1])
        else:
            dt = BF16 if t.dtype == F32 else F32
            d, arr = cast(cur, dt), arr.astype(dt.to_numpy())
        b.define_weight(name, d)
        cur = name
    b.ret(b.weight(cur))
    verify(m)
    back = parse(str(m))
    assert back == m
    got = materialize(back, {"a": a})[cur]
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)
