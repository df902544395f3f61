"""Target.detect on a CPU: the device memory is the host memory available now, and the KV
cache is capped (CPU_KV_CACHE_CAP_GIB, or kv_cache_max_gib)."""
from __future__ import annotations

import pytest

from jaxrt import compiler
from jaxrt.compiler import CPU_KV_CACHE_CAP_GIB, Target, available_host_memory

GIB = 1 << 30
MEMINFO = """MemTotal:       24683792 kB
MemFree:        23613016 kB
MemAvailable:   20971520 kB
Buffers:          109436 kB
"""


def test_meminfo_available_is_read_in_bytes(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert available_host_memory(str(path)) == 20 * GIB


@pytest.mark.parametrize("text", ["MemTotal: 1 kB\n", "MemAvailable:\n", "MemAvailable: x kB\n"])
def test_meminfo_without_a_usable_line_falls_back_to_sysconf(tmp_path, monkeypatch, text):
    path = tmp_path / "meminfo"
    path.write_text(text)
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(compiler.os, "sysconf", lambda name: pages[name])
    assert available_host_memory(str(path)) == 1000 * 4096
    assert available_host_memory(str(tmp_path / "missing")) == 1000 * 4096


def test_unknown_memory_is_zero(tmp_path, monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)
    monkeypatch.setattr(compiler.os, "sysconf", no_sysconf)
    assert available_host_memory(str(tmp_path / "missing")) == 0


def test_cpu_target_uses_available_memory_and_the_default_cap(monkeypatch):
    monkeypatch.setattr(compiler, "available_host_memory", lambda: 10 * GIB)
    t = Target.detect()
    assert t.backend == "cpu" and t.dtype == "f32"
    assert t.device_memory_bytes == 10 * GIB
    assert t.kv_cache_cap_bytes == int(CPU_KV_CACHE_CAP_GIB * GIB)
    assert t.to_dict()["kv_cache_cap_bytes"] == t.kv_cache_cap_bytes


def test_cpu_target_cap_option(monkeypatch):
    monkeypatch.setattr(compiler, "available_host_memory", lambda: 10 * GIB)
    assert Target.detect(kv_cache_max_gib=1.5).kv_cache_cap_bytes == int(1.5 * GIB)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kv_cache_max_gib must be > 0"):
            Target.detect(kv_cache_max_gib=bad)


def test_the_plan_follows_the_available_memory(monkeypatch):
    """A budget (not the cap) binds when little memory is available."""
    from jaxrt.frontends.build import build_module
    from jaxrt.frontends.config import ModelConfig
    from jaxrt.passes import PassManager

    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=256)

    def planned(available, max_num_seqs):
        monkeypatch.setattr(compiler, "available_host_memory", lambda: available)
        m = build_module(cfg)
        m.attributes["config"] = cfg.to_dict()
        m.attributes["target"] = Target.detect().to_dict()
        PassManager(f"plan-kv-cache{{max-num-seqs={max_num_seqs}}}").run(m)
        return m.attributes["kv_cache"]

    small = planned(GIB // 16, 1000)
    assert small["budget"]["device_bytes"] == GIB // 16
    assert small["num_pages"] == small["budget"]["cache_budget_bytes"] // (16 * 512)
    large = planned(64 * GIB, 100_000)  # the cap binds: 4 GiB of 512-byte tokens
    assert large["num_pages"] == int(CPU_KV_CACHE_CAP_GIB * GIB) // (16 * 512)
