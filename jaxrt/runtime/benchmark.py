"""Offline serving workloads and their figures (what `jaxrt bench` prints).

Workloads submit every request at once (an offline batch), with random prompt tokens and
`ignore_eos`, so each request produces exactly `output_len` tokens.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from jaxrt.errors import SettingError
from .request import SamplingParams


@dataclass(frozen=True)
class Workload:
    num_requests: int = 16
    input_len: int = 64
    output_len: int = 64
    shared_prefix_len: int = 0  # > 0: every prompt starts with the same prefix of this length
    seed: int = 0

    def __post_init__(self):
        if self.num_requests < 1 or self.input_len < 1 or self.output_len < 1:
            raise SettingError("num_requests, input_len and output_len must be >= 1")
        if not 0 <= self.shared_prefix_len < self.input_len:
            raise SettingError("shared_prefix_len must be in [0, input_len)")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        low = min(16, vocab_size - 1)  # keep clear of the usual special-token ids
        prefix = rng.integers(low, vocab_size, self.shared_prefix_len).tolist()
        return [prefix + rng.integers(low, vocab_size,
                                      self.input_len - self.shared_prefix_len).tolist()
                for _ in range(self.num_requests)]


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run_workload(engine, workload: Workload, *, warm_prefix: bool = True) -> dict:
    """Run `workload` on `engine`; returns the figures as a dict.

    With a shared prefix and `warm_prefix`, one request with the prefix runs first (not
    timed), as a serving system that has seen the prefix before would have it cached.
    """
    prompts = workload.prompts(engine.vocab_size)
    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True)
    if workload.shared_prefix_len and warm_prefix:
        engine.generate([prompts[0][:workload.shared_prefix_len] + prompts[0][:1]],
                        SamplingParams(max_tokens=1, ignore_eos=True))
    before = engine.stats()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    after = engine.stats()
    out_tokens = sum(len(o.ids) for o in outs)
    ttfts = [o.ttft for o in outs if o.ttft is not None]
    tpots = [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1)
             for o in outs if len(o.token_times) > 1]
    return {
        "workload": asdict(workload),
        "requests": len(outs),
        "output_tokens": out_tokens,
        "wall_s": wall,
        "output_tok_s": out_tokens / wall,
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
        "tpot_p50_s": _pct(tpots, 50), "tpot_p99_s": _pct(tpots, 99),
        # where the wall went: runner calls (steps; decode_loops of them ran several
        # decode steps) and when the last request got its first token
        "engine_steps": after.steps - before.steps,
        "decode_loops": after.decode_loops - before.decode_loops,
        "ttft_max_s": max(ttfts) if ttfts else None,
        "prefix_cache_hit_rate": after.prefix_cache_hit_rate,
        "preemptions": after.preemptions - before.preemptions,
        "compile_s": after.warmup_seconds,
        "compiles_after_warmup": after.compiles_after_warmup,
        # speculative decoding, over this workload's requests (0 without it)
        **_spec_figures(outs),
    }


def _spec_figures(outs) -> dict:
    """Acceptance rate (accepted / proposed tokens) and mean accepted length (tokens a
    sequence gains per verify step: accepted + 1) over `outs`' speculative statistics."""
    stats = [o.speculative for o in outs if o.speculative is not None]
    verifies = sum(s.verifies for s in stats)
    accepted = sum(s.accepted for s in stats)
    return {"spec_acceptance_rate": _rate(accepted, sum(s.proposed for s in stats)),
            "spec_mean_accepted_length": _rate(accepted + verifies, verifies),
            "spec_verifies": verifies}


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def format_table(rows: list[dict]) -> str:
    """The workloads' figures, a row each; with speculative decoding in any row, two
    more columns: its acceptance rate and mean accepted length."""
    spec = any(r.get("spec_verifies") for r in rows)
    head = (f"{'scenario':<28} {'reqs':>5} {'in':>5} {'out':>5} {'prefix':>6} {'tok/s':>9} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'hit':>5} "
            f"{'compile':>8}" + (f" {'accept':>6} {'len':>5}" if spec else ""))
    lines = [head, "-" * len(head)]

    def ms(x):
        return f"{x * 1e3:>7.1f}ms" if x is not None else f"{'-':>9}"

    for r in rows:
        w = r["workload"]
        lines.append(
            f"{r.get('scenario', ''):<28} {w['num_requests']:>5} {w['input_len']:>5} "
            f"{w['output_len']:>5} {w['shared_prefix_len']:>6} {r['output_tok_s']:>9.1f} "
            f"{ms(r['ttft_p50_s'])} {ms(r['ttft_p99_s'])} {ms(r['tpot_p50_s'])} "
            f"{ms(r['tpot_p99_s'])} {r['prefix_cache_hit_rate']:>5.2f} {r['compile_s']:>7.1f}s"
            + (f" {r.get('spec_acceptance_rate', 0.0):>6.2f} "
               f"{r.get('spec_mean_accepted_length', 0.0):>5.2f}" if spec else ""))
    return "\n".join(lines)
