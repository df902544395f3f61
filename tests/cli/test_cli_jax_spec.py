"""`jaxrt dump jax:MODULE:ATTR`: a JAX/Flax model from the user's own code, imported and
raised, with per-rule statistics; every failure (no module, no attribute, the user's code
raising, a model the cache cannot serve) is one line and exit 2."""
from __future__ import annotations

import textwrap

import pytest

from jaxrt.cli.main import main

MODELS = textwrap.dedent('''
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx
    from tests.frontends.flax_models import FlaxLlama

    def build():
        cfg = transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return FlaxLlama(cfg, rngs=nnx.Rngs(0))

    def broken():
        raise RuntimeError("no weights here")

    def encoder():  # attention without a causal mask: no KV cache can serve it
        params = {"e": jnp.ones((50, 8)), "o": jnp.ones((8, 50))}
        def forward(p, tokens):
            x = p["e"][tokens]
            return (jax.nn.softmax(x @ x.T, -1) @ x) @ p["o"]
        return forward, params
''')


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_jaxrt.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_models_for_jaxrt"


def test_dump_raises_a_flax_model_and_reports_rules(user_code, capsys):
    assert main(["dump", f"jax:{user_code}:build", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert "llm.paged_attention" in out and "kv.update" in out and "dot_general" not in out
    assert "ops after raising:" in err and "llm.rope 4" in err
    rows = {line.split()[0]: line.split()[1:4] for line in err.splitlines()
            if line.startswith("    ") and line.split()[0] in ("rope", "attention", "linear")}
    assert rows["rope"][1] == "4" and rows["linear"][1] == "15"  # matches per rule


def test_dump_import_stage_keeps_primitives(user_code, capsys):
    assert main(["dump", f"jax:{user_code}:build", "--stage", "import"]) == 0
    out = capsys.readouterr().out
    assert "dot_general" in out and "llm." not in out


@pytest.mark.parametrize("spec,message", [
    ("jax:{m}:broken", "calling broken(): RuntimeError: no weights here"),
    ("jax:{m}:nope", "has no attribute 'nope'"),
    ("jax:no_such_module_for_jaxrt:x", "no module named 'no_such_module_for_jaxrt'"),
    ("jax:{m}", "expected jax:MODULE:ATTR"),
    ("jax:{m}:encoder", "insert-kv-cache: no causal attention was raised"),
])
def test_bad_specs_are_one_line_exit_2(user_code, capsys, spec, message):
    assert main(["dump", spec.format(m=user_code)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_stats_refused_for_other_models(capsys):
    assert main(["dump", "smollm2-135m", "--stats"]) == 2
    assert "apply to jax:MODULE:ATTR" in capsys.readouterr().err
