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


def test_sleep_runner_serves_both_paths(tmp_path):
    """`--sleep-runner`: no model, steps that sleep as the GPU's take; every scenario runs
    over HTTP and in-process, each request makes exactly --output-len tokens."""
    import json
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--sleep-runner", "--rates", "inf", "--num-prompts", "6",
                             "--concurrency", "3", "--input-len", "8", "--output-len", "5",
                             "--max-num-seqs", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["scenario"], r["path"]) for r in result["rows"]}
    assert rows == {(s, p) for s in ("rate inf", "concurrency 3")
                    for p in ("http", "in-process")}
    for r in result["rows"]:
        assert r["requests"] == 6 and r["output_tok_s"] == 30 / r["wall_s"]
    assert len(result["overhead"]) == 2
