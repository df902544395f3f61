"""Serving benchmark over HTTP (like `vllm bench serve`), against the same workload run
in-process, so the HTTP layer's overhead is measured and nothing else.

    python bench/bench_serve.py --model smollm2-135m --rates 1,4 --concurrency 8   # CPU
    python bench/bench_serve.py --model llama-3.2-1b --random-weights \\
        --rates 4,16,inf --concurrency 64 --num-prompts 256                        # GPU

One Engine is built; each scenario (Poisson arrivals at each request rate, then a fixed
concurrency) runs twice on it: through `jaxrt.serve` (uvicorn on 127.0.0.1, streaming
/v1/completions, token-id prompts, greedy, ignore_eos so every request makes exactly
--output-len tokens; the HTTP client runs in a child process, as a load generator does,
so its Python shares neither the server's interpreter nor its GIL) and in-process (the same `EngineLoop` the server uses, no HTTP).
Per scenario: TTFT and TPOT p50/p99 (ms) and output tok/s for both, and the HTTP
overhead (HTTP tok/s / in-process tok/s; TTFT difference). A table is printed and
JSON written (--out).

Targets (GPU, Llama-3.2-1B shapes, 64 concurrent streams): HTTP >= 90% of in-process
tok/s; at low load HTTP TTFT within 5 ms of in-process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profile_structured_host import HostRunner  # noqa: E402


class SleepRunner(HostRunner):
    """A runner with no model (`HostRunner`): each call first sleeps as long as the
    Llama-3.2-1B shape's step takes on one H100 (a prefill step ~4 ms + 10 us a token; a
    decode step 1.2 ms + 8 us a row: 1.7 ms at 64 rows). Serving's host side (HTTP, the
    engine loop, the scheduler) then runs at GPU pace on any machine (`--sleep-runner`)."""

    decode_forward = None  # no split decode step: every call here sleeps its time

    def __init__(self):
        super().__init__(32000, (2,))

    def run_sampled(self, tokens, *args, **kwargs):
        time.sleep(0.004 + 1e-5 * len(tokens))
        return super().run_sampled(tokens, *args, **kwargs)

    def decode(self, tokens, positions, page_table, steps_left, num_steps, *args, **kwargs):
        time.sleep(num_steps * (0.0012 + 8e-6 * len(tokens)))
        return super().decode(tokens, positions, page_table, steps_left, num_steps, *args,
                              **kwargs)


def build_engine(args):
    from jaxrt.runtime.engine import Engine
    max_len = args.input_len + args.output_len
    kw = dict(max_num_seqs=args.max_num_seqs, max_model_len=max_len, log=sys.stderr,
              warmup=True)
    if args.sleep_runner:
        return Engine(SleepRunner(), **{**kw, "warmup": False},
                      max_num_batched_tokens=args.budget, decode_steps=8)
    if not args.random_weights:
        return Engine(args.model, **kw)
    from types import SimpleNamespace

    from bench.bench_gpu import RandomWeights, config_for
    from jaxrt.compiler import compile_loaded
    config = config_for(args.model, max_len)
    loaded = SimpleNamespace(config=config, weights=RandomWeights(config), tokenizer=None,
                             chat_template=None, source=f"random:{args.model}")
    model = compile_loaded(loaded, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.budget)
    return Engine(model.executable(), **kw)


def make_prompts(args, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    return [rng.integers(100, min(vocab, 30000), args.input_len).tolist()
            for _ in range(args.num_prompts)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps with mean 1/rate (all at 0 for rate=inf)."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


async def _drive(starts, concurrency, one):
    """Run one(i) for every prompt, starting i at starts[i] (s from now), at most
    `concurrency` at once."""
    sem = asyncio.Semaphore(concurrency or len(starts))
    t0 = time.perf_counter()

    async def go(i):
        delay = starts[i] - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            return await one(i)

    results = await asyncio.gather(*(go(i) for i in range(len(starts))))
    return results, time.perf_counter() - t0


async def run_http(url, model, prompts, starts, concurrency, output_len):
    """The load generator (aiohttp, as `vllm bench serve` uses: httpx took ~8 ms a
    request to send 64 at once on a 2-core CPU, spreading a burst over half a second)."""
    import aiohttp
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=None)) as hc:
        # open the connections first (a request of one token each, `concurrency` at
        # once), as a long-running client holds them: the timed run then measures the
        # server, not this process's TCP and HTTP set-up of tens of connections at once
        warm = {"model": model, "prompt": prompts[0], "max_tokens": 1, "temperature": 0}

        async def warm_one(_):
            async with hc.post(url + "/v1/completions", json=warm) as r:
                r.raise_for_status()
                await r.read()
        await asyncio.gather(*(warm_one(i) for i in range(max(concurrency, 1))))

        async def one(i):
            body = {"model": model, "prompt": prompts[i], "max_tokens": output_len,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            t0 = time.perf_counter()
            times = []
            async with hc.post(url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                        times.append(time.perf_counter())
            return t0, times, output_len
        return await _drive(starts, concurrency, one)


def run_http_client(url, model, prompts, starts, concurrency, output_len):
    """`run_http` in a child process, as a load generator is (`vllm bench serve` too): the
    client's request building and SSE parsing do not share the server's interpreter and
    its GIL. -> (results, wall) as `run_http` gives them (times on the child's clock)."""
    import subprocess
    import tempfile
    spec = {"url": url, "model": model, "prompts": prompts, "starts": starts,
            "concurrency": concurrency, "output_len": output_len}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--http-client",
                               f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"the HTTP client failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return [tuple(r) for r in out["results"]], out["wall"]


def _client_main(spec_file: str) -> int:
    with open(spec_file) as f:
        spec = json.load(f)
    results, wall = asyncio.run(run_http(spec["url"], spec["model"], spec["prompts"],
                                         spec["starts"], spec["concurrency"],
                                         spec["output_len"]))
    print(json.dumps({"results": results, "wall": wall}))
    return 0


async def run_inprocess(loop, prompts, starts, concurrency, output_len):
    from jaxrt.runtime.request import SamplingParams
    from jaxrt.serve.engine_loop import Submission
    aloop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    counter = iter(range(1 << 30))

    async def one(i):
        q: asyncio.Queue = asyncio.Queue()
        rid = f"bench-{next(counter)}"
        t0 = time.perf_counter()
        loop.submit([Submission(rid, prompts[i], params)],
                    lambda ev: aloop.call_soon_threadsafe(q.put_nowait, ev))
        times = []
        while True:
            ev = await q.get()
            if isinstance(ev, tuple):
                if ev[0] == "error":
                    raise ev[2]
                continue
            if ev.ids:
                times.append(time.perf_counter())
            if ev.finish_reason is not None:
                return t0, times, output_len
    return await _drive(starts, concurrency, one)


def summarize(results, wall: float) -> dict:
    ttft = [times[0] - t0 for t0, times, _ in results if times]
    # TPOT per request: time after the first token / tokens after it (chunks may carry
    # several tokens; the count is exact because ignore_eos fixes it)
    tpot = [(times[-1] - times[0]) / (n - 1) for _, times, n in results if n > 1 and times]
    out_tokens = sum(n for _, _, n in results)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else None  # noqa: E731
    return {"requests": len(results), "wall_s": wall, "output_tok_s": out_tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sleep-runner", action="store_true",
                   help="no model: a runner that sleeps as the 1B GPU steps take "
                        "(SleepRunner), to study the serving host side on a CPU")
    p.add_argument("--random-weights", action="store_true",
                   help="real shapes from bench/bench_gpu.py SHAPES, random weights")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rates", default="1,4", help="Poisson request rates (req/s); inf ok")
    p.add_argument("--concurrency", type=int, default=8,
                   help="the fixed-concurrency scenario (all requests queued at once)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--http-client", default=None, help=argparse.SUPPRESS)  # the child
    args = p.parse_args(argv)
    if args.http_client:
        return _client_main(args.http_client)
    if args.max_num_seqs is None:
        args.max_num_seqs = max(args.concurrency, 8)
    rates = [float(r) for r in args.rates.split(",") if r]

    from jaxrt.serve.engine_loop import EngineLoop
    from jaxrt.serve.server import ServerThread
    engine = build_engine(args)
    prompts = make_prompts(args, engine.vocab_size)
    scenarios = [(f"rate {r:g}", arrivals(len(prompts), r, args.seed), 0) for r in rates]
    scenarios.append((f"concurrency {args.concurrency}", [0.0] * len(prompts),
                      args.concurrency))
    rows = []
    with ServerThread(engine, model_name="bench", max_pending=len(prompts) + 8) as srv:
        # one warm-up request per path: first-call costs stay out of the numbers
        run_http_client(srv.url, "bench", prompts[:1], [0.0], 1, 2)
        for name, starts, conc in scenarios:
            res, wall = run_http_client(srv.url, "bench", prompts, starts, conc,
                                        args.output_len)
            rows.append({"scenario": name, "path": "http", **summarize(res, wall)})
    loop = EngineLoop(engine, max_pending=len(prompts) + 8)
    loop.start()
    try:
        for name, starts, conc in scenarios:
            res, wall = asyncio.run(run_inprocess(loop, prompts, starts, conc,
                                                  args.output_len))
            rows.append({"scenario": name, "path": "in-process", **summarize(res, wall)})
    finally:
        loop.shutdown()
    overhead = []
    for name, _, _ in scenarios:
        h = next(r for r in rows if r["scenario"] == name and r["path"] == "http")
        i = next(r for r in rows if r["scenario"] == name and r["path"] == "in-process")
        overhead.append({"scenario": name,
                         "http_over_inprocess_tok_s": h["output_tok_s"] / i["output_tok_s"],
                         "ttft_p50_delta_ms": h["ttft_p50_ms"] - i["ttft_p50_ms"]})
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{'scenario':<16} {'path':<10} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
    for r in rows:
        print(f"{r['scenario']:<16} {r['path']:<10} {fmt(r['output_tok_s']):>8} "
              f"{fmt(r['ttft_p50_ms']):>9} {fmt(r['ttft_p99_ms']):>9} "
              f"{fmt(r['tpot_p50_ms']):>9} {fmt(r['tpot_p99_ms']):>9}")
    for o in overhead:
        print(f"{o['scenario']:<16} HTTP/in-process tok/s {o['http_over_inprocess_tok_s']:.3f}"
              f", TTFT p50 +{o['ttft_p50_delta_ms']:.1f} ms")
    result = {"args": vars(args), "rows": rows, "overhead": overhead,
              "backend": __import__("jax").default_backend()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
