"""The persistent cache of materialized weights (jaxrt/weight_cache.py)."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from jaxrt import weight_cache
from jaxrt.compiler import compile_loaded, load, load_engine, save_engine
from jaxrt.frontends.loaded import LazyWeights
from jaxrt.frontends.sources import load_model
from jaxrt.ir.weights import materialize, resident_weights
from tests.frontends.frontends_synth import write_tiny_gguf, write_tiny_hf_dir


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXRT_CACHE_DIR", str(root))
    monkeypatch.setenv("JAXRT_WEIGHT_CACHE", "on")  # tests/conftest.py turns it off
    return root / "weights"


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf", layers=2)


@pytest.fixture
def source_reads(monkeypatch):
    """Names of the source tensors read (dequantized) through any LazyWeights."""
    reads: list[str] = []
    original = LazyWeights.__getitem__

    def counting(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(LazyWeights, "__getitem__", counting)
    return reads


def resident(model) -> dict[str, np.ndarray]:
    """What the executable would place on the device."""
    return materialize(model.module, model.weights, resident_weights(model.module))


def reference(model) -> dict[str, np.ndarray]:
    """The same weights computed from a fresh read of the file, no cache involved."""
    return materialize(model.module, load_model(model.source).weights,
                       resident_weights(model.module))


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit-exact copies


def entries(root) -> list[str]:
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_hit_after_miss_serves_identical_weights_and_tokens(cache_root, gguf, source_reads):
    from jaxrt.lowering.executable import greedy_generate

    cold = load(gguf, max_model_len=64)
    assert cold.stats["weight_cache"]["status"] == "miss"
    assert any("model.layers.0:2" in n for n in resident_weights(cold.module))  # stacked
    cold_exe = cold.executable()
    info = cold.stats["weight_cache"]
    assert info["status"] == "written" and os.path.isfile(info["path"])
    # The cold path materializes once: each source tensor is dequantized exactly once.
    assert sorted(source_reads) == sorted(set(source_reads))
    assert set(source_reads) == set(load_model(gguf).weights)
    cold_tokens = greedy_generate(cold_exe, [1, 5, 9, 3], 6)

    source_reads.clear()
    warm = load(gguf, max_model_len=64)
    assert warm.stats["weight_cache"]["status"] == "hit"
    assert warm.stats["weight_cache"]["key"] == info["key"]
    warm_exe = warm.executable()
    assert source_reads == []  # the hit path reads no source tensor
    assert_same(resident(warm), reference(cold))
    assert greedy_generate(warm_exe, [1, 5, 9, 3], 6) == cold_tokens
    assert entries(cache_root) == [info["key"]]


def test_the_kv_plan_is_not_in_the_key(cache_root, gguf):
    a = load(gguf, max_model_len=64, max_num_seqs=2)
    b = load(gguf, max_model_len=128, max_num_seqs=8, page_size=8)
    assert a.kv_plan != b.kv_plan
    assert a.stats["weight_cache"]["key"] == b.stats["weight_cache"]["key"]


def test_a_changed_source_file_misses(cache_root, gguf):
    first = load(gguf)
    resident(first)
    key = first.stats["weight_cache"]["key"]
    st = os.stat(gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched only
    touched = load(gguf)
    assert touched.stats["weight_cache"]["status"] == "miss"
    assert touched.stats["weight_cache"]["key"] != key

    write_tiny_gguf(gguf, layers=2, seed=1)  # new weights, same path
    changed = load(gguf)
    assert changed.stats["weight_cache"]["status"] == "miss"
    got = resident(changed)
    assert_same(got, reference(changed))
    assert not np.array_equal(got["model.embed_tokens.weight"],
                              resident(first)["model.embed_tokens.weight"])


@pytest.mark.parametrize("variant", [{"outline_layers": False}, {"dtype": "bf16"}])
def test_a_different_pipeline_misses(cache_root, gguf, variant):
    base = load(gguf)
    resident(base)
    other = load(gguf, **variant)
    assert other.stats["weight_cache"]["status"] == "miss"
    assert other.stats["weight_cache"]["key"] != base.stats["weight_cache"]["key"]
    got = resident(other)
    assert_same(got, reference(other))
    again = load(gguf, **variant)
    assert again.stats["weight_cache"]["status"] == "hit"
    assert_same(resident(again), got)
    if "dtype" in variant:
        assert {a.dtype.name for a in got.values()} == {"bfloat16"}


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\xff" * 64)


def _truncated(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)


def _wrong_names(path):
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, path)


def _wrong_shape(path):
    """The right names and dtypes, one shape changed: a valid file for another module."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(path, framework="numpy") as f:
        arrays = {n: f.get_tensor(n) for n in f.keys()}
    arrays["model.norm.weight"] = np.zeros(arrays["model.norm.weight"].size + 1, np.float32)
    save_file(arrays, path)


def _wrong_dtype(path):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(path, framework="numpy") as f:
        arrays = {n: f.get_tensor(n) for n in f.keys()}
    arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.float16)
    save_file(arrays, path)


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _wrong_names, _wrong_shape,
                                     _wrong_dtype])
def test_a_corrupt_entry_is_ignored_and_rewritten(cache_root, gguf, corrupt):
    first = load(gguf)
    resident(first)  # materialized and written
    # Computed without the cache: arrays served from the entry map its file, which the
    # corruption below rewrites in place (jaxrt never does that to a file in use).
    expected = reference(first)
    path = first.stats["weight_cache"]["path"]
    corrupt(path)
    second = load(gguf)
    assert second.stats["weight_cache"]["status"] == "miss"
    assert_same(resident(second), expected)
    assert second.stats["weight_cache"]["status"] == "written"
    third = load(gguf)
    assert third.stats["weight_cache"]["status"] == "hit"
    assert_same(resident(third), expected)


def test_an_entry_truncated_while_in_use_is_recomputed(cache_root, gguf):
    first = load(gguf)
    resident(first)
    expected = reference(first)
    warm = load(gguf)
    assert warm.stats["weight_cache"]["status"] == "hit"  # its file is open now
    path = warm.stats["weight_cache"]["path"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert_same(resident(warm), expected)  # refused before any tensor is mapped
    assert warm.stats["weight_cache"]["status"] == "written"
    assert load(gguf).stats["weight_cache"]["status"] == "hit"


def test_a_dead_writers_temporary_file_is_never_read(cache_root, gguf):
    first = load(gguf)
    resident(first)
    path = first.stats["weight_cache"]["path"]
    os.replace(path, os.path.join(os.path.dirname(path), ".weights.safetensors.1.ab.tmp"))
    assert load(gguf).stats["weight_cache"]["status"] == "miss"


def test_an_unwritable_cache_still_serves_the_weights(cache_root, gguf):
    os.makedirs(cache_root.parent)
    cache_root.write_text("a file where the weights directory should be")
    model = load(gguf)
    assert_same(resident(model), reference(model))
    assert model.stats["weight_cache"]["status"] == "unwritten"


def test_off_writes_nothing(cache_root, gguf, monkeypatch):
    monkeypatch.setenv("JAXRT_WEIGHT_CACHE", "off")
    model = load(gguf)
    assert model.stats["weight_cache"] == {"status": "off"}
    model.executable()
    assert not os.path.exists(cache_root.parent)


def test_weights_without_source_files_are_not_cached(cache_root, gguf):
    loaded = load_model(gguf)
    bench = SimpleNamespace(config=loaded.config, weights=dict(loaded.weights),
                            tokenizer=None, chat_template=None, source="random:tiny")
    model = compile_loaded(bench)
    assert model.stats["weight_cache"]["status"] == "no source files"
    assert model.weights is bench.weights
    # A real path with weights that are not the reader's (edited in memory): not cached.
    edited = SimpleNamespace(**{**vars(bench), "source": gguf})
    assert compile_loaded(edited).weights is edited.weights
    resident(model)
    assert not os.path.exists(cache_root)


def test_hugging_face_directories_are_cached(cache_root, tmp_path, source_reads):
    root = write_tiny_hf_dir(tmp_path / "hf")
    first = load(root)
    expected = resident(first)
    assert first.stats["weight_cache"]["status"] == "written"
    source_reads.clear()
    second = load(root)
    assert second.stats["weight_cache"]["status"] == "hit"
    assert_same(resident(second), expected)
    assert source_reads == []
    with open(os.path.join(root, "config.json")) as f:
        config = json.load(f)
    config["rms_norm_eps"] = 1e-6  # config.json is part of the source identity
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    st = os.stat(os.path.join(root, "config.json"))
    os.utime(os.path.join(root, "config.json"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**6))
    assert load(root).stats["weight_cache"]["status"] == "miss"


def test_the_cache_keeps_the_most_recently_used_entries(cache_root, tmp_path):
    paths = [write_tiny_gguf(tmp_path / f"m{i}.gguf", layers=1, seed=i)
             for i in range(weight_cache.MAX_ENTRIES + 2)]
    keys = []
    for p in paths:
        model = load(p)
        resident(model)
        keys.append(model.stats["weight_cache"]["key"])
        assert len(entries(cache_root)) <= weight_cache.MAX_ENTRIES
    assert keys[-1] in entries(cache_root)


def test_prune_deletes_the_least_recently_used(tmp_path):
    for i, name in enumerate("abcdef"):
        os.makedirs(tmp_path / name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))  # f is the most recent
    os.utime(tmp_path / "a", (5000, 5000))  # a was just used (a hit touches its entry)
    deleted = weight_cache.prune(str(tmp_path), 3, keep=str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "f"]
    assert sorted(os.path.basename(p) for p in deleted) == ["c", "d", "e"]


def test_save_engine_from_cached_weights(cache_root, gguf, tmp_path):
    resident(load(gguf))
    warm = load(gguf)
    assert warm.stats["weight_cache"]["status"] == "hit"
    save_engine(warm, str(tmp_path / "engine"))
    engine = load_engine(str(tmp_path / "engine"))
    assert_same({n: engine.weights[n] for n in resident_weights(engine.module)},
                reference(warm))


def test_materialize_uses_given_results_of_defined_weights(gguf):
    model = load(gguf)
    module = model.module
    stacked = next(n for n in resident_weights(module) if n in module.weight_defs)
    full = reference(model)
    given = {stacked: full[stacked]}  # and none of its per-layer sources
    assert_same(materialize(module, given, [stacked]), {stacked: full[stacked]})
    wrong = {stacked: full[stacked].astype(np.float16)}
    with pytest.raises(ValueError, match="declares"):
        materialize(module, wrong, [stacked])
    with pytest.raises(ValueError, match="missing"):
        materialize(module, {}, [stacked])


def test_a_hit_maps_the_file_aligned_and_jax_uses_it_in_place(cache_root, gguf):
    """Weights from the cache are read-only views of the file, 64-byte aligned, so JAX's
    CPU client places them without a copy; the file stays a valid safetensors file."""
    import jax
    from safetensors import safe_open
    first = load(gguf)
    written = resident(first)
    path = first.stats["weight_cache"]["path"]
    with safe_open(path, framework="numpy") as f:
        assert_same({n: f.get_tensor(n) for n in written}, written)
    hit = load(gguf)
    got = resident(hit)
    assert hit.stats["weight_cache"]["status"] == "hit"
    assert_same(got, reference(hit))
    for name, a in got.items():
        assert not a.flags.writeable, name
        assert a.ctypes.data % weight_cache.ALIGN == 0, name
    big = max(got.values(), key=lambda a: a.nbytes)
    if jax.default_backend() == "cpu":
        placed = jax.device_put(big)
        assert placed.unsafe_buffer_pointer() == big.ctypes.data


def test_the_writer_aligns_every_tensor_it_can(tmp_path):
    arrays = {"odd": np.arange(3, dtype=np.float32), "big": np.ones((4, 16), np.float32),
              "bf": np.zeros(32, np.float32).astype(weight_cache.DType.bf16.to_numpy()),
              "flag": np.array([True, False]), "scalar": np.float32(2.0)}
    path = weight_cache.write_entry(str(tmp_path / "e"), arrays, {"k": "v"})
    types = {n: weight_cache.TensorType(np.asarray(a).shape,
                                        weight_cache.DType.from_numpy(np.asarray(a).dtype))
             for n, a in arrays.items()}
    entry = weight_cache.open_entry(path, types)
    for name, a in arrays.items():
        got = entry.read(name)
        np.testing.assert_array_equal(got, a)
        if np.asarray(a).nbytes % weight_cache.ALIGN == 0:
            assert got.ctypes.data % weight_cache.ALIGN == 0, name
