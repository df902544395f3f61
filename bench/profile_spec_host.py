"""Host time per engine step of n-gram speculation (and of plain decoding), by cProfile.

    PYTHONPATH=$PWD python bench/profile_spec_host.py [--model fake|smollm2-135m]
        [--out-len 128] [--k 4] [--reps 3] [--top 25] [--plain]

Runs `bench_spec_structured.py`'s ngram prompt (a passage and the request to repeat it)
greedily at batch 1, `--reps` times under cProfile, and splits each run's time into the
device's part (the compiled step call and the reads that wait for it: `run_step`,
`run_decode`, `device_get`, numpy.asarray of the sampled tokens) and the host's (everything else); prints host ms per engine
step and the top functions by own time. `--model fake`: the FakeRunner of the tests
(tiny device work; its output rarely repeats, so few proposals are accepted); `--model
echo`: the FakeRunner's cache and sampling around a step without attention whose greedy
output follows a cycle with a break every few tokens (n-gram proposals often accepted);
`--model null`: the echo model computed on the host (`NullRunner`): no device work, the
wall time is host time (`--decode-steps 8` for plain decoding's loops).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE_FUNCS = ("run_step", "run_decode", "device_get", "block_until_ready")
# numpy.asarray of a device array waits for it: counted where these call it
WAITING_CALLERS = ("unpack_sampled", "_run_and_sample", "_apply_decode")


def device_seconds(stats: pstats.Stats) -> float:
    """Cumulative seconds of the outermost device calls and reads (none of them calls
    another), and of numpy.asarray where it reads a device array."""
    total = 0.0
    for (_, _, name), (_, _, _, cum, callers) in stats.stats.items():
        if name in DEVICE_FUNCS:
            total += cum
        elif "numpy.asarray" in name:
            total += sum(c[3] for (_, _, caller), c in callers.items()
                         if caller in WAITING_CALLERS)
    return total


PERIOD, BREAK = 23, 7  # the echo model's cycle and how often it leaves it


def echo_step(params, tokens, positions, slot_mapping, page_table, context_lens, q_index,
              logit_index, kv):
    """A `@step` with no attention: the next token after token t at position p is
    (t + 1) % PERIOD + 2, except at every BREAK-th position, where it is (t * 5) % PERIOD
    + 2: greedy output runs round a cycle that n-gram proposals follow, with misses."""
    import jax.numpy as jnp
    t, p = tokens[logit_index], positions[logit_index]
    nxt = jnp.where(p % BREAK == 0, (t * 5) % PERIOD, (t + 1) % PERIOD) + 2
    vocab = params[2].shape[0]
    return (jnp.arange(vocab)[None, :] == nxt[:, None]).astype(jnp.float32), kv


def _echo_next(tokens, positions):
    return np.where(positions % BREAK == 0, (tokens * 5) % PERIOD,
                    (tokens + 1) % PERIOD).astype(np.int32) + 2


class NullRunner:
    """The echo model computed on the host, no device at all: the engine's steps then
    take host time only. It does the host work `StepExecutable` does around a call (the
    int32 checks, the shape key, packing the inputs) and returns numpy arrays, so the
    engine's reads cost no transfer."""

    vocab_size, page_size, num_pages, max_model_len = 64, 4, 256, None
    eos_token_ids, tokenizer = (1,), None

    def compile_for(self, *shape) -> float:
        return 0.0

    def compile_decode(self, *shape) -> float:
        return 0.0

    def run_sampled(self, tokens, positions, slot_mapping, page_table, context_lens,
                    q_index, logit_index, sampling, token_bitmask=None):
        from jaxrt.lowering.executable import _bucket
        from jaxrt.runtime import programs
        args = [np.asarray(a, np.int32) for a in (tokens, positions, slot_mapping,
                                                  page_table, context_lens, q_index,
                                                  logit_index)]
        _bucket(*args)
        programs.pack([*args, *sampling])
        out = _echo_next(args[0][args[6]], args[1][args[6]])
        lp = np.zeros(len(out), np.float32)
        if hasattr(programs, "unpack_sampled"):  # one array of both (this branch)
            return np.stack([out, lp.view(np.int32)]), None
        return out, lp, None

    def decode(self, tokens, positions, page_table, steps_left, num_steps, sampling,
               feed=None, feed_at=None):
        from jaxrt.runtime import programs
        feed_at = np.full((2, len(tokens)), -1, np.int32) if feed_at is None else feed_at
        programs.pack([tokens, positions, page_table, steps_left, feed_at, *sampling])
        tok = np.where(feed_at[0] >= 0, feed[np.maximum(feed_at[0], 0),
                                             np.maximum(feed_at[1], 0)]
                       if feed is not None else 0, tokens).astype(np.int32)
        out = np.zeros((num_steps, len(tokens)), np.int32)
        for k in range(num_steps):
            tok = out[k] = _echo_next(tok, positions + k)
        return out, np.zeros(out.shape, np.float32)


def make_engine(model: str, spec: dict | None, out_len: int, decode_steps: int | None):
    from jaxrt.runtime.engine import Engine
    if model == "null":
        return Engine(NullRunner(), max_num_seqs=1, max_model_len=512, speculative=spec,
                      warmup=False, log=None, decode_steps=decode_steps or 1)
    if model in ("fake", "echo"):
        from tests.runtime import fake_model
        from jaxrt.runtime.programs import StepPrograms
        runner = fake_model.FakeRunner(num_pages=256, page_size=4, check=False)
        if model == "echo":  # a runner of its own programs (the fake's are shared)
            programs = StepPrograms(echo_step, page_size=4, pad_slot=256 * 4)
            type(runner)._programs = property(lambda self: programs)
        return Engine(runner, max_num_seqs=1, max_model_len=512, speculative=spec,
                      warmup=True, log=None, decode_steps=decode_steps or 1)
    return Engine(model, max_num_seqs=1, max_model_len=512, speculative=spec,
                  warmup=True, log=None, dtype="float32")


def prompt_for(model: str):
    if model in ("echo", "null"):
        return [2, 3, 4]
    if model == "fake":
        # a passage of 40 ids (no EOS), said twice: the second copy is a perfect n-gram
        # source for the continuation only where the model repeats it; the model's own
        # output repeats itself often enough to give proposals
        passage = [(7 * i + 3) % 61 + 2 for i in range(40)]
        return passage + passage
    from bench.bench_spec_structured import PASSAGE
    return (f"Passage: {PASSAGE}\n\nRewrite the passage above word for word.\n\n"
            f"Rewritten passage:")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fake")
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--plain", action="store_true", help="plain decoding instead")
    ap.add_argument("--wall", action="store_true",
                    help="no profiler: the best run's wall time a step (with --model null, "
                         "host time)")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="fake/echo: the engine's decode_steps (default 1)")
    args = ap.parse_args()
    from jaxrt.runtime.engine import SamplingParams
    spec = None if args.plain else {"method": "ngram", "num_tokens": args.k}
    engine = make_engine(args.model, spec, args.out_len, args.decode_steps)
    prompt = prompt_for(args.model)
    params = SamplingParams(max_tokens=args.out_len, ignore_eos=True)
    engine.generate(prompt, params)  # first runs, every shape this prompt takes
    if args.wall:  # no profiler: the best run's wall per step
        best = float("inf")
        for _ in range(args.reps):
            before = engine.stats().steps
            t0 = time.perf_counter()
            out = engine.generate(prompt, params)[0]
            best = min(best, (time.perf_counter() - t0) / (engine.stats().steps - before))
        print(f"{args.model} {'plain' if args.plain else f'ngram k={args.k}'}: best of "
              f"{args.reps} runs of {len(out.ids)} tokens: {best * 1e3:.4f} ms a step, "
              f"{best * 1e3 * (engine.stats().steps - before) / len(out.ids):.4f} ms a "
              f"token")
        return
    prof = cProfile.Profile()
    steps = wall = 0.0
    for _ in range(args.reps):
        before = engine.stats()
        t0 = time.perf_counter()
        prof.enable()
        out = engine.generate(prompt, params)[0]
        prof.disable()
        wall += time.perf_counter() - t0
        st = engine.stats()
        steps += st.steps - before.steps
    stats = pstats.Stats(prof)
    device = device_seconds(stats)
    print(f"{args.model} {'plain' if args.plain else f'ngram k={args.k}'}: "
          f"{args.reps} x {len(out.ids)} tokens, {steps / args.reps:.0f} engine steps a run, "
          f"acceptance {st.spec_acceptance_rate:.2f}, mean accepted length "
          f"{st.spec_mean_accepted_length:.2f}")
    print(f"per step: wall {wall / steps * 1e3:.3f} ms, device calls and waits "
          f"{device / steps * 1e3:.3f} ms, host (profiled) "
          f"{(stats.total_tt - device) / steps * 1e3:.3f} ms; profiled total "
          f"{stats.total_tt / steps * 1e3:.3f} ms; {stats.total_calls / steps:.0f} "
          f"function calls a step")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
