"""kv.update and llm.paged_attention XLA rules vs the numpy references on random ragged
steps: shuffled pages, several sequences mixing prefill chunks and decode tokens in a
shuffled flat order, padding tokens (out-of-cache slots), padding query slots (>= T),
padding page-table entries and padding sequences (context_len 0).

Tolerances as in test_xla_rules.py: f32 1e-5 (same f32 formulas, different summation
order); bf16 1e-2 (one bf16 rounding of the output plus bf16 probabilities).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.ir import Builder, DType, Module, TensorType, interpreter, ops
from jaxrt.lowering.compile import lower_function


@st.composite
def ragged_steps(draw):
    kvh = draw(st.sampled_from([1, 2]))
    heads = kvh * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    page_size = draw(st.sampled_from([1, 2, 4]))
    n_seq = draw(st.integers(1, 3))
    ctx = [draw(st.integers(1, 10)) for _ in range(n_seq)]
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
             "window": draw(st.none() | st.integers(1, 6)),
             "softcap": draw(st.none() | st.floats(0.5, 5.0))}
    dtype = draw(st.sampled_from([DType.f32, DType.bf16]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(shape=(heads, kvh, head_dim, num_pages, page_size), positions=positions,
                slots=slots, page_table=page_table, context_lens=context_lens,
                q_index=q_index, attrs=attrs, dtype=dtype, seed=seed, n_pad=n_pad_tok,
                order=order, k=k)


def _module(heads, kvh, head_dim, num_pages, page_size, t, s, mp, q_width, dtype, attrs):
    i32 = DType.int32
    m = Module("paged")
    kv_t = TensorType((2, 2, num_pages, page_size, kvh, head_dim), dtype)
    b = Builder.new_function(m, "f", [
        ("q", TensorType((t, heads, head_dim), dtype)),
        ("k", TensorType((t, kvh, head_dim), dtype)), ("v", TensorType((t, kvh, head_dim), dtype)),
        ("kv", kv_t), ("slots", TensorType((t,), i32)),
        ("page_table", TensorType((s, mp), i32)), ("context_lens", TensorType((s,), i32)),
        ("q_index", TensorType((s, q_width), i32)), ("positions", TensorType((t,), i32))])
    a = {n: b.fn.arg(n) for n in b.fn.arg_names}
    kv = b(ops.kv_update, a["kv"], a["k"], a["v"], a["slots"], layer=attrs["layer"])
    out = b(ops.paged_attention, a["q"], kv, a["page_table"], a["context_lens"],
            a["q_index"], a["positions"], **attrs)
    b.ret(kv, out)
    return m


@settings(max_examples=40, deadline=None)
@given(ragged_steps())
def test_kv_update_and_paged_attention_match_reference(step):
    heads, kvh, head_dim, num_pages, page_size = step["shape"]
    t = step["positions"].shape[0]
    s, mp = step["page_table"].shape
    dtype = step["dtype"]
    rng = np.random.default_rng(step["seed"])
    npdt = dtype.to_numpy()
    q = rng.standard_normal((t, heads, head_dim)).astype(npdt)
    k = rng.standard_normal((t, kvh, head_dim)).astype(npdt)
    v = rng.standard_normal((t, kvh, head_dim)).astype(npdt)
    cache = rng.standard_normal((2, 2, num_pages, page_size, kvh, head_dim)).astype(npdt)
    m = _module(heads, kvh, head_dim, num_pages, page_size, t, s, mp,
                step["q_index"].shape[1], dtype, step["attrs"])
    args = [q, k, v, cache, step["slots"], step["page_table"], step["context_lens"],
            step["q_index"], step["positions"]]

    want_kv, want = interpreter.run(m, "f", args)
    got_kv, got = (np.asarray(x) for x in jax.jit(lower_function(m, "f"))({}, *args))

    np.testing.assert_array_equal(got_kv, want_kv)  # a scatter: exact in any dtype
    tol = 1e-5 if dtype == DType.f32 else 1e-2
    want32, got32 = want.astype(np.float32), got.astype(np.float32)
    scale = max(float(np.abs(want32).max()), 1e-30)
    np.testing.assert_allclose(got32, want32, rtol=tol, atol=tol * scale)
    pad_rows = step["order"][step["k"]:]
    assert not got32[pad_rows].any(), "padding tokens must get zero attention output"
