"""Issue 16's figures: n-gram speculation on a prompt that repeats its input, and the
cost of structured output at a batch, on the real SmolLM2 (or any model jaxrt loads).

    PYTHONPATH=$PWD python bench/bench_spec_structured.py [--model smollm2-135m]
        [--random llama-3.2-1b] [--only structured] [--reps 3] [--batch 64]
        [--out-len 128] [--k 4] [--json bench/results/spec_structured.json]

1. ngram: batch 1, greedy, a summarization-style prompt that quotes a passage and asks
   for it back. Plain vs `speculative={"method": "ngram", "num_tokens": k}`: decode
   tok/s, speed-up, acceptance rate, mean accepted length, and whether the outputs are
   token-identical.
2. structured: `--batch` requests decoding `--out-len` tokens, unconstrained vs every
   row constrained by a permissive regex (the mask allows most of the vocabulary, the
   costly case for mask computation), by an enum JSON schema (forces most tokens, so
   random weights give valid output), and half the rows by the regex; output tok/s and
   the ratios. Constrained batches decode one step a call (the split decode step, no
   K-step loops), so on accelerators this also prices that.
3. mask: the sampled step of one decode bucket (N = --batch rows) run directly, without
   a mask and with an all-ones mask (the masked variant), ms per call: what "pass an
   all-ones mask always" would cost unconstrained batches.
Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import json
import time

import numpy as np

PASSAGE = ("The committee met on Tuesday to review the budget for the coming year. "
           "Members agreed that spending on roads and schools should rise, while the "
           "costs of administration should fall by a tenth. The chair asked each "
           "department to send a revised plan by the end of the month, and said that "
           "the final budget would be published in the spring after a public hearing.")


def ngram(model, tokenizer, k: int, out_len: int, profile: bool = False) -> dict:
    from jaxrt.runtime.engine import Engine, SamplingParams
    prompt = (f"Passage: {PASSAGE}\n\nRewrite the passage above word for word.\n\n"
              f"Rewritten passage:")
    params = SamplingParams(max_tokens=out_len, ignore_eos=True)
    rows = {}
    for name, spec in (("plain", None), ("ngram", {"method": "ngram", "num_tokens": k})):
        engine = Engine(model, tokenizer=tokenizer, max_num_seqs=1, max_model_len=512,
                        speculative=spec,
                        warmup=True, log=None)
        engine.generate(prompt, SamplingParams(max_tokens=4))  # first runs
        before = engine.stats()
        t0 = time.perf_counter()
        out = engine.generate(prompt, params)[0]
        wall = time.perf_counter() - t0
        st = engine.stats()
        decode = out.token_times[-1] - out.token_times[0]
        rows[name] = {"ids": out.ids, "decode_tok_s": (len(out.ids) - 1) / decode,
                      "wall_s": wall, "steps": st.steps - before.steps,
                      "acceptance_rate": st.spec_acceptance_rate,
                      "mean_accepted_length": st.spec_mean_accepted_length}
        if profile:  # the same generation traced: host and device time a step
            from bench.profile_trace import profile_steps
            with profile_steps(engine) as prof:
                engine.generate(prompt, params)
            rows[name]["profile"] = prof.analyze()
            print(f"profile {name}: {json.dumps(rows[name]['profile'])[:1500]}", flush=True)
    return {"k": k, "out_len": out_len,
            "identical": rows["plain"]["ids"] == rows["ngram"]["ids"],
            "speedup": rows["ngram"]["decode_tok_s"] / rows["plain"]["decode_tok_s"],
            **{f"{n}_{key}": v for n, r in rows.items() for key, v in r.items()
               if key != "ids"}}


# A schema whose enums force most tokens: random weights still produce valid output
# (a free-text regex would let them run to max_tokens on anything)
ENUM_SCHEMA = {"type": "array", "items": {
    "type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue", "cyan", "magenta", "yellow"]},
        "size": {"enum": ["small", "medium", "large"]},
        "ok": {"type": "boolean"}},
    "required": ["colour", "size", "ok"], "additionalProperties": False},
    "minItems": 100}  # rows run to out_len, as the unconstrained ones do


def structured(model, tokenizer, batch: int, out_len: int, reps: int = 1,
               profile: bool = False, cprofile: int = 0) -> dict:
    """Output tok/s of `batch` requests decoding `out_len` tokens: unconstrained, every row
    under a permissive regex, every row under an enum JSON schema, and half the rows under
    the regex beside unconstrained ones ("mixed"). Each variant is first run once at the
    full batch (its programs compile there, not in the timed run); the best of `reps`."""
    from jaxrt.runtime.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer=tokenizer, max_num_seqs=batch,
                    max_model_len=64 + out_len, warmup=True,
                    log=None)
    prompts = [f"Item {i}: describe a colour in a few words." for i in range(batch)]
    regex = {"regex": r"[a-zA-Z0-9 ,.;:'-]+"}
    variants = {"plain": [{}] * batch, "regex": [regex] * batch,
                "json": [{"json_schema": ENUM_SCHEMA}] * batch,
                "mixed": [regex if i % 2 else {} for i in range(batch)],
                # the regex again with the masks filled after the bookkeeping, not beside
                # it (the other variants overlap them, whatever the default here)
                "regex_serial": [regex] * batch}
    out = {}
    from jaxrt.runtime import structured as st
    default_overlap = st.OVERLAP_FILL
    for name, extras in variants.items():
        st.OVERLAP_FILL = name != "regex_serial"
        engine.generate(prompts, [SamplingParams(max_tokens=4, ignore_eos=True, **x)
                                  for x in extras])  # compiles
        best = 0.0
        for _ in range(reps):
            params = [SamplingParams(max_tokens=out_len, ignore_eos=True, **x)
                      for x in extras]
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            wall = time.perf_counter() - t0
            best = max(best, sum(len(o.ids) for o in outs) / wall)
        out[f"{name}_tok_s"] = best
        if name == "json":  # an unbounded array: every row runs to out_len
            out["json_tokens"] = sum(len(o.ids) for o in outs)
            out["json_sample"] = outs[0].text[:120]
    st.OVERLAP_FILL = default_overlap
    if cprofile:  # the host's Python under the regex, by function (cProfile)
        import cProfile
        import io
        import pstats
        params = [SamplingParams(max_tokens=out_len, ignore_eos=True, **x)
                  for x in variants["regex"]]
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        engine.generate(prompts, params)
        prof.disable()
        out["regex_cprofile_wall_s"] = time.perf_counter() - t0
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(cprofile)
        stats.sort_stats("cumulative").print_stats(cprofile)
        out["regex_cprofile"] = text.getvalue()
        print(text.getvalue(), flush=True)
    if profile:  # one traced run of 32 tokens a row, unconstrained and under the regex
        from bench.profile_trace import profile_steps
        for name in ("plain", "regex"):
            params = [SamplingParams(max_tokens=32, ignore_eos=True, **x)
                      for x in variants[name]]
            with profile_steps(engine) as prof:
                engine.generate(prompts, params)
            out[f"{name}_profile"] = p = prof.analyze()
            print(f"profile {name}: {json.dumps(p)[:1500]}", flush=True)
    for name in ("regex", "json", "mixed", "regex_serial"):
        out[f"{name}_ratio"] = out[f"{name}_tok_s"] / out["plain_tok_s"]
    out["ratio"] = out["regex_ratio"]
    out["batch"], out["out_len"], out["reps"] = batch, out_len, reps
    out["decode_steps"] = engine.decode_steps
    return out


def mask_cost(runner, batch: int, max_pages: int, vocab: int, reps: int = 20) -> dict:
    import jax
    from jaxrt.runtime.programs import greedy_sampling
    from jaxrt.runtime.structured import bitmask_words
    i32 = np.int32
    n = batch
    args = (np.zeros(n, i32), np.zeros(n, i32), np.full(n, runner.num_pages * runner.page_size,
                                                        i32),
            np.zeros((n, max_pages), i32), np.zeros(n, i32), np.full((n, 1), n, i32),
            np.arange(n, dtype=i32))
    ones = np.full((n, bitmask_words(vocab)), -1, np.int32)
    res = {}
    for name, kw in (("no_mask", {}), ("all_ones_mask", {"token_bitmask": ones})):
        jax.block_until_ready(runner.run_sampled(*args, greedy_sampling(n), **kw))
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(runner.run_sampled(*args, greedy_sampling(n), **kw))
        res[f"{name}_ms"] = (time.perf_counter() - t0) / reps * 1e3
    res["overhead"] = res["all_ones_mask_ms"] / res["no_mask_ms"] - 1
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also trace a plain and a regex run (structured), a plain and an ngram "
                         "run (ngram) (bench/profile_trace.py): host and device time a "
                         "step, top kernels")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="structured: also run the regex variant under cProfile and print "
                         "its top N functions (the host's Python a constrained step)")
    ap.add_argument("--only", choices=("ngram", "structured", "mask"), default=None,
                    help="run one part")
    ap.add_argument("--reps", type=int, default=1, help="structured: best of this many")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 on accelerators")
    ap.add_argument("--random", default=None,
                    help="random weights of this model's shapes (e.g. llama-3.2-1b) with "
                         "SmolLM2's tokenizer (its ids below the model's vocabulary)")
    ap.add_argument("--tokenizer", default=None,
                    help="with --random: SmolLM2's tokenizer from this JSON file "
                         "({tokenizer, bos_id, eos_ids}, written by --save-tokenizer) "
                         "instead of the model package (a GPU run without the GGUF)")
    ap.add_argument("--save-tokenizer", default=None,
                    help="write SmolLM2's tokenizer for --tokenizer here and exit")
    args = ap.parse_args()
    if args.save_tokenizer:
        from jaxrt.compiler import load
        tok = load("smollm2-135m", max_model_len=64, max_num_seqs=1).tokenizer
        with open(args.save_tokenizer, "w") as f:
            json.dump({"tokenizer": tok.to_json_str(), "bos_id": tok.bos_id,
                       "eos_ids": list(tok.eos_ids)}, f)
        return
    import jax
    from jaxrt.compiler import load
    if args.random:  # random weights of a model's shapes, SmolLM2's tokenizer
        from types import SimpleNamespace
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.bench_gpu import config_for
        from bench.bench_layers import ViewWeights
        from jaxrt.compiler import compile_loaded
        if args.tokenizer:
            from jaxrt.frontends.tokenizer import Tokenizer
            with open(args.tokenizer) as f:
                saved = json.load(f)
            tokenizer = Tokenizer.from_json_str(saved["tokenizer"], bos_id=saved["bos_id"],
                                                eos_ids=saved["eos_ids"])
        else:
            tokenizer = load("smollm2-135m", max_model_len=64, max_num_seqs=1).tokenizer
        config = config_for(args.random, 64 + max(args.out_len, 448))
        compiled = compile_loaded(SimpleNamespace(
            config=config, weights=ViewWeights(config), tokenizer=tokenizer,
            chat_template=None, source=f"random:{args.random}"),
            max_model_len=64 + max(args.out_len, 448), max_num_seqs=args.batch)
        args.model = f"random:{args.random}"
    else:
        compiled = load(args.model, max_model_len=64 + max(args.out_len, 448),
                        max_num_seqs=args.batch, dtype=args.dtype)
    model = compiled.executable()
    report = {"model": args.model, "backend": jax.default_backend(),
              "device": str(jax.devices()[0])}
    part = args.only
    if part in (None, "ngram"):
        g = report["ngram"] = ngram(model, compiled.tokenizer, args.k, args.out_len,
                                     args.profile)
        print(f"ngram k={g['k']}: plain {g['plain_decode_tok_s']:.1f} tok/s, ngram "
              f"{g['ngram_decode_tok_s']:.1f} tok/s, speed-up {g['speedup']:.2f}x, "
              f"acceptance {g['ngram_acceptance_rate']:.2f}, mean accepted length "
              f"{g['ngram_mean_accepted_length']:.2f}, identical {g['identical']}")
    if part in (None, "structured"):
        s = report["structured"] = structured(model, compiled.tokenizer, args.batch,
                                              args.out_len, args.reps, args.profile,
                                              args.cprofile)
        print(f"structured batch {s['batch']}: plain {s['plain_tok_s']:.1f} tok/s, regex "
              f"{s['regex_tok_s']:.1f} ({s['regex_ratio']:.3f}), json "
              f"{s['json_tok_s']:.1f} ({s['json_ratio']:.3f}: {s['json_sample']!r}), "
              f"half constrained {s['mixed_tok_s']:.1f} ({s['mixed_ratio']:.3f}), regex with "
              f"the masks filled after the bookkeeping {s['regex_serial_tok_s']:.1f} "
              f"({s['regex_serial_ratio']:.3f})")
    if part in (None, "mask"):
        mp = -(-(64 + args.out_len) // model.page_size)
        m = report["mask"] = mask_cost(model, args.batch, mp, model.vocab_size)
        print(f"sampled step N={args.batch}: no mask {m['no_mask_ms']:.2f} ms, all-ones "
              f"mask {m['all_ones_mask_ms']:.2f} ms ({m['overhead'] * 100:+.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
