"""kv.update and llm.paged_attention XLA rules vs the numpy references on random ragged
steps: shuffled pages, several sequences mixing prefill chunks and decode tokens in a
shuffled flat order, padding tokens (out-of-cache slots), padding query slots (>= T),
padding page-table entries and padding sequences (context_len 0).

The rule attends to long tables in blocks of pages with an online softmax; tests shrink
the block so that small contexts span many blocks, and check the block loop against the
reference, against the one-shot dense path, and at the real (CPU) block size.

Tolerances as in test_xla_rules.py: f32 1e-5 (same f32 formulas, different summation
order; the online softmax adds one f32 rescaling per block, a few ulps); bf16 1e-2 (one
bf16 rounding of the output plus bf16 probabilities).
"""
from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.errors import SettingError
from jaxrt.ir import Builder, DType, Module, TensorType, interpreter, ops
from jaxrt.lowering.compile import lower_function
from jaxrt.lowering.xla import attention as xla_attention

LAYERS = 3  # the layer read is attr (0..1) + an optional dynamic base (0..1)


@contextlib.contextmanager
def block_tokens(n: int | None):
    """Trace paged attention with key blocks of about `n` tokens (None: the default)."""
    saved = xla_attention.CPU_BLOCK_TOKENS, xla_attention.ACCELERATOR_BLOCK_TOKENS
    if n is not None:
        xla_attention.CPU_BLOCK_TOKENS = xla_attention.ACCELERATOR_BLOCK_TOKENS = (n, n)
    try:
        yield
    finally:
        xla_attention.CPU_BLOCK_TOKENS, xla_attention.ACCELERATOR_BLOCK_TOKENS = saved


@st.composite
def ragged_steps(draw, max_ctx=10, max_window=6):
    kvh = draw(st.sampled_from([1, 2]))
    heads = kvh * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    page_size = draw(st.sampled_from([1, 2, 4]))
    n_seq = draw(st.integers(1, 3))
    ctx = [draw(st.integers(1, max_ctx)) for _ in range(n_seq)]
    new = [draw(st.integers(1, c)) for c in ctx]  # this step's tokens: the last `new` of ctx
    need = [math.ceil(c / page_size) for c in ctx]
    num_pages = sum(need) + draw(st.integers(0, 2))
    perm = draw(st.permutations(range(num_pages)))
    mp = max(need) + draw(st.integers(0, 1))
    n_pad_seq = draw(st.integers(0, 1))
    n_pad_tok = draw(st.integers(0, 2))
    t = sum(new) + n_pad_tok
    order = draw(st.permutations(range(t)))  # flat index of each token
    q_width = max(new) + draw(st.integers(0, 1))

    page_table = np.zeros((n_seq + n_pad_seq, mp), np.int32)
    positions = np.zeros(t, np.int32)
    slots = np.zeros(t, np.int32)
    q_index = np.zeros((n_seq + n_pad_seq, q_width), np.int32)
    used, k = 0, 0
    for s in range(n_seq + n_pad_seq):
        own = list(perm[used:used + need[s]]) if s < n_seq else []
        used += len(own)
        fill = [draw(st.integers(0, num_pages - 1)) for _ in range(mp - len(own))]
        page_table[s] = own + fill  # padding entries: any valid page
        q_index[s] = [draw(st.integers(t, t + 3)) for _ in range(q_width)]
        if s >= n_seq:
            continue
        for j, pos in enumerate(range(ctx[s] - new[s], ctx[s])):
            i = order[k]
            k += 1
            positions[i] = pos
            slots[i] = page_table[s, pos // page_size] * page_size + pos % page_size
            q_index[s, j] = i
    for i in order[k:]:  # padding tokens: slot past the cache, any position
        positions[i] = draw(st.integers(0, 12))
        slots[i] = num_pages * page_size + draw(st.integers(0, 3))
    context_lens = np.array(ctx + [0] * n_pad_seq, np.int32)
    attrs = {"layer": draw(st.integers(0, 1)),
             "scale": draw(st.floats(0.1, 1.0)),
             "causal": draw(st.booleans()),
             "window": draw(st.none() | st.integers(1, max_window)),
             "softcap": draw(st.none() | st.floats(0.5, 5.0))}
    dtype = draw(st.sampled_from([DType.f32, DType.bf16]))
    seed = draw(st.integers(0, 2**32 - 1))
    base = draw(st.none() | st.integers(0, 1))  # the dynamic layer operand of a layer scan
    return dict(shape=(heads, kvh, head_dim, num_pages, page_size), positions=positions,
                slots=slots, page_table=page_table, context_lens=context_lens,
                q_index=q_index, attrs=attrs, dtype=dtype, seed=seed, n_pad=n_pad_tok,
                order=order, k=k, base=base)


def _module(heads, kvh, head_dim, num_pages, page_size, t, s, mp, q_width, dtype, attrs,
            base=False):
    i32 = DType.int32
    m = Module("paged")
    kv_t = TensorType((LAYERS, 2, num_pages, page_size, kvh, head_dim), dtype)
    b = Builder.new_function(m, "f", [
        ("q", TensorType((t, heads, head_dim), dtype)),
        ("k", TensorType((t, kvh, head_dim), dtype)), ("v", TensorType((t, kvh, head_dim), dtype)),
        ("kv", kv_t), ("slots", TensorType((t,), i32)),
        ("page_table", TensorType((s, mp), i32)), ("context_lens", TensorType((s,), i32)),
        ("q_index", TensorType((s, q_width), i32)), ("positions", TensorType((t,), i32))]
        + ([("base", TensorType((), i32))] if base else []))
    a = {n: b.fn.arg(n) for n in b.fn.arg_names}
    extra = [a["base"]] if base else []
    kv = b(ops.kv_update, a["kv"], a["k"], a["v"], a["slots"], *extra, layer=attrs["layer"])
    out = b(ops.paged_attention, a["q"], kv, a["page_table"], a["context_lens"],
            a["q_index"], a["positions"], *extra, **attrs)
    b.ret(kv, out)
    return m


def _run_step(step, block=None, dense=False):
    """(reference kv, reference out, lowered kv, lowered out) for one drawn step, the
    lowering traced with key blocks of about `block` tokens; `base` is a jit argument,
    so the layer is a traced scalar."""
    heads, kvh, head_dim, num_pages, page_size = step["shape"]
    t = step["positions"].shape[0]
    s, mp = step["page_table"].shape
    dtype = step["dtype"]
    rng = np.random.default_rng(step["seed"])
    npdt = dtype.to_numpy()
    q = rng.standard_normal((t, heads, head_dim)).astype(npdt)
    k = rng.standard_normal((t, kvh, head_dim)).astype(npdt)
    v = rng.standard_normal((t, kvh, head_dim)).astype(npdt)
    cache = rng.standard_normal((LAYERS, 2, num_pages, page_size, kvh, head_dim)).astype(npdt)
    m = _module(heads, kvh, head_dim, num_pages, page_size, t, s, mp,
                step["q_index"].shape[1], dtype, step["attrs"], step["base"] is not None)
    args = [q, k, v, cache, step["slots"], step["page_table"], step["context_lens"],
            step["q_index"], step["positions"]]
    if step["base"] is not None:
        args.append(np.int32(step["base"]))
    want_kv, want = interpreter.run(m, "f", args)
    with block_tokens(block), xla_attention.dense_decode(dense):
        got_kv, got = (np.asarray(x) for x in jax.jit(lower_function(m, "f"))({}, *args))
    return want_kv, want, got_kv, got


def _assert_close(got, want, dtype):
    tol = 1e-5 if dtype == DType.f32 else 1e-2  # see the module docstring
    want32, got32 = want.astype(np.float32), got.astype(np.float32)
    scale = max(float(np.abs(want32).max()), 1e-30)
    np.testing.assert_allclose(got32, want32, rtol=tol, atol=tol * scale)


def _check_step(step, block=None):
    want_kv, want, got_kv, got = _run_step(step, block)
    np.testing.assert_array_equal(got_kv, want_kv)  # a scatter: exact in any dtype
    _assert_close(got, want, step["dtype"])
    pad_rows = step["order"][step["k"]:]
    assert not got.astype(np.float32)[pad_rows].any(), \
        "padding tokens must get zero attention output"
    return got


@settings(max_examples=40, deadline=None)
@given(ragged_steps())
def test_kv_update_and_paged_attention_match_reference(step):
    _check_step(step)  # tables of <= 11 pages: one block, the dense path


@settings(max_examples=30, deadline=None)
@given(ragged_steps(max_ctx=40, max_window=24), st.sampled_from([1, 2, 4, 8, 12]))
def test_block_loop_matches_reference_and_dense_path(step, block):
    # Blocks of 1..12 tokens (at least one page): contexts of up to 40 tokens span many
    # blocks and end in partial ones; windows are smaller and larger than a block.
    looped = _check_step(step, block)
    _, _, _, dense = _run_step(step, 1 << 20)  # one block holds every table: no loop
    _assert_close(looped, dense, step["dtype"])


@settings(max_examples=20, deadline=None)
@given(ragged_steps(max_ctx=40, max_window=24), st.sampled_from([1, 4, 12]))
def test_dense_decode_matches_the_reference_and_the_block_loop(step, block):
    # Under dense_decode, decode steps (one query a sequence) attend to the whole table at
    # once whatever the block size; steps with several queries keep the block loop.
    want_kv, want, got_kv, got = _run_step(step, block, dense=True)
    np.testing.assert_array_equal(got_kv, want_kv)
    _assert_close(got, want, step["dtype"])
    _, _, _, looped = _run_step(step, block)
    _assert_close(got, looped, step["dtype"])


def make_step(ctx, new, *, page_size=16, mp=64, heads=6, kvh=2, head_dim=16, attrs,
              dtype=DType.f32, base=None, seed=0):
    """A step in `ragged_steps`' format: sequence s has ctx[s] tokens, its last new[s]
    computed now (one query row each), then a padding row (context 0) and padding
    tokens. Pages are shuffled; padding table entries are any id, out of range included
    (the rule clips them, as the reference does)."""
    rng = np.random.default_rng(seed)
    need = [-(-c // page_size) for c in ctx]
    num_pages = sum(need) + 3
    perm = rng.permutation(num_pages)
    n_pad_tok = 2
    t = sum(new) + n_pad_tok
    order = rng.permutation(t)
    s = len(ctx) + 1
    page_table = rng.integers(-4, num_pages + 4, (s, mp)).astype(np.int32)
    q_index = np.full((s, max(new)), t, np.int32)
    positions, slots = np.zeros(t, np.int32), np.zeros(t, np.int32)
    used = k = 0
    for i, (c, n) in enumerate(zip(ctx, new)):
        page_table[i, :need[i]] = perm[used:used + need[i]]
        used += need[i]
        for j, pos in enumerate(range(c - n, c)):
            positions[order[k]] = pos
            slots[order[k]] = page_table[i, pos // page_size] * page_size + pos % page_size
            q_index[i, j] = order[k]
            k += 1
    slots[order[k:]] = num_pages * page_size  # padding tokens: dropped
    attrs = {"layer": 1, "scale": 0.3, "causal": True, "window": None, "softcap": None,
             **attrs}
    return dict(shape=(heads, kvh, head_dim, num_pages, page_size), positions=positions,
                slots=slots, page_table=page_table,
                context_lens=np.array(list(ctx) + [0], np.int32), q_index=q_index,
                attrs=attrs, dtype=dtype, seed=seed, n_pad=n_pad_tok, order=order, k=k,
                base=base)


# Tables of 128 pages of 16 = 2048 tokens: 4 blocks of 512 tokens on CPU. Contexts end in
# partial blocks, on a block edge (512) and one past it (513); one sequence prefills a
# 40-token chunk across a block edge; one configuration has every query late, so a window
# lets the loop start past the first blocks.
CONTEXTS = [([1400, 512, 513, 1, 2000], [1, 1, 1, 1, 1]),
            ([1800, 2000, 1580, 500], [1, 40, 1, 1])]


@pytest.mark.parametrize("dtype", [DType.f32, DType.bf16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window, softcap, causal", [
    (None, None, True), (200, None, True), (1200, 4.0, True), (600, None, False)])
@pytest.mark.parametrize("ctx, new", CONTEXTS, ids=["mixed", "late"])
def test_long_contexts_at_the_default_block_size(ctx, new, window, softcap, causal, dtype):
    # 6 rows of K+V at 2 * 2 heads * 16 dims * 4 bytes: 512-token blocks, 4 per table
    assert xla_attention.block_pages(16, 6, 256, "cpu") == 32
    assert jax.default_backend() == "cpu"
    step = make_step(ctx, new, mp=128, attrs={"window": window, "softcap": softcap,
                                              "causal": causal}, dtype=dtype, base=1)
    step["attrs"]["layer"] = 0  # + base 1, traced
    _check_step(step)


def _jaxpr_primitives(step, block=None, dense=False):
    heads, kvh, head_dim, num_pages, page_size = step["shape"]
    s, mp = step["page_table"].shape
    m = _module(heads, kvh, head_dim, num_pages, page_size, len(step["positions"]), s, mp,
                step["q_index"].shape[1], step["dtype"], step["attrs"])
    args = [np.zeros(a.type.shape, a.type.dtype.to_numpy()) for a in m.functions["f"].args]
    with block_tokens(block), xla_attention.dense_decode(dense):
        jaxpr = jax.make_jaxpr(lambda *xs: lower_function(m, "f")({}, *xs))(*args)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}


def test_dense_path_only_when_the_table_fits_one_block():
    # Accelerators take blocks of up to 2048 tokens (a loop iteration costs ~30 us there),
    # bounded at 64 MiB of gathered K+V: 512 prefill rows of an 8B model get 256 tokens.
    assert xla_attention.block_pages(16, 32, 768, "gpu") == 128
    assert xla_attention.block_pages(16, 512, 4096, "gpu") == 16
    # On CPU blocks follow the rows' K+V footprint, 64..512 tokens.
    assert [xla_attention.block_pages(16, s, 1536, "cpu") for s in (1, 8, 32, 256)] == \
        [32, 21, 5, 4]
    step = make_step([100, 30], [1, 1], mp=32, attrs={})  # 3 rows: 32 pages = 512 tokens
    assert "while" not in _jaxpr_primitives(step)
    assert "while" in _jaxpr_primitives(step, block=128)
    assert "while" in _jaxpr_primitives(make_step([100, 30], [1, 1], mp=33, attrs={}))
    # dense decode: no loop at any block size; a prefill chunk keeps its loop
    assert "while" not in _jaxpr_primitives(step, block=128, dense=True)
    assert "while" not in _jaxpr_primitives(make_step([100, 30], [1, 1], mp=33, attrs={}),
                                            dense=True)
    assert "while" in _jaxpr_primitives(make_step([100, 30], [1, 20], mp=33, attrs={}),
                                        dense=True)


def test_decode_attention_mode_and_cost_rule(monkeypatch):
    monkeypatch.delenv("JAXRT_DECODE_ATTENTION", raising=False)
    # auto: dense decode on accelerators within 64 MiB of K+V a layer, never on CPUs.
    # SmolLM2 (3 KV heads x 64 dims, bf16: 768 bytes a layer-token), 4,096-token tables
    assert not xla_attention.decode_dense(1, 4096, 768, "cpu")
    assert xla_attention.decode_dense(1, 4096, 768, "gpu")
    assert xla_attention.decode_dense(16, 4096, 768, "gpu")
    assert not xla_attention.decode_dense(32, 4096, 768, "gpu")
    # Llama-3.1-8B (8 x 128, bf16: 4 KiB)
    assert xla_attention.decode_dense(4, 4096, 4096, "gpu")
    assert not xla_attention.decode_dense(8, 4096, 4096, "gpu")
    assert not xla_attention.decode_dense(1, 131072, 4096, "gpu")
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dense")  # the same bound, CPUs too
    assert xla_attention.decode_dense(1, 4096, 768, "cpu")
    assert not xla_attention.decode_dense(32, 4096, 768, "cpu")
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dynamic")
    assert not xla_attention.decode_dense(1, 4096, 768, "gpu")
    for bad in ("fast", "static"):
        monkeypatch.setenv("JAXRT_DECODE_ATTENTION", bad)
        with pytest.raises(SettingError, match="JAXRT_DECODE_ATTENTION"):
            xla_attention.decode_dense(1, 4096, 768, "gpu")


def test_loop_reads_only_blocks_some_query_can_see():
    # Pages wholly before every query's window, and pages past the longest context's
    # block, hold NaN: reading them would poison the output (0 * NaN), so the output
    # staying finite shows the loop's bounds come from the context, not the table width.
    page_size, window = 16, 100
    ctx = [1800, 2000, 1900]
    step = make_step(ctx, [1, 1, 1], mp=256, attrs={"window": window}, dtype=DType.f32)
    heads, kvh, head_dim, num_pages, _ = step["shape"]
    table = step["page_table"]
    block = page_size * xla_attention.block_pages(page_size, 4, 2 * kvh * head_dim * 4)
    first_block = (min(ctx) - window) // block  # the last query of each sequence is at ctx - 1
    last_block = -(-max(ctx) // block)
    assert block == 512 and (first_block, last_block) == (3, 4)  # 3 of 8 blocks are read
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((LAYERS, 2, num_pages, page_size, kvh, head_dim))
    cache = cache.astype(np.float32)
    unseen = np.concatenate([table[:3, :first_block * block // page_size].ravel(),
                             table[:3, last_block * block // page_size:].ravel()])
    unseen = np.clip(unseen, 0, num_pages - 1)
    seen = np.clip(table[:3, first_block * block // page_size:
                         last_block * block // page_size], 0, num_pages - 1)
    unseen = np.setdiff1d(unseen, seen)  # padding entries may repeat a visible page
    assert len(unseen) > 10
    poisoned = cache.copy()
    poisoned[1, :, unseen] = np.nan
    t = len(step["positions"])
    q = rng.standard_normal((t, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((t, kvh, head_dim)).astype(np.float32)
    m = _module(heads, kvh, head_dim, num_pages, page_size, t, *table.shape,
                step["q_index"].shape[1], DType.f32, step["attrs"])
    rest = [step["slots"], table, step["context_lens"], step["q_index"], step["positions"]]
    _, want = interpreter.run(m, "f", [q, k, k, cache, *rest])
    _, got = jax.jit(lower_function(m, "f"))({}, q, k, k, poisoned, *rest)
    _assert_close(np.asarray(got), want, DType.f32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference's 0/0
@pytest.mark.parametrize("block", [None, 32], ids=["dense", "loop"])
def test_rows_that_see_no_key_are_exact_zeros(block):
    # Row 0 queries with context 0; row 1's query sits past its context and its window
    # (position 250, context 200, window 8): neither sees a key. Row 2 is ordinary.
    step = make_step([200, 200, 120], [1, 1, 1], mp=32, attrs={"window": 8})
    rows = step["q_index"][:3, 0]
    step["context_lens"][0] = 0
    step["positions"][rows[1]] = 250
    want_kv, want, got_kv, got = _run_step(step, block)
    assert np.isfinite(got).all()
    assert not got[rows[:2]].any(), "a row that sees no key must be zeros, not NaN"
    assert got[rows[2]].any()
    _assert_close(got, want, DType.f32)


def test_block_loop_does_not_copy_the_cache_in_a_model_step():
    # The loop's while op reads the cache; had XLA found the next layer's kv.update
    # unordered with it, it would copy the whole cache per layer (the 25x slowdown
    # kv.update's comment measures). In a model the next layer's k/v depend on this
    # layer's attention output, which orders them: the compiled step has no cache copy.
    from jaxrt.frontends.build import build_module
    from jaxrt.frontends.config import ModelConfig
    from jaxrt.ir.substitute import bind_dims
    config = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position=512)
    module = bind_dims(build_module(config), {"pages": 80, "page_size": 4})
    fn = module.functions["step"]
    sizes = {"T": 4, "S": 4, "Q": 1, "MP": 64, "N": 4}  # 64 pages: 16 blocks of 16 tokens
    args = [jax.ShapeDtypeStruct(tuple(sizes.get(d, d) for d in a.type.shape),
                                 a.type.dtype.to_numpy()) for a in fn.args]
    weights = {n: jax.ShapeDtypeStruct(t.shape, t.dtype.to_numpy())
               for n, t in module.weights.items()}
    kv = 1 + fn.arg_names.index("kv")
    with block_tokens(16):
        step = jax.jit(lower_function(module, "step"), donate_argnums=(kv,))
        hlo = step.lower(weights, *args).compile().as_text()
    cache = "f32[" + ",".join(map(str, args[kv - 1].shape)) + "]"
    assert hlo.count(" while(") >= config.num_layers
    copies = [ln for ln in hlo.splitlines() if " copy(" in ln and f"= {cache}" in ln]
    assert not copies, copies
