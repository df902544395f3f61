"""A toy runner with the exact `StepExecutable` contract, for testing the runtime without
a real model.

The "model" keeps one u32 vector per token in a paged cache `kv[pages, page_size, D]`
(v = emb[token] + pos_vec(position)) and, for a query at position p, "attends" over its
sequence's cached tokens: state = sum_{j <= p} v_j * coef[(p - j) % C], all in wrapping
u32 arithmetic. Logits are a hash of the state, scaled into [0, 16) f32. Integer sums
are order-independent, so outputs are bit-identical whatever the batching, chunking,
bucket shapes or page placement, and any mistake (a wrong slot, page, position or
context length) changes the state and, almost surely, the argmax.

`reference_logits(tokens)` computes the same thing densely, without a cache.
`check_step_inputs` asserts the `@step` contract on every call (see docs/architecture.md).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 64
DIM = 8
RING = 61          # distance coefficients repeat every RING positions
EOS = 1
# one character per token id; EOS decodes to nothing (a special token)
ALPHABET = "_<abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
assert len(ALPHABET) == VOCAB

_rng = np.random.default_rng(20240611)
EMB = _rng.integers(0, 2**32, (VOCAB, DIM), dtype=np.uint64).astype(np.uint32)
COEF = _rng.integers(1, 2**32, (RING,), dtype=np.uint64).astype(np.uint32)
W_OUT = _rng.integers(0, 2**32, (VOCAB, DIM), dtype=np.uint64).astype(np.uint32)
_U = np.uint32


def _pos_vec(xp, positions):
    """u32[..., DIM] from int positions."""
    x = positions.astype(xp.uint32)[..., None] * _U(0x9E3779B1) \
        + xp.arange(DIM, dtype=xp.uint32) * _U(0x85EBCA77)
    x = x ^ (x >> _U(16))
    x = x * _U(0x7FEB352D)
    return x ^ (x >> _U(15))


def _logits(xp, state, w_out):
    """state u32[N, DIM] -> f32[N, VOCAB] in [0, 16)."""
    x = xp.sum(state[:, None, :] * w_out[None], axis=-1, dtype=xp.uint32)
    x = x ^ (x >> _U(15))
    x = x * _U(0x2C1B3C6D)
    x = x ^ (x >> _U(12))
    x = x * _U(0x297A2D39)
    x = x ^ (x >> _U(15))
    return (x >> _U(16)).astype(xp.float32) / xp.float32(4096.0)


def reference_logits(tokens) -> np.ndarray:
    """Next-token logits f32[VOCAB] after the full sequence `tokens` (dense, no cache)."""
    tokens = np.asarray(tokens, np.int64)
    pos = np.arange(len(tokens))
    v = EMB[tokens] + _pos_vec(np, pos)
    w = COEF[(len(tokens) - 1 - pos) % RING]
    state = np.sum(w[:, None] * v, axis=0, dtype=np.uint32)
    return _logits(np, state[None], W_OUT)[0]


def reference_greedy(prompt, max_tokens: int, *, ignore_eos: bool = False) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        token = int(np.argmax(reference_logits(seq)))
        out.append(token)
        seq.append(token)
        if token == EOS and not ignore_eos:
            break
    return out


def _step(params, kv, tokens, positions, slot_mapping, page_table, context_lens, q_index,
          logit_index):
    emb, coef, w_out = params
    pages, ps, dim = kv.shape
    T, (S, MP) = tokens.shape[0], page_table.shape
    v = emb[tokens] + _pos_vec(jnp, positions)                              # [T, D]
    kv = kv.reshape(pages * ps, dim).at[slot_mapping].set(v, mode="drop").reshape(kv.shape)
    keys = kv[page_table].reshape(S, MP * ps, dim)                         # [S, L, D]
    k_pos = jnp.arange(MP * ps)
    q_pos = positions[jnp.minimum(q_index, T - 1)]                         # [S, Q]
    mask = ((q_index < T)[:, :, None] & (k_pos < context_lens[:, None, None])
            & (k_pos <= q_pos[:, :, None]))                                # [S, Q, L]
    w = jnp.where(mask, coef[jnp.remainder(q_pos[:, :, None] - k_pos, RING)], _U(0))
    state = jnp.sum(w[..., None] * keys[:, None], axis=2, dtype=jnp.uint32)  # [S, Q, D]
    out = jnp.zeros((T, dim), jnp.uint32).at[q_index.reshape(-1)].set(
        state.reshape(-1, dim), mode="drop")
    return _logits(jnp, out[logit_index], w_out), kv


_JITTED = jax.jit(_step, donate_argnums=(1,))
_COMPILED: dict[tuple, object] = {}   # shared by every FakeRunner: compile once per shape
_PARAMS: list = []


def _params():
    if not _PARAMS:
        _PARAMS.append(tuple(jnp.asarray(a) for a in (EMB, COEF, W_OUT)))
    return _PARAMS[0]


class FakeTokenizer:
    eos_ids = (EOS,)

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i] for i in ids if not (skip_special_tokens and i == EOS))


ARG_NAMES = ("tokens", "positions", "slot_mapping", "page_table", "context_lens", "q_index",
             "logit_index")


def check_step_inputs(args, *, num_pages: int, page_size: int, written: np.ndarray) -> None:
    """Assert the `@step` contract, and that every key a row may attend to was written
    (by this step or an earlier one). `written` is a bool[pages * page_size] shadow."""
    for name, a, rank in zip(ARG_NAMES, args, (1, 1, 1, 2, 1, 2, 1)):
        assert isinstance(a, np.ndarray) and a.dtype == np.int32 and a.ndim == rank, \
            f"{name}: {type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}"
    tokens, positions, slots, page_table, ctx, q_index, logit_index = args
    T, (S, MP), cap, ps = len(tokens), page_table.shape, num_pages * page_size, page_size
    assert len(positions) == len(slots) == T and len(ctx) == S == len(q_index)
    assert (slots >= 0).all() and (positions >= 0).all() and (ctx >= 0).all()
    real = slots < cap
    assert len(np.unique(slots[real])) == real.sum(), "two tokens write the same slot"
    assert ((page_table >= 0) & (page_table < num_pages)).all(), "page out of range"
    queried = q_index[q_index < T]
    assert len(np.unique(queried)) == len(queried), "a token is queried twice"
    assert set(queried.tolist()) == set(np.nonzero(real)[0].tolist()), \
        "every real token must be queried exactly once, padding never"
    now = written.copy()
    now[slots[real]] = True
    for s in range(S):
        rows = q_index[s][q_index[s] < T]
        if not len(rows):
            assert ctx[s] == 0, f"padding row {s} has context {ctx[s]}"
            continue
        assert 0 < ctx[s] <= MP * ps, f"row {s}: context {ctx[s]} vs {MP} pages"
        for i in rows:
            p = positions[i]
            assert p < ctx[s], f"row {s}: query position {p} >= context {ctx[s]}"
            assert slots[i] == page_table[s, p // ps] * ps + p % ps, \
                f"row {s}: token {i} writes slot {slots[i]}, its page table says otherwise"
        key_pos = np.arange(ctx[s])
        key_slots = page_table[s, key_pos // ps] * ps + key_pos % ps
        assert now[key_slots].all(), f"row {s} attends to never-written slots"
    assert ((logit_index >= 0) & (logit_index < T)).all()


class FakeRunner:
    """`StepExecutable`-like: run / compile_for / vocab_size / num_pages / page_size,
    plus tokenizer, eos_token_ids and max_model_len for the Engine."""

    def __init__(self, num_pages: int = 64, page_size: int = 4,
                 max_model_len: int | None = None, check: bool = True):
        self.num_pages, self.page_size = num_pages, page_size
        self.vocab_size = VOCAB
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.eos_token_ids = (EOS,)
        self.check = check
        self.runs = 0
        self.compiles_in_run = 0     # shapes first seen by run(), not compile_for()
        self._kv = jnp.zeros((num_pages, page_size, DIM), jnp.uint32)
        self._written = np.zeros(num_pages * page_size, bool)

    def _key(self, T, S, Q, MP, N):
        return (T, S, Q, MP, N, self.num_pages, self.page_size)

    def compile_for(self, T: int, S: int, Q: int, MP: int, N: int) -> float:
        key = self._key(T, S, Q, MP, N)
        if key in _COMPILED:
            return 0.0
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        start = time.perf_counter()
        _COMPILED[key] = _JITTED.lower(_params(), self._kv, i32(T), i32(T), i32(T),
                                       i32(S, MP), i32(S), i32(S, Q), i32(N)).compile()
        return time.perf_counter() - start

    def run(self, tokens, positions, slot_mapping, page_table, context_lens, q_index,
            logit_index) -> jax.Array:
        args = (tokens, positions, slot_mapping, page_table, context_lens, q_index,
                logit_index)
        if self.check:
            check_step_inputs(args, num_pages=self.num_pages, page_size=self.page_size,
                              written=self._written)
        shape = (len(tokens), *page_table.shape[:1], q_index.shape[1], page_table.shape[1],
                 len(logit_index))
        if self._key(*shape) not in _COMPILED:
            self.compiles_in_run += 1
            self.compile_for(*shape)
        logits, self._kv = _COMPILED[self._key(*shape)](_params(), self._kv, *args)
        real = slot_mapping < self.num_pages * self.page_size
        self._written[slot_mapping[real]] = True
        self.runs += 1
        return logits
