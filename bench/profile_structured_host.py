"""Host time of structured output's split decode step, with no device work at all.

    PYTHONPATH=$PWD python bench/profile_structured_host.py [--batch 64] [--vocab 128256]
        [--tokens 128] [--reps 6] [--plain] [--serial] [--profile 25]
        [--tokenizer FILE]

The engine runs over a runner whose decode forward returns at once and whose masked
sampler takes, on the host, the lowest allowed token id >= 224 of each row's bitmask (a
token the grammar allows that is neither EOS nor a control token), so the wall time of a
step is the host's: the scheduler's bookkeeping, the grammars (llguidance) and the
inputs of the next call. Every row is constrained by bench_spec_structured's permissive
regex (`--plain`: unconstrained, its K-step decode loops). `--serial` fills the masks
after the bookkeeping instead of beside it (`structured.OVERLAP_FILL = False`). Prints the
best of `--reps` runs in ms a token step; `--profile N` adds cProfile's top N functions.
The tokenizer is SmolLM2's (the model package, or `--tokenizer` as written by
bench_spec_structured.py --save-tokenizer); `--vocab` is the model's (the bitmask's) size.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REGEX = r"[a-zA-Z0-9 ,.;:'-]+"   # bench_spec_structured.py's permissive regex


def lowest_allowed(logits, bitmask, sampling):
    """The masked sampler's stand-in: per row the lowest allowed id >= 224."""
    words = np.asarray(bitmask).view(np.uint32).copy()
    words[:, :7] = 0
    first = np.argmax(words != 0, axis=1)
    w = words[np.arange(len(words)), first]
    bit = np.log2((w & (~w + np.uint32(1))).astype(np.float64)).astype(np.int32)
    tokens = (first * 32 + bit).astype(np.int32)
    return tokens[None], np.zeros((1, len(tokens)), np.float32)


class HostRunner:
    """No model: decode loops return token 100, a decode forward returns at once."""

    page_size, num_pages, max_model_len, tokenizer = 16, 4096, None, None

    def __init__(self, vocab_size: int, eos_token_ids):
        self.vocab_size, self.eos_token_ids = vocab_size, tuple(eos_token_ids)

    def compile_for(self, *shape) -> float:
        return 0.0

    def compile_decode(self, *shape) -> float:
        return 0.0

    def compile_decode_forward(self, *shape) -> float:
        return 0.0

    def run_sampled(self, tokens, positions, slot_mapping, page_table, context_lens,
                    q_index, logit_index, sampling, token_bitmask=None):
        n = len(logit_index)
        return np.stack([np.full(n, 100, np.int32), np.zeros(n, np.int32)]), None

    def decode(self, tokens, positions, page_table, steps_left, num_steps, sampling,
               feed=None, feed_at=None):
        return (np.full((num_steps, len(tokens)), 100, np.int32),
                np.zeros((num_steps, len(tokens)), np.float32))

    def decode_forward(self, tokens, positions, page_table, steps_left, feed=None,
                       feed_at=None):
        return np.zeros((len(tokens), 1), np.float32)


def tokenizer_from(path: str | None):
    if path is None:
        from jaxrt.compiler import load
        return load("smollm2-135m", max_model_len=64, max_num_seqs=1).tokenizer
    from jaxrt.frontends.tokenizer import Tokenizer
    with open(path) as f:
        saved = json.load(f)
    return Tokenizer.from_json_str(saved["tokenizer"], bos_id=saved["bos_id"],
                                   eos_ids=saved["eos_ids"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=128, help="tokens a request makes")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--plain", action="store_true", help="unconstrained rows instead")
    ap.add_argument("--serial", action="store_true",
                    help="fill the masks after the bookkeeping (OVERLAP_FILL = False)")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args(argv)
    from jaxrt.runtime import structured
    saved = structured.sample_masked, structured.OVERLAP_FILL
    structured.sample_masked = lowest_allowed
    structured.OVERLAP_FILL = not args.serial
    try:
        return _run(args)
    finally:  # the module as it was (main may run inside another program's process)
        structured.sample_masked, structured.OVERLAP_FILL = saved


def _run(args) -> int:
    from jaxrt.runtime.engine import Engine, SamplingParams
    tok = tokenizer_from(args.tokenizer)
    engine = Engine(HostRunner(args.vocab, tok.eos_ids), tokenizer=tok,
                    max_num_seqs=args.batch, max_model_len=64 + args.tokens, warmup=False,
                    log=None, decode_steps=8)
    extra = {} if args.plain else {"regex": REGEX}
    prompts = [[1, 2, 3, 4 + i] for i in range(args.batch)]

    def params(n):
        return [SamplingParams(max_tokens=n, ignore_eos=True, **extra) for _ in prompts]
    engine.generate(prompts, params(8))  # matchers' templates, first calls
    best = float("inf")
    for _ in range(args.reps):
        ps = params(args.tokens)
        t0 = time.perf_counter()
        engine.generate(prompts, ps)
        best = min(best, time.perf_counter() - t0)
    what = "plain" if args.plain else ("regex, serial fill" if args.serial else "regex")
    print(f"{what}, batch {args.batch}, vocab {args.vocab}: {best / args.tokens * 1e3:.3f} "
          f"ms of host a token step (best of {args.reps})")
    if args.profile:
        ps = params(args.tokens)
        prof = cProfile.Profile()
        prof.enable()
        engine.generate(prompts, ps)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
