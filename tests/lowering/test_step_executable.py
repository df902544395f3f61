"""StepExecutable end to end on small random models, against the numpy reference
interpreter: ragged multi-sequence steps, cache donation, shape buckets, dtypes, and
greedy_generate.

Tolerance for whole-model f32 logits: 1e-4 x max|logit|. Each of the ~20 ops per layer
agrees with its reference to a few f32 ulps (test_xla_rules.py); RMSNorm and softmax
renormalise but do not remove these, so a few layers accumulate ~1e-6 relative error,
and 1e-4 leaves margin without hiding real bugs (a wrong mask or page moves logits by
O(1)).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import DType, interpreter
from jaxrt.ir.substitute import bind_dims, set_float_dtype
from jaxrt.lowering.executable import StepExecutable, greedy_generate
from jaxrt.lowering.registry import LoweringError

NUM_PAGES, PAGE_SIZE = 12, 4

CONFIGS = {
    "llama": ModelConfig(arch="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                         max_position=128, qkv_bias=True),
    "gemma3": ModelConfig(arch="gemma3", vocab_size=89, hidden_size=32, intermediate_size=40,
                          num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16,
                          max_position=128, layer_types=("sliding", "full", "sliding"),
                          sliding_window=3, rope_local_theta=100.0, rope_theta=1e4,
                          query_pre_attn_scalar=24.0, attn_logit_softcap=2.0,
                          final_logit_softcap=8.0, tie_embeddings=True,
                          hidden_act="gelu_tanh"),
}


def random_weights(module, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in module.weights.items():
        fan_in = t.shape[-1] if len(t.shape) == 2 and "embed" not in name else 1
        out[name] = (rng.standard_normal(t.shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    module = build_module(CONFIGS[request.param])
    return module, random_weights(module)


class Cache:
    """A reference run: the interpreter with the cache carried between steps."""

    def __init__(self, module):
        self.module = bind_dims(module, {"pages": NUM_PAGES, "page_size": PAGE_SIZE})
        kv_t = self.module.functions["step"].arg("kv").type
        self.kv = np.zeros(kv_t.shape, np.float32)

    def run(self, weights, *args):
        logits, self.kv = interpreter.run(self.module, "step", [*args, self.kv], weights)
        return logits


def step_args(seqs, pad_tokens=0, pad_seqs=0, q_width=None, mp=4):
    """seqs: [(page list, start position, token ids)] -> the seven step arrays, with
    tokens interleaved across sequences, padding tokens and padding sequences."""
    flat = []  # (seq, position, token)
    for s, (pages, start, toks) in enumerate(seqs):
        flat += [(s, start + j, tok) for j, tok in enumerate(toks)]
    flat = flat[1::2] + flat[0::2]  # not grouped by sequence
    t = len(flat) + pad_tokens
    tokens = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    slots = np.full(t, NUM_PAGES * PAGE_SIZE, np.int32)  # padding: dropped
    q_width = q_width or max(len(toks) for _, _, toks in seqs)
    q_index = np.full((len(seqs) + pad_seqs, q_width), t + 1, np.int32)
    page_table = np.zeros((len(seqs) + pad_seqs, mp), np.int32)
    ctx = np.zeros(len(seqs) + pad_seqs, np.int32)
    for i, (s, pos, tok) in enumerate(flat):
        pages = seqs[s][0]
        tokens[i], positions[i] = tok, pos
        slots[i] = pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        q_index[s, pos - seqs[s][1]] = i  # j-th query of s = its j-th new position
    for s, (pages, start, toks) in enumerate(seqs):
        page_table[s, :len(pages)] = pages
        ctx[s] = start + len(toks)
    last = np.array([q_index[s, len(toks) - 1] for s, (_, _, toks) in enumerate(seqs)],
                    np.int32)
    return [tokens, positions, slots, page_table, ctx, q_index, np.arange(t, dtype=np.int32)], last


def assert_close(got, want, rel=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= rel * scale, (np.abs(got - want).max(), scale)


def test_ragged_steps_match_interpreter(model):
    module, weights = model
    exe = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                         dtype="f32")
    ref = Cache(module)
    a_pages, b_pages = [7, 2, 9], [4, 0]
    a, b = [5, 17, 3, 60, 8, 11, 2], [33, 1, 44]
    steps = [  # A: prefill in two chunks then decode; B: prefill then decode
        ([(a_pages, 0, a[:4]), (b_pages, 0, b)], dict(pad_tokens=2, pad_seqs=1)),
        ([(a_pages, 4, a[4:]), (b_pages, 3, [9])], dict(pad_tokens=1)),
        ([(a_pages, 7, [21]), (b_pages, 4, [6])], dict(q_width=2, pad_seqs=2)),
    ]
    for seqs, pad in steps:
        args, _ = step_args(seqs, **pad)
        assert_close(exe.run(*args), ref.run(weights, *args))
    assert_close(exe.kv_cache, ref.kv, rel=1e-5)


def test_batched_sequences_do_not_interact(model):
    module, weights = model
    together = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                              dtype="f32")
    alone = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                           dtype="f32")
    a = (3, 1, 4, 1, 5, 9)
    args, last = step_args([([5, 1], 0, a), ([3, 8], 0, (2, 7, 1))], pad_tokens=1)
    both = np.asarray(together.run(*args))
    args_a, last_a = step_args([([10, 6], 0, a)])
    solo = np.asarray(alone.run(*args_a))
    assert_close(both[last[0]], solo[last_a[0]])


def test_greedy_generate_matches_recomputing_the_prefix(model):
    module, weights = model
    exe = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                         dtype="f32")
    prompt = [3, 14, 15, 9, 2]
    got = greedy_generate(exe, prompt, 6)
    seq = list(prompt)
    for _ in range(6):  # no cache reuse: each token from a fresh full-prefix reference run
        args, last = step_args([(list(range(4)), 0, seq)])
        args[-1] = last
        seq.append(int(np.argmax(Cache(module).run(weights, *args)[0])))
    assert got == seq[len(prompt):]
    assert greedy_generate(exe, prompt, 5, stop_ids=[got[0]]) == got[:1]
    with pytest.raises(ValueError, match="pages"):
        greedy_generate(exe, prompt, NUM_PAGES * PAGE_SIZE)


def test_buckets_compile_once_and_cache_is_donated():
    module = build_module(CONFIGS["llama"])
    exe = StepExecutable(module, random_weights(module), num_pages=NUM_PAGES,
                         page_size=PAGE_SIZE)
    assert exe.compile_for(8, 2, 4, 3, 2) > 0
    assert exe.compile_for(8, 2, 4, 3, 2) == 0.0
    total = exe.compile_seconds_total
    args, _ = step_args([([0, 1, 2], 0, [1, 2, 3]), ([3, 4, 5], 0, [4, 5, 6, 7])],
                        pad_tokens=1, mp=3)
    args[-1] = np.array([2, 6], np.int32)
    old = exe.kv_cache
    logits = exe.run(*args)  # T=8, S=2, Q=4, MP=3, N=2: already compiled
    assert exe.compile_seconds_total == total
    assert old.is_deleted(), "the cache must be donated to the step"
    assert isinstance(logits, jax.Array) and logits.dtype == np.float32
    assert logits.shape == (2, exe.vocab_size)
    exe.run(*step_args([([0, 1, 2], 3, [9])], mp=3)[0])  # new bucket: compiles
    assert exe.compile_seconds_total > total
    assert exe.compiled_shapes == [(1, 1, 1, 3, 1), (8, 2, 4, 3, 2)]
    assert jax.config.jax_compilation_cache_dir  # persistent cache on


def test_kv_update_is_in_place():
    module = build_module(CONFIGS["gemma3"])
    exe = StepExecutable(module, random_weights(module), num_pages=2048, page_size=4,
                         dtype="f32")
    stats = exe.memory_analysis(8, 2, 4, 3, 2)
    kv_bytes = exe.kv_cache.nbytes
    assert stats.alias_size_in_bytes >= kv_bytes  # the output cache is the donated input
    assert stats.temp_size_in_bytes < kv_bytes // 8  # and no copy of it is made


@pytest.mark.parametrize("mode", ["dynamic", "dense"])
def test_decode_loop_updates_the_cache_in_place(mode, monkeypatch):
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", mode)
    module = build_module(CONFIGS["gemma3"])
    exe = StepExecutable(module, random_weights(module), num_pages=2048, page_size=4,
                         dtype="f32")
    exe.compile_decode(2, 8, 4)
    assert exe.decode_fallbacks == []
    stats = exe._programs._compiled[("decode", 2, 8, 4)].memory_analysis()
    kv_bytes = exe.kv_cache.nbytes
    assert stats.alias_size_in_bytes >= kv_bytes
    assert stats.temp_size_in_bytes < kv_bytes // 8


def test_dense_decode_loop_that_copies_the_cache_is_compiled_again(monkeypatch):
    # A dense loop whose temporaries are as large as the cache would copy it each call:
    # the executable warns and keeps the block loop instead.
    from jaxrt.lowering.xla import attention
    from jaxrt.runtime.programs import StepPrograms
    monkeypatch.setenv("JAXRT_DECODE_ATTENTION", "dense")
    module = build_module(CONFIGS["llama"])
    exe = StepExecutable(module, random_weights(module), num_pages=NUM_PAGES,
                         page_size=PAGE_SIZE, dtype="f32")
    traced = []
    real = StepPrograms.compile_decode

    def spy(self, *args, dense=False):
        traced.append(dense)
        return real(self, *args, dense=dense)
    monkeypatch.setattr(StepPrograms, "compile_decode", spy)
    # the 2-row dense loop "copies"; every other program stays in place
    monkeypatch.setattr(StepPrograms, "temp_bytes", lambda self, key: (
        exe.kv_cache.nbytes if key[1] == 2 and traced[-1] else 0))
    with pytest.warns(RuntimeWarning, match="copy of the cache"):
        exe.compile_decode(2, 3, 4)
    assert traced == [True, False]
    assert [f[:3] for f in exe.decode_fallbacks] == [(2, 3, 4)]
    assert exe._programs.has(("decode", 2, 3, 4))
    # a loop that stays in place is kept as compiled, with no second compile
    exe.compile_decode(1, 3, 4)
    assert traced == [True, False, True] and len(exe.decode_fallbacks) == 1
    assert attention.decode_dense(1, 3 * PAGE_SIZE, 8)


def test_default_dtype_follows_the_backend():
    module = build_module(CONFIGS["llama"])
    exe = StepExecutable(module, random_weights(module), num_pages=2, page_size=4)
    want = DType.f32 if jax.default_backend() == "cpu" else DType.bf16
    assert exe.dtype == want and exe.kv_dtype == want


def test_properties_and_dtypes():
    c = CONFIGS["llama"]
    module = build_module(c)
    weights = random_weights(module)
    f32 = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                         dtype="f32")
    assert (f32.num_layers, f32.vocab_size) == (c.num_layers, c.vocab_size)
    assert f32.kv_bytes_per_token == c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4
    bf16 = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                          dtype=DType.bf16)
    assert bf16.kv_bytes_per_token * 2 == f32.kv_bytes_per_token
    assert bf16.kv_cache.dtype == DType.bf16.to_numpy()
    mixed = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                           dtype="bf16", keep_f32=("kv",))
    assert mixed.kv_cache.dtype == np.float32
    args, _ = step_args([([1, 2], 0, [5, 6, 7, 8, 9])])
    want = np.asarray(f32.run(*args))
    for exe in (bf16, mixed):
        got = exe.run(*args)
        assert got.dtype == np.float32
        # bf16 weights and activations: 8 significant bits, rounded at every op
        # boundary (~40 roundings of ~2^-9 relative on the way to the logits), so the
        # logits agree with f32 to a few percent of their scale, not to 1e-4.
        assert_close(got, want, rel=5e-2)


def test_accepts_modules_already_planned_and_cast():
    module = build_module(CONFIGS["gemma3"])
    weights = random_weights(module)
    planned = set_float_dtype(bind_dims(module, {"pages": NUM_PAGES, "page_size": PAGE_SIZE}),
                              DType.bf16)  # what cast-float + plan-kv-cache produce
    pre = StepExecutable(planned, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE)
    assert pre.dtype == DType.bf16 and pre.kv_dtype == DType.bf16
    fresh = StepExecutable(module, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                           dtype="bf16")
    args, _ = step_args([([1, 2], 0, [5, 6, 7, 8, 9])])
    np.testing.assert_array_equal(np.asarray(pre.run(*args)), np.asarray(fresh.run(*args)))
    with pytest.raises(ValueError, match="pages"):
        StepExecutable(planned, weights, num_pages=NUM_PAGES + 1, page_size=PAGE_SIZE)
    with pytest.raises(ValueError, match="bf16"):
        StepExecutable(planned, weights, num_pages=NUM_PAGES, page_size=PAGE_SIZE,
                       dtype="f32")


def test_input_errors():
    module = build_module(CONFIGS["llama"])
    weights = random_weights(module)
    with pytest.raises(ValueError, match="missing"):
        StepExecutable(module, {k: v for k, v in weights.items() if "norm" not in k},
                       num_pages=4, page_size=4)
    bad = dict(weights, **{"model.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        StepExecutable(module, bad, num_pages=4, page_size=4)
    exe = StepExecutable(module, weights, num_pages=4, page_size=4)
    args, _ = step_args([([0], 0, [1, 2])], mp=1)
    args[1] = args[1][:1]
    with pytest.raises(ValueError, match="same length"):
        exe.run(*args)


def test_op_without_rule_fails_at_lowering():
    from jaxrt.ir import Builder, Module, OpDef, TensorType
    from jaxrt.lowering.compile import lower_function
    orphan = OpDef("test.orphan", 1, infer=lambda types, attrs: [types[0]])  # not registered
    m = Module("m")
    b = Builder.new_function(m, "f", [("x", TensorType((2,), DType.f32))])
    b.ret(b(orphan, b.fn.arg("x")))
    with pytest.raises(LoweringError, match="test.orphan"):
        lower_function(m, "f")
