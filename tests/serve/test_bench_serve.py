"""bench/bench_serve.py's HTTP client, which runs in a child process: every streamed
token of every request comes back to the parent, with the timings summarize() reads."""
from __future__ import annotations

from bench import bench_serve
from jaxrt.runtime.engine import Engine
from jaxrt.serve.server import ServerThread
from tests.runtime.fake_model import FakeRunner


def test_http_client_in_a_child_process_streams_every_request():
    engine = Engine(FakeRunner(num_pages=256, page_size=4), max_num_seqs=4, max_model_len=64,
                    warmup=False, log=None)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    with ServerThread(engine, model_name="bench", max_pending=16) as srv:
        results, wall = bench_serve.run_http_client(srv.url, "bench", prompts,
                                                    [0.0, 0.0, 0.01, 0.02], 2, 6)
    assert len(results) == 4 and wall > 0
    for t0, times, n in results:
        assert n == 6 and times and times[0] >= t0 and times == sorted(times)
    summary = bench_serve.summarize(results, wall)
    assert summary["requests"] == 4 and summary["output_tok_s"] == 24 / wall
    assert summary["ttft_p50_ms"] > 0
