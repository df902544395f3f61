"""Draft-model speculative decoding at batch 1: speed-up against a forced acceptance rate.

    PYTHONPATH=$PWD python bench/bench_spec_draft.py [--target llama-3.1-8b]
        [--draft llama-3.2-1b] [--k 4] [--rates 0,0.5,0.75,0.9,1] [--json PATH]
    PYTHONPATH=$PWD python bench/bench_spec_draft.py --tiny --json PATH   # CPU-sized

Target and draft are random-weight models at real shapes (bench/bench_gpu.py SHAPES;
bf16 beside an accelerator, f32 on a CPU; `--dtype`), compiled with the same page size
and page count (the draft's cache indexes the target's pages). Random weights accept
almost nothing, so the draft's proposals are replaced, token by token with probability r,
by the target's own greedy tokens (`DraftProposer.force_acceptance`, a benchmark-only
hook; the tokens come from a plain greedy run of the same prompt). The draft still runs
every step, so its cost is in the figures. With independent replacements the expected
tokens per verify step are (1 - r^(k+1)) / (1 - r); the measured ones are reported beside.

Per r: decode tok/s (median of --reps runs, first to last token), speed-up against plain
decoding with the engine's default decode_steps (and against decode_steps=1), measured
acceptance rate, mean accepted length, target and draft steps per output token, and
whether the output equals the plain one (greedy speculation is token-identical up to
float differences between step shapes: bf16 near-ties may diverge). The JSON is written
again after each r (partial results survive a crash); a failing r is recorded and the
rest still run. Prints a table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_gpu import config_for  # noqa: E402
from bench.bench_layers import ViewWeights  # noqa: E402
from jaxrt.frontends.config import ModelConfig  # noqa: E402

# --tiny: CPU-sized target and draft of one vocabulary (the draft a quarter as deep and
# half as wide)
TINY = {"target": dict(hidden_size=256, intermediate_size=704, num_layers=8, num_heads=8,
                       num_kv_heads=4, head_dim=32),
        "draft": dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32)}
TINY_VOCAB = 8192


def tiny_config(which: str, max_len: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=TINY_VOCAB, max_position=max_len,
                       rope_theta=10000.0, model_type=f"tiny-{which}", **TINY[which])


def build(name: str, config: ModelConfig, args, num_pages: int):
    """A random-weight StepExecutable of `config` with `num_pages` pages of 16."""
    from jaxrt.compiler import Target, compile_loaded
    loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{name}")
    t0 = time.perf_counter()
    model = compile_loaded(loaded, target=Target.detect(args.dtype),
                           max_model_len=args.max_model_len, max_num_seqs=1,
                           max_num_batched_tokens=args.budget, num_pages=num_pages,
                           page_size=16)
    exe = model.executable()
    return exe, time.perf_counter() - t0


def decode_rate(engine, prompt, params, reps: int) -> tuple[float, list[int]]:
    """Median decode tok/s over `reps` runs (first to last token) and the last output."""
    rates, ids = [], []
    for _ in range(reps):
        out = engine.generate(prompt, params)[0]
        rates.append((len(out.ids) - 1) / (out.token_times[-1] - out.token_times[0]))
        ids = out.ids
    return float(np.median(rates)), ids


class ForceAcceptance:
    """Replace proposed token j (output position len(output) + j) by the target's greedy
    token there with probability r, independently per token."""

    def __init__(self, reference: list[int], rate: float, seed: int):
        self.reference, self.rate = reference, rate
        self.rng = np.random.default_rng(seed)

    def __call__(self, request, seq, proposal: list[int]) -> list[int]:
        base = len(seq.output_ids)
        out = list(proposal)
        for j in range(len(out)):
            if base + j < len(self.reference) and self.rng.random() < self.rate:
                out[j] = self.reference[base + j]
        return out


def expected_length(r: float, k: int) -> float:
    return float(k + 1) if r >= 1 else (1 - r ** (k + 1)) / (1 - r)


def write(report: dict, path: str | None) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="llama-3.1-8b")
    ap.add_argument("--draft", default="llama-3.2-1b")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models (see TINY)")
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    ap.add_argument("--rates", default="0,0.5,0.75,0.9,1")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256, help="max_num_batched_tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="f32 or bf16 (default: the backend's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    if any(not 0 <= r <= 1 for r in rates):
        ap.error("--rates: each rate must lie in [0, 1]")
    if args.input_len + args.output_len + args.k + 1 > args.max_model_len:
        ap.error("--max-model-len must hold input + output + k + 1 tokens")

    import jax
    from jaxrt.runtime.benchmark import Workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    if args.tiny:
        names = ("tiny-target", "tiny-draft")
        configs = (tiny_config("target", args.max_model_len),
                   tiny_config("draft", args.max_model_len))
    else:
        names = (args.target, args.draft)
        configs = (config_for(args.target, args.max_model_len),
                   config_for(args.draft, args.max_model_len))
    if configs[0].vocab_size != configs[1].vocab_size:
        ap.error(f"{names[0]} and {names[1]} have different vocabularies")
    num_pages = 2 * -(-args.max_model_len // 16)
    report = {"jax": jax.__version__, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "target": names[0],
              "draft": names[1], "k": args.k, "input_len": args.input_len,
              "output_len": args.output_len, "max_model_len": args.max_model_len,
              "num_pages": num_pages, "rows": []}
    target, report["target_load_s"] = build(names[0], configs[0], args, num_pages)
    draft, report["draft_load_s"] = build(names[1], configs[1], args, num_pages)
    report["dtype"] = target.dtype.value
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)

    prompt = Workload(1, args.input_len, args.output_len, seed=args.seed).prompts(
        configs[0].vocab_size)[0]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    kw = dict(max_num_seqs=1, max_num_batched_tokens=args.budget,
              max_model_len=args.max_model_len, warmup=True, log=sys.stderr)
    plain = Engine(target, **kw)
    report["plain_decode_steps"] = plain.decode_steps
    plain.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))  # first runs
    report["plain_tok_s"], reference = decode_rate(plain, prompt, params, args.reps)
    del plain
    one = Engine(target, decode_steps=1, **kw)
    report["plain_steps1_tok_s"], _ = decode_rate(one, prompt, params, args.reps)
    del one
    write(report, args.json)
    print(f"plain: {report['plain_tok_s']:.1f} tok/s (decode_steps="
          f"{report['plain_decode_steps']}), {report['plain_steps1_tok_s']:.1f} tok/s "
          f"(decode_steps=1)", flush=True)

    engine = Engine(target, speculative={"method": "draft", "model": draft,
                                         "num_tokens": args.k}, **kw)
    report["spec_warmup_s"] = engine.stats().warmup_seconds
    for i, r in enumerate(rates):
        row = {"rate": r, "expected_mean_accepted_length": expected_length(r, args.k)}
        try:
            engine.drafter.force_acceptance = ForceAcceptance(reference, r, args.seed + i)
            engine.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
            before = engine.stats()
            rate, ids = decode_rate(engine, prompt, params, args.reps)
            after = engine.stats()
            proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            verifies = after.steps - before.steps  # (one prefill step per run included)
            tokens = args.reps * len(ids)
            first_diff = next((j for j, (a, b) in enumerate(zip(ids, reference)) if a != b),
                              None)
            row.update({
                "decode_tok_s": rate, "speedup": rate / report["plain_tok_s"],
                "speedup_vs_steps1": rate / report["plain_steps1_tok_s"],
                "acceptance_rate": accepted / proposed if proposed else 0.0,
                "mean_accepted_length": (accepted + verifies - args.reps) /
                (verifies - args.reps) if verifies > args.reps else 0.0,
                "target_steps_per_token": verifies / tokens,
                "draft_steps_per_token": (after.spec_draft_steps
                                          - before.spec_draft_steps) / tokens,
                "identical": ids == reference, "first_difference": first_diff,
                "compiles_after_warmup": after.compiles_after_warmup})
        except Exception as e:  # keep the other rates: record it and go on
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        report["rows"].append(row)
        write(report, args.json)
        print(json.dumps(row), flush=True)

    print(f"\n{names[0]} + draft {names[1]}, k={args.k}, batch 1, {report['dtype']}, "
          f"{report['device']}: plain {report['plain_tok_s']:.1f} tok/s")
    print(f"{'r':>5} {'tok/s':>8} {'speed-up':>8} {'vs s=1':>7} {'accept':>7} "
          f"{'len':>5} {'E[len]':>6} {'tgt/tok':>7} {'drf/tok':>7} {'same':>5}")
    for row in report["rows"]:
        if "error" in row:
            print(f"{row['rate']:>5.2f} error: {row['error']}")
            continue
        print(f"{row['rate']:>5.2f} {row['decode_tok_s']:>8.1f} {row['speedup']:>7.2f}x "
              f"{row['speedup_vs_steps1']:>6.2f}x {row['acceptance_rate']:>7.2f} "
              f"{row['mean_accepted_length']:>5.2f} "
              f"{row['expected_mean_accepted_length']:>6.2f} "
              f"{row['target_steps_per_token']:>7.2f} {row['draft_steps_per_token']:>7.2f} "
              f"{str(row['identical']):>5}")


if __name__ == "__main__":
    main()
