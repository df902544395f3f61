"""The Pallas (Mosaic GPU) paged-attention kernel and its lowering rule, on a CPU in
Pallas's GPU interpret mode: the kernel's barriers, TMA page copies, splits and masks run
as written; only the two matmuls are jnp dots there (the interpreter takes no transposed
or register operand for wgmma). Speed and the real wgmma path are checked on a GPU by
bench/bench_attention.py.

Tolerance 1e-2 as for every bf16 attention (tests/lowering/test_paged_attention.py).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrt.ir import DType
from jaxrt.lowering import pallas
from jaxrt.lowering.compile import lower_function
from jaxrt.lowering.pallas import paged_attention_mgpu as mgpu

from tests.lowering.test_paged_attention import _assert_close, _module, make_step

pytestmark = pytest.mark.xdist_group("pallas")


def test_kernel_matches_reference_with_splits_masks_and_empty_rows():
    # 3 rows x 1 KV head x 2 splits of 2 blocks (tables of 13 pages of 16): row 0 has no
    # keys, row 1 a context ending mid-block whose 3 queries start mid-context (a prefill
    # row), row 2 ends in the second split; window and soft-cap on.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    rng = np.random.default_rng(0)
    pages, ps, kvh, d, h, n_q = 40, 16, 1, 64, 2, 3
    kv = jax.numpy.asarray(rng.standard_normal((2, 2, pages, ps, kvh, d)), jax.numpy.bfloat16)
    q = jax.numpy.asarray(rng.standard_normal((3, n_q, h, d)), jax.numpy.bfloat16)
    table = np.asarray(rng.permutation(pages)[:39].reshape(3, 13), np.int32)
    ctx, q_start = np.array([0, 70, 190], np.int32), np.array([0, 40, 187], np.int32)
    kw = dict(scale=0.125, softcap=20.0, window=33)
    out = mgpu.paged_attention(q, kv, 1, table, ctx, q_start,
                               config=mgpu.Config(64, 2, min_programs=9),
                               interpret=InterpretGPUParams(), **kw)
    ref = mgpu.reference(q, kv, 1, table, ctx, q_start, **kw)
    assert mgpu._split_layout(3, 1, 13 * ps, mgpu.Config(64, 2, min_programs=9)) == (2, 2)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not out[0].any(), "a row without keys must be zeros"
    _assert_close(out, ref, DType.bf16)


# page sizes the kernel covers (16..128: tiling a 64-token block, or whole blocks), GQA and
# MQA, head_dim 128, and Gemma 3's query scaling (query_pre_attn_scalar 256: 1/16, not
# 1/sqrt(head_dim)) with its sliding window
PAGE_CASES = {
    "pages-32-gqa": dict(ctx=[100, 33], new=[1, 9], page_size=32, heads=8, kvh=2,
                         head_dim=64, attrs={}),
    "pages-64-mqa-d128": dict(ctx=[130, 64], new=[3, 1], page_size=64, heads=4, kvh=1,
                              head_dim=128, attrs={"softcap": 30.0}),
    "pages-128-gemma3": dict(ctx=[300, 129], new=[1, 6], page_size=128, heads=4, kvh=1,
                             head_dim=128, attrs={"scale": 256 ** -0.5, "window": 100}),
}


@pytest.mark.parametrize("case", ["mixed", "window", "long-rows", *PAGE_CASES])
def test_rule_matches_reference_interpreter(case):
    # The pallas rule inside a lowered step: ragged rows (decode tokens, a prefill row of
    # 12 queries, a padding row and padding tokens), shuffled pages, a traced layer.
    # long-rows: rows of 37 and 19 queries with 8 query heads a KV head, so a kernel row
    # takes 8 queries (64 / 8) and the rule splits them into 5 and 3 sub-rows, the last
    # ones part padding.
    if case == "mixed":
        step = make_step([70, 33, 1], [1, 12, 1], heads=4, kvh=1, head_dim=64, mp=6,
                         attrs={}, dtype=DType.bf16, seed=1)
    elif case == "long-rows":
        step = make_step([80, 19, 5], [37, 19, 1], heads=8, kvh=1, head_dim=64, mp=6,
                         attrs={}, dtype=DType.bf16, seed=3)
        assert pallas.tile_queries(8, 1) == 8
    elif case == "window":
        step = make_step([90, 47], [5, 1], heads=4, kvh=1, head_dim=64, mp=6,
                         attrs={"window": 30, "softcap": 3.0, "layer": 0},
                         dtype=DType.bf16, base=1, seed=2)
    else:
        c = PAGE_CASES[case]
        assert pallas.attention_kernel_applies("bfloat16", "bfloat16", c["heads"], c["kvh"],
                                               c["head_dim"], c["page_size"], max(c["new"]))
        step = make_step(c["ctx"], c["new"], page_size=c["page_size"], heads=c["heads"],
                         kvh=c["kvh"], head_dim=c["head_dim"], mp=4, attrs=c["attrs"],
                         dtype=DType.bf16, seed=4)
    heads, kvh, head_dim, num_pages, page_size = step["shape"]
    t = step["positions"].shape[0]
    s, mp = step["page_table"].shape
    m = _module(heads, kvh, head_dim, num_pages, page_size, t, s, mp,
                step["q_index"].shape[1], DType.bf16, step["attrs"], step["base"] is not None)
    rng = np.random.default_rng(step["seed"])
    npdt = DType.bf16.to_numpy()
    args = [rng.standard_normal((t, heads, head_dim)).astype(npdt),
            rng.standard_normal((t, kvh, head_dim)).astype(npdt),
            rng.standard_normal((t, kvh, head_dim)).astype(npdt),
            rng.standard_normal((3, 2, num_pages, page_size, kvh, head_dim)).astype(npdt),
            step["slots"], step["page_table"], step["context_lens"], step["q_index"],
            step["positions"]] + ([np.int32(step["base"])] if step["base"] is not None else [])
    from jaxrt.ir import interpreter
    want_kv, want = interpreter.run(m, "f", args)
    with pallas.interpret_kernels():
        fn = lower_function(m, "f", backends=("pallas", "xla"))
        got_kv, got = (np.asarray(x) for x in jax.jit(fn)({}, *args))
    np.testing.assert_array_equal(got_kv, want_kv)
    _assert_close(got, want, DType.bf16)
    assert not got.astype(np.float32)[step["order"][step["k"]:]].any()


def test_the_kernel_is_chosen_only_where_it_applies(monkeypatch):
    bf16, f32 = "bfloat16", "float32"
    assert pallas.attention_kernel_applies(bf16, bf16, 32, 8, 128, 16, 16)
    assert pallas.attention_kernel_applies(bf16, bf16, 9, 3, 64, 128, 1)
    # more queries than a tile takes are split into sub-rows; a KV head's query heads
    # must fit one tile
    assert pallas.attention_kernel_applies(bf16, bf16, 32, 8, 128, 16, 2048)
    assert pallas.tile_queries(32, 8) == 16 and pallas.tile_queries(9, 3) == 21
    assert not pallas.attention_kernel_applies(bf16, bf16, 65, 1, 128, 16, 1)
    assert not pallas.attention_kernel_applies(f32, f32, 32, 8, 128, 16, 1)
    assert not pallas.attention_kernel_applies("int8", bf16, 32, 8, 128, 16, 1)
    assert not pallas.attention_kernel_applies(bf16, bf16, 32, 8, 96, 16, 1)
    assert not pallas.attention_kernel_applies(bf16, bf16, 32, 8, 128, 8, 1)
    assert not pallas.attention_kernel_applies(bf16, bf16, 32, 8, 128, 48, 1)
    assert not pallas.attention_kernel_applies(bf16, bf16, 32, 8, 128, 16, 1, causal=False)
    monkeypatch.setenv("JAXRT_KERNELS", "on")
    assert pallas.default_backends() == ("xla",)  # this CPU
    monkeypatch.setattr(pallas, "hopper", lambda: True)
    assert pallas.default_backends() == ("pallas", "xla")
    assert pallas.default_backends(sharded=True) == ("xla",)
    monkeypatch.setenv("JAXRT_KERNELS", "off")
    assert pallas.default_backends() == ("xla",)
    monkeypatch.setenv("JAXRT_KERNELS", "bogus")
    from jaxrt.errors import SettingError
    with pytest.raises(SettingError, match="JAXRT_KERNELS"):
        pallas.default_backends()


@pytest.mark.parametrize("new", [[1, 1], [40, 1]], ids=["decode", "long-row"])
def test_a_step_lowers_for_cuda_through_the_kernel(new):
    # Cross-lowering on this CPU runs Pallas's Mosaic GPU lowering (layouts, TMA
    # descriptors) without a GPU: the step's paged attention becomes the kernel's call
    # (a 40-query row too, as sub-rows of 16).
    step = make_step([40, 9], new, heads=8, kvh=2, head_dim=64, mp=4, attrs={},
                     dtype=DType.bf16)
    heads, kvh, head_dim, num_pages, page_size = step["shape"]
    s, mp = step["page_table"].shape
    m = _module(heads, kvh, head_dim, num_pages, page_size, len(step["positions"]), s, mp,
                step["q_index"].shape[1], DType.bf16, step["attrs"])
    structs = [jax.ShapeDtypeStruct(a.type.shape, a.type.dtype.to_numpy())
               for a in m.functions["f"].args]
    fn = lower_function(m, "f", backends=("pallas", "xla"))
    text = jax.jit(lambda *xs: fn({}, *xs)).trace(*structs).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_layers_share_one_lowered_kernel():
    # Every layer's call goes through one jitted function: a step embeds one Mosaic GPU
    # module, not one per layer (per-layer modules took ~100 s an 8B-shaped bucket on an
    # H100; see pallas._paged_attention_jit).
    from jaxrt.ir import Builder, Module, TensorType, ops
    i32, bf16 = DType.int32, DType.bf16
    m = Module("two_layers")
    b = Builder.new_function(m, "f", [
        ("q", TensorType((2, 8, 64), bf16)), ("k", TensorType((2, 2, 64), bf16)),
        ("kv", TensorType((2, 2, 8, 16, 2, 64), bf16)), ("slots", TensorType((2,), i32)),
        ("page_table", TensorType((2, 4), i32)), ("context_lens", TensorType((2,), i32)),
        ("q_index", TensorType((2, 1), i32)), ("positions", TensorType((2,), i32))])
    a = {n: b.fn.arg(n) for n in b.fn.arg_names}
    kv, outs = a["kv"], []
    for layer in range(2):
        kv = b(ops.kv_update, kv, a["k"], a["k"], a["slots"], layer=layer)
        outs.append(b(ops.paged_attention, a["q"], kv, a["page_table"], a["context_lens"],
                      a["q_index"], a["positions"], layer=layer, scale=0.125, causal=True,
                      window=None, softcap=None))
    b.ret(kv, *outs)
    structs = [jax.ShapeDtypeStruct(x.type.shape, x.type.dtype.to_numpy())
               for x in m.functions["f"].args]
    fn = lower_function(m, "f", backends=("pallas", "xla"))
    text = jax.jit(lambda *xs: fn({}, *xs)).trace(*structs).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("head_dim, block_kv, entries, want", [
    (128, 64, 32, 4),    # the default: 4 stages fit
    (256, 64, 32, 2),    # 4 stages overflowed on the H100 (299,152 > 232,448 bytes), and
                         # so did 3 (233,584: padding beyond this count); 2 ran
    (128, 128, 32, 3),   # 128-token pages: 4 overflowed (282,768 bytes); 3 ran
    (256, 128, 32, 1),
    (128, 64, 8192, 4),  # a 131k-token split's page table (32 KiB) still leaves 4
])
def test_ring_depth_fits_shared_memory(head_dim, block_kv, entries, want):
    stages = mgpu.ring_stages(4, head_dim, block_kv, entries)
    assert stages == want
    assert mgpu.smem_bytes(stages, head_dim, block_kv, entries) <= mgpu.SMEM_BYTES
    if stages < 4:
        assert mgpu.smem_bytes(stages + 1, head_dim, block_kv, entries) > mgpu.SMEM_BYTES
