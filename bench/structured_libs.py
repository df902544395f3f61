"""Compare the constrained-decoding libraries jaxrt could use (issue 16): llguidance and
xgrammar, on SmolLM2's tokenizer (49,152 tokens) and a JSON schema.

    PYTHONPATH=$PWD python bench/structured_libs.py [--tokens 64] [--json out.json]

For each library: tokenizer set-up from jaxrt's `tokenizers` tokenizer, grammar compile
time, and the per-token cost of computing the next-token bitmask [1, ceil(V/32)] int32
then advancing the grammar by one token, while greedily walking the grammar (the token
taken is the smallest allowed id that is not EOS, so the walk is deterministic and
identical for both libraries' rules). Host-only: no model runs. Prints a table and
writes JSON.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                 "maxItems": 4},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "string", "pattern": "[0-9]{5}"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "score"],
    "additionalProperties": False,
}


def first_allowed(mask: np.ndarray, vocab: int, eos: set[int]) -> int | None:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    for t in np.flatnonzero(bits):
        if int(t) not in eos:
            return int(t)
    return None


def walk(compute, consume, vocab, eos, tokens):
    """(seconds per mask, seconds per advance, tokens walked)."""
    t_mask = t_adv = 0.0
    n = 0
    for _ in range(tokens):
        t0 = time.perf_counter()
        mask = compute()
        t1 = time.perf_counter()
        tok = first_allowed(mask, vocab, eos)
        if tok is None:
            break
        t2 = time.perf_counter()
        consume(tok)
        t_mask += t1 - t0
        t_adv += time.perf_counter() - t2
        n += 1
    return t_mask / max(n, 1), t_adv / max(n, 1), n


def bench_llguidance(tok, tokens: int) -> dict:
    import llguidance
    import llguidance.numpy as lnp
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_json_str(), n_vocab=tok.vocab_size,
                                   eos_token=list(tok.eos_ids))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    compile_s = time.perf_counter() - t0
    mask = lnp.allocate_token_bitmask(1, tok.vocab_size)

    def compute():
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        return mask[0]
    per_mask, per_adv, n = walk(compute, matcher.consume_token, tok.vocab_size,
                                set(tok.eos_ids), tokens)
    return {"library": "llguidance", "version": llguidance.__version__,
            "tokenizer_setup_s": setup, "compile_s": compile_s, "mask_ms": per_mask * 1e3,
            "advance_ms": per_adv * 1e3, "tokens": n}


def bench_xgrammar(tok, tokens: int) -> dict:
    import torch
    import transformers
    import xgrammar as xgr
    t0 = time.perf_counter()
    # xgrammar reads a transformers tokenizer (or a decoded vocabulary we would have to
    # derive ourselves): wrap jaxrt's `tokenizers` backend.
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                              stop_token_ids=list(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)   # a torch tensor

    def compute():
        matcher.fill_next_token_bitmask(mask, 0)
        return mask[0].numpy()
    per_mask, per_adv, n = walk(compute, matcher.accept_token, tok.vocab_size,
                                set(tok.eos_ids), tokens)
    return {"library": "xgrammar", "version": importlib.metadata.version("xgrammar"),
            "torch": torch.__version__,
            "tokenizer_setup_s": setup, "compile_s": compile_s, "mask_ms": per_mask * 1e3,
            "advance_ms": per_adv * 1e3, "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from jaxrt.frontends.sources import load_model
    tok = load_model(args.model).tokenizer
    rows = [bench_llguidance(tok, args.tokens), bench_xgrammar(tok, args.tokens)]
    print(f"{'library':<11} {'setup s':>8} {'compile s':>9} {'mask ms':>8} {'advance ms':>10}"
          f" {'tokens':>6}")
    for r in rows:
        print(f"{r['library']:<11} {r['tokenizer_setup_s']:8.3f} {r['compile_s']:9.4f} "
              f"{r['mask_ms']:8.3f} {r['advance_ms']:10.4f} {r['tokens']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "vocab": tok.vocab_size, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
