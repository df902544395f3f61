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

from jaxrt.runtime.programs import StepPrograms, greedy_sampling, pack

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


def _step_contract(params, tokens, positions, slot_mapping, page_table, context_lens,
                   q_index, logit_index, kv):
    """`_step` in the argument order of the `@step` contract (jaxrt.runtime.programs)."""
    return _step(params, kv, tokens, positions, slot_mapping, page_table, context_lens,
                 q_index, logit_index)


# shared by every FakeRunner of one cache shape: compile once per shape
_PROGRAMS: dict[tuple[int, int], StepPrograms] = {}
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
                 max_model_len: int | None = None, check: bool = True,
                 w_out: np.ndarray | None = None):
        """`w_out` u32[VOCAB, DIM]: another output matrix (a different model of the same
        vocabulary, e.g. a speculative draft that agrees with W_OUT on some rows)."""
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
        self._own_params = None if w_out is None else \
            (*_params()[:2], jnp.asarray(np.asarray(w_out, np.uint32)))

    def _params(self):
        return _params() if self._own_params is None else self._own_params

    @property
    def _programs(self) -> StepPrograms:
        key = (self.num_pages, self.page_size)
        if key not in _PROGRAMS:
            _PROGRAMS[key] = StepPrograms(_step_contract, page_size=self.page_size,
                                          pad_slot=self.num_pages * self.page_size)
        return _PROGRAMS[key]

    def compile_for(self, T: int, S: int, Q: int, MP: int, N: int) -> float:
        return self._programs.compile_step((T, S, Q, MP, N), self._params(), self._kv)

    def compile_decode(self, S: int, MP: int, num_steps: int) -> float:
        return self._programs.compile_decode(S, MP, num_steps, self._params(), self._kv)

    def run_sampled(self, tokens, positions, slot_mapping, page_table, context_lens,
                    q_index, logit_index, sampling, token_bitmask=None):
        args = (tokens, positions, slot_mapping, page_table, context_lens, q_index,
                logit_index)
        self._check(args)
        shape = (len(tokens), *page_table.shape[:1], q_index.shape[1], page_table.shape[1],
                 len(logit_index))
        words = 0 if token_bitmask is None else token_bitmask.shape[1]
        if not self._programs.has(self._programs.step_key(shape, words)):
            self.compiles_in_run += 1
            self._programs.compile_step(shape, self._params(), self._kv, words)
        extra = [] if token_bitmask is None else [token_bitmask]
        sampled, logits, self._kv = self._programs.run_step(
            shape, self._params(), pack([*args, *sampling, *extra]), self._kv, words)
        self.runs += 1
        return sampled, logits

    def run(self, tokens, positions, slot_mapping, page_table, context_lens, q_index,
            logit_index) -> jax.Array:
        return self.run_sampled(tokens, positions, slot_mapping, page_table, context_lens,
                                q_index, logit_index, greedy_sampling(len(logit_index)))[1]

    def decode(self, tokens, positions, page_table, steps_left, num_steps, sampling,
               feed=None, feed_at=None):
        """As StepExecutable.decode; checks the contract of every step the loop runs by
        computing its inputs here as the loop does on the device."""
        s, mp = page_table.shape
        ps, pad = self.page_size, self.num_pages * self.page_size
        rows = np.arange(s, dtype=np.int32)
        for k in range(num_steps):
            pos = (positions + k).astype(np.int32)
            live = k < steps_left
            page = page_table[rows, np.minimum(pos // ps, mp - 1)]
            slots = np.where(live, page * ps + pos % ps, pad).astype(np.int32)
            ctx = np.where(live, pos + 1, 0).astype(np.int32)
            q_index = np.where(live, rows, s).astype(np.int32)[:, None]
            # the tokens fed are the loop's own: only their count and places are checked
            self._check((np.zeros(s, np.int32), pos, slots, page_table, ctx, q_index, rows))
        if not self._programs.has(("decode", s, mp, num_steps)):
            self.compiles_in_run += 1
            self.compile_decode(s, mp, num_steps)
        if feed_at is None:
            feed_at = np.full((2, s), -1, np.int32)
        packed = pack([tokens, positions, page_table, steps_left, feed_at, *sampling])
        out_tokens, out_lp, self._kv = self._programs.run_decode(
            s, mp, num_steps, self._params(), packed, feed, self._kv)
        self.runs += 1
        return out_tokens, out_lp

    def compile_decode_forward(self, S: int, MP: int) -> float:
        return self._programs.compile_decode_forward(S, MP, self._params(), self._kv)

    def decode_forward(self, tokens, positions, page_table, steps_left, feed=None,
                       feed_at=None):
        """As StepExecutable.decode_forward, its step's inputs checked as in `decode`."""
        s, mp = page_table.shape
        ps, pad = self.page_size, self.num_pages * self.page_size
        rows = np.arange(s, dtype=np.int32)
        live = steps_left > 0
        page = page_table[rows, np.minimum(positions // ps, mp - 1)]
        slots = np.where(live, page * ps + positions % ps, pad).astype(np.int32)
        ctx = np.where(live, positions + 1, 0).astype(np.int32)
        q_index = np.where(live, rows, s).astype(np.int32)[:, None]
        self._check((np.zeros(s, np.int32), positions.astype(np.int32), slots, page_table,
                     ctx, q_index, rows))
        if not self._programs.has(("decode-forward", s, mp)):
            self.compiles_in_run += 1
            self.compile_decode_forward(s, mp)
        if feed_at is None:
            feed_at = np.full((2, s), -1, np.int32)
        packed = pack([tokens, positions, page_table, steps_left, feed_at,
                       *greedy_sampling(s)])
        logits, self._kv = self._programs.run_decode_forward(s, mp, self._params(), packed,
                                                             feed, self._kv)
        self.runs += 1
        return logits

    def _check(self, args) -> None:
        if self.check:
            check_step_inputs(args, num_pages=self.num_pages, page_size=self.page_size,
                              written=self._written)
        slots = args[2]
        real = slots < self.num_pages * self.page_size
        self._written[slots[real]] = True
