"""bench/bench_suite.py's CPU-side paths, no engines: reading the peers' output, the
roofline, the parameter counts behind MFU, and redrawing the chart from saved JSON."""
import json

import pytest

from bench import bench_suite, suite_chart

# What shared/peers/peer_gpu.py writes: measurements mixed with facts and errors.
PEER_RECORDS = [
    {"what": "copy_bandwidth_GBps", "value": 4214.5},
    {"model": "smollm2-135m", "what": "weight_bytes", "value": 269030016,
     "roofline_tok_s_b1": 15665.6},
    {"model": "smollm2-135m", "peer": "hf-eager", "batch": 1, "tok_s": 17.2, "seconds": 7.4},
    {"model": "smollm2-135m", "peer": "hf-eager", "batch": 64, "tok_s": 1065.3},
    {"model": "llama-3.2-1b", "peer": "hf-static-compile", "error": "RuntimeError('x')"},
    {"model": "llama-3.2-1b", "peer": "jax-plain-scan", "batch": 64, "tok_s": 14016.3,
     "compile_s": 4.7},
]
POINTS = [
    {"model": "smollm2-135m", "peer": "hf-eager", "batch": 1, "tok_s": 17.2},
    {"model": "smollm2-135m", "peer": "hf-eager", "batch": 64, "tok_s": 1065.3},
    {"model": "llama-3.2-1b", "peer": "jax-plain-scan", "batch": 64, "tok_s": 14016.3},
]


def test_peers_from_the_json_list_file(tmp_path):
    path = tmp_path / "peer_torch.json"
    path.write_text(json.dumps(PEER_RECORDS, indent=1))
    assert suite_chart.load_peers([str(path)]) == POINTS


def test_peers_from_stdout_json_lines_skip_other_lines(tmp_path):
    lines = ["WARNING: something {not json", "device: H100"]
    lines += [json.dumps(r) for r in PEER_RECORDS]
    lines.insert(4, "{broken json")
    path = tmp_path / "peers.log"
    path.write_text("\n".join(lines) + "\n")
    assert suite_chart.load_peers([str(path)]) == POINTS


@pytest.mark.parametrize("bad", [{"batch": 0}, {"batch": True}, {"batch": 2.0},
                                 {"tok_s": float("nan")}, {"tok_s": -1.0}, {"tok_s": "9"},
                                 {"model": None}])
def test_peer_points_refuse_malformed_measurements(bad):
    rec = {"model": "m", "peer": "hf-eager", "batch": 1, "tok_s": 10.0}
    assert suite_chart.peer_points([rec]) == [rec]
    assert suite_chart.peer_points([{**rec, **bad}]) == []


def test_roofline_is_bandwidth_times_batch_capped_by_compute():
    m = {"roofline_tok_s_b1": 100.0, "compute_ceiling_tok_s": 5000.0}
    assert suite_chart.roofline(1, m) == 100.0
    assert suite_chart.roofline(16, m) == 1600.0
    assert suite_chart.roofline(256, m) == 5000.0


def test_param_counts_match_smollm2_135m():
    config = bench_suite.model_config("smollm2-135m", 256)
    total, layers = bench_suite.param_counts(config)
    assert total == 134_515_008  # SmolLM2-135M's published parameter count
    # 30 layers x (q, o: 576^2; k, v: 576 x 192; gate, up, down: 576 x 1536)
    assert layers == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


def _results():
    def model(name, b1, ceiling, rates):
        return {"model": name, "roofline_tok_s_b1": b1, "compute_ceiling_tok_s": ceiling,
                "decode": [{"batch": b, "output_tok_s": r} for b, r in rates],
                "offline": {"output_tok_s": rates[-1][1] * 1.5, "max_num_seqs": 256}}
    return {"device": "NVIDIA H100 80GB HBM3", "copy_bandwidth_GBps": 3000.0,
            "bf16_matmul_TFLOPs": 700.0, "shapes": {"input_len": 128, "output_len": 128},
            "models": [model("smollm2-135m", 11000.0, 2.5e6, [(1, 900), (64, 30000)]),
                       model("llama-3.2-1b", 1200.0, 2.8e5, [(1, 400), (64, 14000)])]}


def test_chart_only_redraws_and_merges_peers(tmp_path):
    results, peers = tmp_path / "suite.json", tmp_path / "peer_jax.json"
    results.write_text(json.dumps(_results()))
    peers.write_text(json.dumps(PEER_RECORDS))
    png, merged = tmp_path / "chart.png", tmp_path / "merged.json"
    assert bench_suite.main(["--chart-only", "--results", str(results), "--peers",
                             str(peers), "--chart", str(png), "--out", str(merged)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(merged.read_text())
    assert data["peers"] == POINTS and data["models"] == _results()["models"]


def test_chart_only_refuses_missing_results(tmp_path, capsys):
    assert bench_suite.main(["--chart-only", "--results", str(tmp_path / "none.json")]) == 2
    assert bench_suite.main(["--chart-only"]) == 2
    err = capsys.readouterr().err
    assert "none.json" in err and "--results" in err
