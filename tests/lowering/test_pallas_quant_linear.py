"""The Pallas (Mosaic GPU) weight-only quantized linear and its `quant.linear` rule, on a
CPU: the kernel in Pallas's GPU interpret mode (its TMA copies, barriers, ring, row tiles
and K splits run as written; only the matmul is a jnp dot there, as the interpreter's
wgmma takes no register or transposed operand, so the register layouts, the int8/e4m3
conversion on the GPU and wgmma itself are not run), the rule against the XLA rule, and
the kernel cross-lowered for CUDA (Mosaic GPU's layouts, wgmma operand and TMA checks run
at lowering, without a GPU). Speed and the real wgmma path are checked on a GPU by
bench/bench_int8_matmul.py.

Tolerances:
- kernel vs the f32 reference, 1e-5 x max|reference|: x (bf16/f16) and the codes (int8,
  e4m3) are exact in x's dtype and each product of two of them is exact in f32 (at most
  8 + 11 significant bits), so the two differ only in f32 summation order (a few ulps of
  2^-24 relative to the terms' scale). A bf16-sized tolerance would hide a dropped K step.
- rule vs XLA rule, 1e-2 x max|reference| (as every bf16 case in test_xla_rules.py): both
  sum the same exact products in f32 and round once to bf16, so results may differ by one
  bf16 rounding step (2^-8 relative) where the f32 sums straddle a rounding boundary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrt.errors import SettingError
from jaxrt.ir import Builder, DType, Module, TensorType, ops
from jaxrt.lowering import pallas
from jaxrt.lowering.compile import lower_function
from jaxrt.lowering.pallas import quant_linear_mgpu as qmgpu

pytestmark = pytest.mark.xdist_group("pallas")

BF16, F16, I8, E4M3 = jnp.bfloat16, jnp.float16, jnp.int8, jnp.float8_e4m3fn
MOSAIC = "stablehlo.custom_call @mosaic_gpu"


def _codes(rng, n, k, dtype):
    if jnp.dtype(dtype) == jnp.int8:
        return rng.integers(-127, 128, (n, k)).astype(np.int8)
    return (rng.standard_normal((n, k)) * 40).clip(-448, 448).astype(jnp.dtype(dtype))


def _inputs(t, n, k, x_dtype, code_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, k)), x_dtype)
    scale = jnp.asarray(rng.uniform(1e-3, 2e-3, (n, 1)), jnp.float32)
    return x, jnp.asarray(_codes(rng, n, k, code_dtype)), scale


@pytest.mark.parametrize("t, n, k, x_dtype, code_dtype, config, want", [
    # two compute warpgroups (128 rows), one split of 2 steps through a 2-slot ring
    (1, 128, 512, BF16, I8, qmgpu.Config(stages=2, splits=1), (8, 128, 256, 2, 1, 2)),
    # one warpgroup, 2 splits of 3 steps: the ring of 2 wraps
    (3, 64, 768, BF16, I8, qmgpu.Config(tile_n=64, tile_k=128, stages=2, splits=2),
     (8, 64, 128, 2, 2, 3)),
    # 5 steps in splits of 3: the last split is short (2 steps)
    (16, 128, 640, F16, I8, qmgpu.Config(tile_k=128, stages=2, splits=2),
     (16, 128, 128, 2, 2, 3)),
    # 64 tokens (the domain's edge), e4m3 codes converted through f16, 3 splits
    (64, 64, 384, BF16, E4M3, qmgpu.Config(tile_n=64, tile_k=128, stages=2, splits=3),
     (64, 64, 128, 1, 3, 1)),
    # e4m3 into f16, 37 tokens padded to 40, splits from the cost model (sms=2)
    (37, 128, 512, F16, E4M3, qmgpu.Config(tile_k=128, stages=3, sms=2), None),
], ids=["bf16-i8-t1", "bf16-i8-t3-ring-wraps", "f16-i8-t16-short-split",
        "bf16-e4m3-t64", "f16-e4m3-t37-auto"])
def test_kernel_matches_reference_interpreter(t, n, k, x_dtype, code_dtype, config, want):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    x, codes, scale = _inputs(t, n, k, x_dtype, code_dtype)
    p = qmgpu.plan(t, n, k, config)
    if want is not None:
        assert (p.t_pad, p.tile_n, p.tile_k, p.stages, p.splits, p.per) == want
    got = np.asarray(qmgpu.weight_only_linear(x, codes, scale, config=config,
                                              interpret=InterpretGPUParams()))
    ref = np.asarray(qmgpu.reference(x, codes, scale))
    assert got.shape == (t, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _linear_module(t_shape, n, k, x_dtype=DType.bf16, code_dtype=DType.int8, groups=1,
                   act="none", bias=False, layers=1):
    """f(x) = `layers` quant.linear ops of x[*t_shape, k] by weights w{i} [n, k] and
    s{i} [n, groups] (+ bias b{i})."""
    m = Module("qlinear")
    b = Builder.new_function(m, "f", [("x", TensorType(tuple(t_shape) + (k,), x_dtype))])
    outs = []
    for i in range(layers):
        args = [b.fn.arg("x"), b.weight(f"w{i}", TensorType((n, k), code_dtype)),
                b.weight(f"s{i}", TensorType((n, groups), DType.f32))]
        if bias:
            args.append(b.weight(f"b{i}", TensorType((n,), x_dtype)))
        outs.append(b(ops.quantized_linear, *args, act=act))
    b.ret(*outs)
    return m


def _weights(m, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in m.weights.items():
        if name.startswith("w"):
            out[name] = _codes(rng, *t.shape, t.dtype.to_numpy())
        elif name.startswith("s"):
            out[name] = rng.uniform(1e-3, 2e-3, t.shape).astype(np.float32)
        else:
            out[name] = rng.standard_normal(t.shape).astype(t.dtype.to_numpy())
    return out


@pytest.mark.parametrize("code_dtype, bias", [(DType.int8, True), (DType.f8e4m3, False)])
def test_rule_matches_the_xla_rule_interpreter(monkeypatch, code_dtype, bias):
    # x [2, 3, K]: the rule flattens the leading dims to 6 tokens; a bias is added after
    # the kernel's f32 result; the splits come from the rule's default config.
    monkeypatch.setenv("JAXRT_QUANT_KERNEL", "on")
    m = _linear_module((2, 3), 128, 512, code_dtype=code_dtype, bias=bias)
    weights = _weights(m)
    x = np.random.default_rng(1).standard_normal((2, 3, 512)).astype(DType.bf16.to_numpy())
    (want,) = jax.jit(lower_function(m, "f", backends=("xla",)))(weights, x)
    with pallas.interpret_kernels(quant_config=qmgpu.Config(tile_k=128, stages=2, sms=4)):
        fn = lower_function(m, "f", backends=("pallas", "xla"))
        (got,) = jax.jit(fn)(weights, x)
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape == (2, 3, 128) and got.dtype == want.dtype
    want32, got32 = want.astype(np.float32), got.astype(np.float32)
    np.testing.assert_allclose(got32, want32, rtol=1e-2, atol=1e-2 * np.abs(want32).max())


def _cuda_text(m, backends=("pallas", "xla")):
    structs = [jax.ShapeDtypeStruct(a.type.shape, a.type.dtype.to_numpy())
               for a in m.functions["f"].args]
    weights = {n: jax.ShapeDtypeStruct(t.shape, t.dtype.to_numpy())
               for n, t in m.weights.items()}
    fn = lower_function(m, "f", backends=backends)
    return jax.jit(fn).trace(weights, *structs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case, kernels", [
    ("decode", 1), ("tokens-64", 1), ("tokens-65", 0), ("group-scales", 0),
    ("w8a8", 0), ("f32-activations", 0), ("odd-rows", 0), ("kernel-off", 0)])
def test_the_kernel_is_chosen_only_where_it_applies(monkeypatch, case, kernels):
    # Cross-lowered for CUDA: a quant.linear the kernel covers becomes one Mosaic GPU
    # call; prefill-sized token counts, group scales, W8A8 (act=token), f32 activations
    # and row counts that no 64-row tile divides stay with the XLA rule, as does
    # everything with JAXRT_QUANT_KERNEL=off.
    monkeypatch.setenv("JAXRT_QUANT_KERNEL", "off" if case == "kernel-off" else "on")
    kw = {"decode": {}, "tokens-64": {"t_shape": (64,)}, "tokens-65": {"t_shape": (65,)},
          "group-scales": {"groups": 4}, "w8a8": {"act": "token"},
          "f32-activations": {"x_dtype": DType.f32}, "odd-rows": {"n": 96},
          "kernel-off": {}}[case]
    args = {"t_shape": (4,), "n": 256, "k": 512} | kw
    m = _linear_module(args.pop("t_shape"), args.pop("n"), args.pop("k"), **args)
    assert _cuda_text(m).count(MOSAIC) == kernels


def test_layers_share_one_lowered_kernel(monkeypatch):
    # Every layer's call goes through one jitted function (pallas._weight_only_linear_jit):
    # a step embeds one Mosaic GPU module a projection shape, not one a layer.
    monkeypatch.setenv("JAXRT_QUANT_KERNEL", "on")
    assert _cuda_text(_linear_module((8,), 256, 512, layers=3)).count(MOSAIC) == 1


LLAMA_1B = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048),
            "down": (2048, 8192)}  # (out, in) of Llama-3.2-1B's fused projections


@pytest.mark.parametrize("proj", sorted(LLAMA_1B))
@pytest.mark.parametrize("tokens, x_dtype, code_dtype", [
    (1, BF16, I8), (16, BF16, I8), (64, BF16, I8), (5, F16, I8), (8, BF16, E4M3)])
def test_the_kernel_lowers_for_cuda(proj, tokens, x_dtype, code_dtype):
    # Pallas's Mosaic GPU lowering runs on this CPU (the codes' register layout, the
    # relayout to wgmma's A layout, wgmma's operand checks, TMA descriptors), so the
    # kernel's lowering errors show here without a GPU; PTX compilation does not run.
    n, k = LLAMA_1B[proj]
    assert qmgpu.applies(x_dtype, code_dtype, tokens, n, k)
    p = qmgpu.plan(tokens, n, k)
    assert qmgpu.smem_bytes(p.stages, p.t_pad, p.tile_n, p.tile_k) <= qmgpu.SMEM_BYTES
    f = jax.jit(qmgpu.weight_only_linear)
    text = f.trace(jax.ShapeDtypeStruct((tokens, k), x_dtype),
                   jax.ShapeDtypeStruct((n, k), code_dtype),
                   jax.ShapeDtypeStruct((n, 1), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count(MOSAIC) == 1


LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
            "down": (4096, 14336)}


@pytest.mark.parametrize("tokens", [1, 16, 33, 64])
@pytest.mark.parametrize("n, k", list(LLAMA_1B.values()) + list(LLAMA_8B.values()))
def test_plans_cover_llama_shapes(n, k, tokens):
    # Every Llama projection takes the 128 x 256 tile, fits shared memory, reads each
    # K column once (splits x per covers the steps, no split is empty) and keeps the
    # programs within one or two waves of an H100's 132 SMs.
    assert qmgpu.applies(BF16, I8, tokens, n, k)
    p = qmgpu.plan(tokens, n, k)
    steps = k // p.tile_k
    assert (p.tile_n, p.tile_k) == (128, 256) and p.t_pad % 8 == 0 and p.t_pad >= tokens
    assert (p.splits - 1) * p.per < steps <= p.splits * p.per
    assert 1 <= p.stages <= min(4, p.per)
    assert qmgpu.smem_bytes(p.stages, p.t_pad, p.tile_n, p.tile_k) <= qmgpu.SMEM_BYTES
    programs = n // p.tile_n * p.splits
    assert programs >= 96 and -(-programs // 132) <= 2


def test_plan_splits_small_matrices_to_fill_the_sms():
    # Llama-3.2-1B's o projection has 16 row tiles: 8 splits of one step fill 128 SMs.
    assert qmgpu.plan(1, 2048, 2048) == qmgpu.Plan(8, 128, 256, 1, 8, 1)
    # explicit splits; more splits than steps are capped at one step each
    assert qmgpu.plan(1, 2048, 2048, qmgpu.Config(splits=3)).splits == 3
    assert qmgpu.plan(1, 2048, 2048, qmgpu.Config(splits=99)).splits == 8
    # gate_up has rows enough: one split
    assert qmgpu.plan(1, 16384, 2048).splits == 1


def test_applies():
    assert qmgpu.applies(BF16, I8, 1, 2048, 2048)
    assert qmgpu.applies("float16", "float8_e4m3fn", 64, 64, 128)
    assert not qmgpu.applies(BF16, I8, 65, 2048, 2048)        # prefill: XLA's GEMM
    assert not qmgpu.applies(BF16, I8, 0, 2048, 2048)
    assert not qmgpu.applies(jnp.float32, I8, 1, 2048, 2048)
    assert not qmgpu.applies(BF16, jnp.float8_e5m2, 1, 2048, 2048)
    assert not qmgpu.applies(BF16, I8, 1, 2048, 2048, groups=16)
    assert not qmgpu.applies(BF16, I8, 1, 96, 2048)           # rows: 64-row tiles
    assert not qmgpu.applies(BF16, I8, 1, 2048, 2000)         # K: 128-column chunks
    with pytest.raises(ValueError, match="weight_only_linear"):
        qmgpu.weight_only_linear(jnp.zeros((65, 128), BF16), jnp.zeros((64, 128), I8),
                                 jnp.ones((64, 1), jnp.float32))


def test_quant_kernel_env(monkeypatch):
    monkeypatch.delenv("JAXRT_QUANT_KERNEL", raising=False)
    assert pallas.quant_kernel_mode() == pallas.DEFAULT_QUANT_KERNEL == "off"
    for value, want in [("on", "on"), (" ON ", "on"), ("off", "off"), ("", "off")]:
        monkeypatch.setenv("JAXRT_QUANT_KERNEL", value)
        assert pallas.quant_kernel_mode() == want
    monkeypatch.setenv("JAXRT_QUANT_KERNEL", "bogus")
    with pytest.raises(SettingError, match="JAXRT_QUANT_KERNEL"):
        pallas.quant_kernel_mode()
    # the switch is the quant kernel's alone: JAXRT_KERNELS still reads as before
    monkeypatch.setenv("JAXRT_KERNELS", "off")
    assert pallas.kernels_mode() == "off"
