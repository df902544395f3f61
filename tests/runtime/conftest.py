"""Runner factories for the engine tests.

The engine property tests (test_engine_properties.py) run against every factory named in
`JAXRT_RUNTIME_RUNNERS` (comma separated, default "fake"). To run them against a real
model, register a factory here, e.g.

    def _smollm2() -> RunnerFactory:
        exe = StepExecutable(module, weights, num_pages=64, page_size=16)
        return RunnerFactory("smollm2", lambda: exe, page_size=16, runner_pages=64,
                             vocab_size=exe.vocab_size, prompt_tokens=range(100, 5000),
                             exact=False, eos_token_ids=(2,))
    FACTORIES["smollm2"] = _smollm2

and run `JAXRT_RUNTIME_RUNNERS=fake,smollm2 pytest tests/runtime`. `make()` must return a
runner whose cache has `runner_pages` pages; it may return the same object every time
(engines use at most that many pages and never rely on the cache's previous content).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from tests.runtime.fake_model import EOS, VOCAB, FakeRunner


@dataclass
class RunnerFactory:
    name: str
    make: Callable[[], Any]
    page_size: int
    runner_pages: int
    vocab_size: int
    prompt_tokens: range            # ids to draw prompts from (no special tokens)
    exact: bool                     # outputs bit-identical whatever the batch shape
    eos_token_ids: tuple[int, ...] = ()
    engine_kwargs: dict = field(default_factory=dict)


def _fake() -> RunnerFactory:
    runner = FakeRunner(num_pages=64, page_size=4)
    return RunnerFactory("fake", lambda: runner, page_size=4, runner_pages=64,
                         vocab_size=VOCAB, prompt_tokens=range(2, VOCAB), exact=True,
                         eos_token_ids=(EOS,))


def _smollm2() -> RunnerFactory:
    """The real SmolLM2-135M (CPU, float32), with a small cache: the engine properties run
    against it by default, greedy only (exact=False: see test_engine_properties.py)."""
    from jaxrt.compiler import Target, load
    model = load("smollm2-135m", target=Target("cpu", 2 << 30, "f32"), max_model_len=64,
                 num_pages=32)
    exe = model.executable()
    return RunnerFactory("smollm2", lambda: exe, page_size=exe.page_size,
                         runner_pages=exe.num_pages, vocab_size=exe.vocab_size,
                         prompt_tokens=range(100, 5000), exact=False,
                         eos_token_ids=tuple(model.tokenizer.eos_ids))


def _tiny_llama(quantize: str = "", num_layers: int = 2, seed: int = 7) -> RunnerFactory:
    """A random two-layer GQA Llama through the real frontend, passes and lowering;
    `quantize` names a quantize pass mode (tests/runtime/test_engine_quantized.py).
    Another `num_layers` or `seed` makes another model of the same vocabulary (a
    speculative draft: tests/runtime/test_speculative_draft.py)."""
    from types import SimpleNamespace

    import numpy as np

    from jaxrt.compiler import Target, compile_loaded
    from jaxrt.frontends.config import ModelConfig
    from jaxrt.frontends.loaded import expected_weight_shapes
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position=64, rope_theta=10000.0)
    rng = np.random.default_rng(seed)
    weights = {n: (rng.standard_normal(s) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1))
               .astype(np.float32) for n, s in expected_weight_shapes(cfg).items()}
    loaded = SimpleNamespace(config=cfg, weights=weights, tokenizer=None, chat_template=None,
                             source="random:tiny-llama")
    model = compile_loaded(loaded, target=Target("cpu", 1 << 30, "f32"), page_size=4,
                           num_pages=64, quantize=quantize)
    exe = model.executable()
    name = f"tiny-llama-{quantize}" if quantize else "tiny-llama"
    return RunnerFactory(name, lambda: exe, page_size=4, runner_pages=64,
                         vocab_size=256, prompt_tokens=range(3, 256), exact=False)


def _flax_llama() -> RunnerFactory:
    """A random two-layer GQA Llama written in Flax NNX (tests/frontends/flax_models.py),
    imported through its jaxpr by jaxrt.from_flax (issue 14)."""
    import transformers
    from flax import nnx

    from jaxrt.compiler import Target
    from jaxrt.jax_frontend import from_flax
    from tests.frontends.flax_models import FlaxLlama
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    exe = from_flax(FlaxLlama(cfg, rngs=nnx.Rngs(7)), max_model_len=64, page_size=4,
                    num_pages=64, target=Target("cpu", 1 << 30, "f32"))
    return RunnerFactory("flax-llama", lambda: exe, page_size=4, runner_pages=64,
                         vocab_size=256, prompt_tokens=range(3, 256), exact=False)


# Every quantize mode, and one weight + KV cache combination.
QUANTIZED_MODES = ("int8-weight", "fp8-weight", "w8a8", "fp8", "w8a8-smoothquant", "kv-int8",
                   "kv-fp8", "w8a8+kv-fp8")

FACTORIES: dict[str, Callable[[], RunnerFactory]] = {
    "fake": _fake, "tiny-llama": _tiny_llama, "smollm2": _smollm2, "flax-llama": _flax_llama,
    # opt-in (not in the default list): test_engine_quantized.py runs each of them
    **{f"tiny-llama-{mode}": (lambda mode=mode: _tiny_llama(mode))
       for mode in QUANTIZED_MODES}}


def _selected() -> list[str]:
    names = [n.strip() for n in
             os.environ.get("JAXRT_RUNTIME_RUNNERS", "fake,tiny-llama,smollm2,flax-llama").split(",")]
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        raise pytest.UsageError(f"JAXRT_RUNTIME_RUNNERS: unknown runner(s) {unknown}; "
                                f"known: {sorted(FACTORIES)}")
    return [n for n in names if n]


def poison(runner, seed: int = 0):
    """What a new Engine must not depend on: the cache's previous contents. Fill the KV
    cache with random values and forget the fake model's record of written slots, so a
    page used before its K/V is written shows up (garbage in the output, or the fake's
    "never-written slots" check) instead of reading what an earlier engine left there."""
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    if isinstance(runner, FakeRunner):
        runner._kv = jnp.asarray(rng.integers(0, 2**32, runner._kv.shape, dtype=np.uint32))
        runner._written[:] = False
        return runner
    kv = runner.kv_cache  # a StepExecutable: resolve, then replace its cache
    runner._kv = jnp.asarray((rng.standard_normal(kv.shape) * 4).astype(kv.dtype))
    return runner


def poisoned(make: Callable[[], Any]) -> Callable[[], Any]:
    count = iter(range(1 << 30))
    return lambda: poison(make(), next(count))


# Real-model runners compile per process: keep each one's tests on one xdist worker. The
# group is the runner's own (not the model tests' "smollm2" group, which shares other
# session fixtures), so the two long groups can run on different workers.
@pytest.fixture(scope="session", params=[
    pytest.param(n, marks=pytest.mark.xdist_group(f"runner-{n}")) if n != "fake" else n
    for n in _selected()])
def runner_factory(request) -> RunnerFactory:
    factory = FACTORIES[request.param]()
    factory.make = poisoned(factory.make)  # every engine starts from a garbage cache
    return factory


@pytest.fixture(scope="session")
def fake_runner() -> FakeRunner:
    """One fake runner for the engine unit tests (its compiled shapes are shared)."""
    return FakeRunner(num_pages=64, page_size=4)
