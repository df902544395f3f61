"""bench/bench_kernels.py: its comparisons, and one tiny run on a CPU, where
JAXRT_KERNELS=on must change nothing (no Hopper GPU: the step lowers with XLA alone)."""
import json

import numpy as np

from bench import bench_kernels


def test_first_divergence():
    assert bench_kernels.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench_kernels.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench_kernels.first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early


def test_compare_logits():
    a = np.array([[1.0, 4.0, 2.0], [0.5, -1.0, 3.0]], np.float32)
    b = a.copy()
    b[1] = [3.5, -1.0, 3.0]  # argmax moves in row 1; the largest |diff| is 3.0
    got = bench_kernels.compare_logits(a, b)
    assert got["argmax_agree"] == 0.5
    assert np.isclose(got["max_abs_diff_over_max_abs"], 3.0 / 4.0)


def test_tiny_run_on_a_cpu_kernels_on_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRT_KERNELS", "off")  # restored after: the bench sets it itself
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--tiny", "--models", "tiny", "--out", str(out)]) == 0
    (m,) = json.loads(out.read_text())["models"]
    off, on = m["modes"]
    assert (off["kernels"], on["kernels"]) == ("off", "on")
    assert off["backends"] == on["backends"] == ["xla"]
    assert m["prefill_logits"] == {"max_abs_diff_over_max_abs": 0.0, "argmax_agree": 1.0}
    assert m["decode_logits"] == {"max_abs_diff_over_max_abs": 0.0, "argmax_agree": 1.0}
    assert m["greedy"]["identical_rows"] == m["greedy"]["rows"] == 8
    for r in (off, on):
        assert r["compiles_after_warmup"] == 0 and r["decode_b16"]["output_tok_s"] > 0
        assert r["prefill"]["tokens"] == 64


def test_prefill_bench_tiny_with_a_quantized_mode(tmp_path, monkeypatch):
    # bench_prefill --tiny runs on a CPU: one row per (model, -q mode), the quantized
    # row's tok/s as a multiple of float's at the same kernel mode and length
    from bench import bench_prefill
    monkeypatch.setenv("JAXRT_KERNELS", "off")
    out = tmp_path / "prefill.json"
    assert bench_prefill.main(["--tiny", "--modes", "off", "--quantize", ",w8a8",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]
    assert [(r["model"], r["quantize"]) for r in rows] == [("tiny", ""), ("tiny", "w8a8")]
    for r in rows:
        assert r["modes"]["off"]["64"]["tok_s"] > 0 and "error" not in r["modes"]["off"]
    speed = rows[1]["speedup_vs_float"]["off/64"]
    assert speed == rows[1]["modes"]["off"]["64"]["tok_s"] / rows[0]["modes"]["off"]["64"]["tok_s"]
