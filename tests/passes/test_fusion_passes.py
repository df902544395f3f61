"""The fusion passes fuse-qkv, fuse-gate-up and fuse-add-rmsnorm: golden IR (positive
cases), near misses that must leave the IR unchanged, soundness under the reference
interpreter (original and fused module, same random inputs and weights), the driver's
guard on extra replacements, and the pipeline: a tiny Llama through the XLA lowering and
refusal under tensor parallelism."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrt.compiler import Target, compile_loaded, default_pipeline
from jaxrt.errors import SettingError
from jaxrt.frontends.build import build_module
from jaxrt.frontends.config import ModelConfig
from jaxrt.ir import Builder, Module, interpreter, ops
from jaxrt.ir.opdef import VerifyError
from jaxrt.ir.parser import parse
from jaxrt.ir.printer import print_module
from jaxrt.passes import PassManager
from jaxrt.passes.manager import VerifyHook
from jaxrt.passes.pattern import Pat
from jaxrt.passes.rewrite import RewriteError, Rule, RuleSet, apply_rules

from tests.passes.passes_testutil import assert_golden, t
from tests.passes.test_outline_layers import gemma_configs, llama_like, random_weights
from tests.passes.test_outline_layers import run as run_step
from tests.passes.test_outline_layers import step_inputs

T = 3  # tokens


def module(weights: dict[str, tuple], args: dict[str, tuple], body) -> Module:
    m = Module("fuse")
    for name, shape in weights.items():
        m.weights[name] = t(*shape)
    b = Builder.new_function(m, "f", [(n, t(*s)) for n, s in args.items()])
    out = body(b, *b.fn.args)
    b.ret(*(out if isinstance(out, tuple) else (out,)))
    return m


def fused(m: Module, pipeline: str) -> tuple[Module, dict[str, int]]:
    """m after `pipeline` (m itself is untouched) and each rule's rewrites."""
    out = parse(print_module(m))  # a copy (the text form round-trips)
    pm = PassManager(pipeline, [VerifyHook()])
    pm.run(out)
    return out, {r: st.rewrites for p in pm.stats.passes for r, st in p.rules.rules.items()}


def assert_sound(before: Module, after: Module, seed: int = 0) -> None:
    """Same outputs on random inputs and weights. The fused ops compute every output with
    the same f32 formula as the unfused ones (a column of a matmul is the same dot
    product; the norm reads the same rounded sum), so the results agree to the bit."""
    rng = np.random.default_rng(seed)
    ws = {n: rng.standard_normal(ty.shape).astype(np.float32)
          for n, ty in before.weights.items() if n not in before.weight_defs}
    xs = [rng.standard_normal(a.type.shape).astype(np.float32)
          for a in before.functions["f"].args]
    want = interpreter.run(before, "f", xs, ws)
    got = interpreter.run(after, "f", xs, ws)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def assert_unchanged(m: Module, pipeline: str) -> None:
    after, rewrites = fused(m, pipeline)
    assert not any(rewrites.values()), rewrites
    assert print_module(after) == print_module(m)


# ---- fuse-qkv ---------------------------------------------------------------------------

GQA = {"q.weight": (8, 6), "k.weight": (4, 6), "v.weight": (4, 6), "q.bias": (8,),
       "k.bias": (4,), "v.bias": (4,)}


def qkv_body(b, x, bias=True, inputs=None):
    """q/k/v projections of x (GQA: k and v half as wide as q), each used after."""
    xs = inputs or (x, x, x)
    outs = [b(ops.linear, xi, b.weight(f"{p}.weight"), *([b.weight(f"{p}.bias")] if bias
                                                          else []))
            for p, xi in zip("qkv", xs)]
    return outs[0], b(ops.tanh, outs[1]), outs[2]


def test_fuse_qkv_golden_gqa_with_biases():
    m = module(GQA, {"x": (T, 6)}, qkv_body)
    after, rewrites = fused(m, "fuse-qkv")
    assert rewrites == {"fuse-qkv": 1}
    assert_golden("fuse_qkv_gqa_bias.ir", print_module(after))
    assert after.weights["qkv.weight"] == t(16, 6) and after.weights["qkv.bias"] == t(16)
    assert_sound(m, after)


def _proj(b, x, p, *, bias=False, computed=False):
    w = b.weight(f"{p}.weight")
    w = b(ops.tanh, w) if computed else w
    return b(ops.linear, x, w, *([b.weight(f"{p}.bias")] if bias else []))


QKV_NEAR_MISSES = {
    # q and v of x, k of y: two projections of x only
    "different-inputs": lambda b, x, y: qkv_body(b, x, inputs=(x, y, x)),
    # four projections of x: which three would be q, k and v?
    "four-projections": lambda b, x, y: (*qkv_body(b, x), _proj(b, x, "g")),
    # a bias on v only
    "some-biases": lambda b, x, y: (_proj(b, x, "q"), _proj(b, x, "k"),
                                    _proj(b, x, "v", bias=True)),
    # v's weight is computed, not a module weight
    "computed-weight": lambda b, x, y: (_proj(b, x, "q"), _proj(b, x, "k"),
                                        _proj(b, x, "v", computed=True)),
    # k and v only (cross-attention style): not three
    "two-projections": lambda b, x, y: (_proj(b, x, "k"), _proj(b, x, "v")),
}


@pytest.mark.parametrize("case", sorted(QKV_NEAR_MISSES))
def test_fuse_qkv_near_misses(case):
    weights = dict(GQA, **{"g.weight": (4, 6)})
    m = module(weights, {"x": (T, 6), "y": (T, 6)}, QKV_NEAR_MISSES[case])
    assert_unchanged(m, "fuse-qkv")


# ---- fuse-gate-up -----------------------------------------------------------------------

MLP = {"gate.weight": (10, 6), "up.weight": (10, 6), "down.weight": (6, 10)}


def test_fuse_gate_up_golden_swiglu_and_geglu():
    def body(b, x, y):
        h1 = b(ops.swiglu, b(ops.linear, x, b.weight("gate.weight")),
               b(ops.linear, x, b.weight("up.weight")))
        h2 = b(ops.geglu, b(ops.linear, y, b.weight("gate.weight")),
               b(ops.linear, y, b.weight("up.weight")), approximate="none")
        return b(ops.linear, h1, b.weight("down.weight")), h2

    m = module(MLP, {"x": (T, 6), "y": (T, 6)}, body)
    after, rewrites = fused(m, "fuse-gate-up")
    assert rewrites == {"fuse-gate-up": 2}
    # one concatenated weight serves both (the same definition is reused)
    assert_golden("fuse_gate_up.ir", print_module(after))
    assert after.weights["gate_up.weight"] == t(20, 6)
    assert_sound(m, after)


@pytest.mark.parametrize("case", ["gate-used-elsewhere", "different-inputs", "same-linear",
                                  "not-gated"])
def test_fuse_gate_up_near_misses(case):
    def body(b, x, y):
        g = b(ops.linear, x, b.weight("gate.weight"))
        u = b(ops.linear, y if case == "different-inputs" else x, b.weight("up.weight"))
        if case == "same-linear":
            return b(ops.swiglu, g, g)
        if case == "not-gated":  # silu(g) * u left unraised: no gated op to root at
            return b(ops.mul, b(ops.silu, g), u)
        h = b(ops.swiglu, g, u)
        return (h, g) if case == "gate-used-elsewhere" else h

    assert_unchanged(module(MLP, {"x": (T, 6), "y": (T, 6)}, body), "fuse-gate-up")


# ---- fuse-add-rmsnorm ---------------------------------------------------------------------

NORMS = {"n1": (6,), "n2": (6,), "w": (6, 6)}


def residual_body(b, x, y, offset=0.0):
    """Two residual steps: s1 = x + y, n1 = norm(s1); s2 = s1 + f(n1), n2 = norm(s2)."""
    s1 = b(ops.add, x, y)
    n1 = b(ops.rms_norm, s1, b.weight("n1"), eps=1e-5, offset=offset)
    s2 = b(ops.add, s1, b(ops.linear, n1, b.weight("w")))
    n2 = b(ops.rms_norm, s2, b.weight("n2"), eps=1e-5, offset=offset)
    return n2, s2


def test_fuse_add_rmsnorm_golden_gemma_offset():
    m = module(NORMS, {"x": (T, 6), "y": (T, 6)},
               lambda b, x, y: residual_body(b, x, y, offset=1.0))
    after, rewrites = fused(m, "fuse-add-rmsnorm")
    assert rewrites == {"fuse-add-rmsnorm": 2}
    text = print_module(after)
    assert_golden("fuse_add_rmsnorm_offset.ir", text)
    assert print_module(parse(text)) == text  # the two-result op round-trips
    assert [op.opdef for op in after.functions["f"].ops].count(ops.add) == 0
    assert_sound(m, after)


@pytest.mark.parametrize("case", ["norm-of-mul", "broadcast-add", "sum-used-before-norm"])
def test_fuse_add_rmsnorm_near_misses(case):
    def body(b, x, y):
        if case == "norm-of-mul":
            return b(ops.rms_norm, b(ops.mul, x, y), b.weight("n1"))
        if case == "broadcast-add":  # a bias vector, not a residual
            return b(ops.rms_norm, b(ops.add, x, b.weight("n2")), b.weight("n1"))
        s = b(ops.add, x, y)
        early = b(ops.tanh, s)  # before the norm: the fused op would come after it
        return early, b(ops.rms_norm, s, b.weight("n1"))

    assert_unchanged(module(NORMS, {"x": (T, 6), "y": (T, 6)}, body), "fuse-add-rmsnorm")


def test_add_rms_norm_verifies_shapes():
    with pytest.raises(VerifyError, match="residual .* must have the shape"):
        module({"n": (6,)}, {"x": (T, 6), "r": (6,)},
               lambda b, x, r: b(ops.add_rms_norm, x, r, b.weight("n")))


def test_driver_refuses_a_replacement_that_would_not_dominate():
    """rw.replace of a value used before the root is a rule bug, reported as such."""
    def bad(rw, y, s):
        rw.replace(s, rw(ops.neg, s))
        return rw(ops.exp, y.owner.operands[0])

    rule = Rule("t-bad-replace", Pat(ops.exp, Pat(ops.tanh, Pat(ops.add, name="s")), name="y"),
                bad)
    m = module({}, {"x": (T, 6)}, lambda b, x: (
        lambda s: (b(ops.mul, s, s), b(ops.exp, b(ops.tanh, s))))(b(ops.add, x, x)))
    with pytest.raises(RewriteError, match="would not dominate"):
        apply_rules(m, RuleSet([rule]))


# ---- the pipeline -----------------------------------------------------------------------

def tiny(**overrides) -> ModelConfig:
    base = dict(arch="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, max_position=32)
    return ModelConfig(**{**base, **overrides})


def test_default_pipeline_fusion_choice():
    gpu, cpu = Target("gpu", 1 << 34, "bf16"), Target("cpu", 1 << 30, "f32")
    fusions = "fuse-qkv,fuse-gate-up,fuse-add-rmsnorm"
    assert default_pipeline(gpu).startswith(f"canonicalize,cse,dce,{fusions},cast-float")
    assert "fuse" not in default_pipeline(gpu, fuse=False)
    # outlined layers: the norm fuses after outline-layers (within a layer)
    assert default_pipeline(cpu, fuse=True).startswith(
        "canonicalize,cse,dce,fuse-qkv,fuse-gate-up,outline-layers,fuse-add-rmsnorm,")
    # tensor parallel: the projections stay apart, the norm still fuses
    tp = default_pipeline(gpu, tensor_parallel=2)
    assert "fuse-qkv" not in tp and "fuse-gate-up" not in tp and "fuse-add-rmsnorm" in tp
    with pytest.raises(SettingError, match="cannot be split over tp"):
        default_pipeline(gpu, tensor_parallel=2, fuse=True)


def test_fused_layers_still_outline():
    """qkv and gate/up fused before outline-layers (the concatenations are stacked), the
    residual norm within the scanned layer after it."""
    m = build_module(tiny(num_layers=3))
    PassManager(default_pipeline(Target("cpu", 1 << 30, "f32"), num_pages=8, fuse=True),
                [VerifyHook()]).run(m)
    step, layer = m.functions["step"], m.functions["layer"]
    assert [op.opdef for op in step.ops].count(ops.scan) == 1
    assert [op.opdef for op in layer.ops].count(ops.add_rms_norm) == 1
    assert "model.layers.0:3.self_attn.qkv_proj.weight" in m.weights


def test_shard_refuses_fused_projections():
    m = build_module(tiny())
    PassManager("fuse-qkv,shard{tp=1 dp=2}", [VerifyHook()]).run(m)  # no split: fine
    m = build_module(tiny())
    with pytest.raises(SettingError, match="fused projections .*qkv_proj"):
        PassManager("fuse-qkv,shard{tp=2}", [VerifyHook()]).run(m)


# f32 (the CPU pipeline: outlined layers, the norm fused inside the scanned layer) and
# bf16 (the accelerator pipeline: unrolled, all three fusions, then cast-float casting the
# concatenations' parts). Tolerances relative to the logits' scale: f32 to summation order
# (a wider matmul may block its sums differently: 3e-7 seen), 1e-5; bf16 to a projection
# output rounded to bf16 the other way (one ulp, 2^-8 = 4e-3) in one place (0 seen), 1e-2.
@pytest.mark.parametrize("dtype, layers, tol", [("f32", True, 1e-5), ("bf16", False, 1e-2)])
def test_tiny_qwen_style_llama_fused_matches_unfused_through_xla(dtype, layers, tol):
    """qkv biases (Qwen2) through the real frontend, default pipeline and XLA lowering."""
    from types import SimpleNamespace

    from jaxrt.frontends.loaded import expected_weight_shapes
    cfg = tiny(qkv_bias=True)
    rng = np.random.default_rng(3)
    weights = {n: (rng.standard_normal(s) * 0.3 + (len(s) == 1)).astype(np.float32)
               for n, s in expected_weight_shapes(cfg).items()}
    loaded = SimpleNamespace(config=cfg, weights=weights, tokenizer=None, chat_template=None,
                             source="random:tiny")
    logits = {}
    for fuse in (False, True):
        model = compile_loaded(loaded, target=Target("cpu", 1 << 30, dtype), page_size=4,
                               num_pages=8, fuse=fuse, outline_layers=layers)
        assert ("fuse-qkv" in model.pipeline) == fuse
        exe = model.executable()
        n = 5
        pos = np.arange(n, dtype=np.int32)
        tokens = np.asarray([3, 17, 9, 40, 2], np.int32)
        logits[fuse] = np.asarray(exe.run(tokens, pos, pos, np.arange(8, dtype=np.int32)[None],
                                          np.asarray([n], np.int32), pos[None], pos))
    scale = np.abs(logits[False]).max()
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=tol * scale)


@pytest.mark.xdist_group("smollm2")
def test_smollm2_greedy_parity_fused_and_unfused(smollm2):
    """The real SmolLM2 (f32, CPU): the same greedy tokens with fusion on and off, and
    logits within the real-model parity bound (tests/frontends/test_parity_real.py: f32
    summation order over 30 layers; the fused matmuls may block their sums differently)."""
    from tests.frontends.test_parity_real import LOGIT_RTOL, _all_logits, _greedy_after_prefill
    ids = smollm2.tokenizer.encode("The capital of France is")
    runs = {}
    for fuse in (False, True):
        model = compile_loaded(smollm2, target=Target("cpu", 2 << 30, "f32"),
                               max_model_len=64, num_pages=4, fuse=fuse)
        exe = model.executable(dtype="f32")
        logits = _all_logits(exe, ids)
        runs[fuse] = logits, _greedy_after_prefill(exe, ids, logits[-1], 4)
    (plain, plain_ids), (fused_logits, fused_ids) = runs[False], runs[True]
    assert fused_ids == plain_ids
    bound = LOGIT_RTOL * np.abs(plain).max(axis=-1, keepdims=True)
    assert (np.abs(fused_logits - plain) <= bound).all()


def test_engine_refuses_fuse_for_a_compiled_runner():
    from jaxrt.runtime.engine import Engine
    from tests.runtime.fake_model import FakeRunner
    with pytest.raises(SettingError, match="fuse=True applies when the Engine loads"):
        Engine(FakeRunner(num_pages=8, page_size=4), fuse=True, log=None)


FUSIONS = "fuse-qkv,fuse-gate-up,fuse-add-rmsnorm"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(llama_like, gemma_configs()), st.integers(1, 4), st.booleans())
def test_fused_models_compute_exactly_what_unfused_ones_do(config, n, outline):
    """Random Llama / Mistral / Qwen2 (biases) / Gemma 3 stacks through the frontend, with
    the fusions unrolled or around outline-layers (the CPU order), against the unfused
    module in the reference interpreter: bit-exact (numpy evaluates a column of the fused
    matmul and the norm of the rounded sum exactly as the unfused ops do)."""
    plain = build_module(config)
    fused_m = build_module(config)
    pipeline = ("fuse-qkv,fuse-gate-up,outline-layers,fuse-add-rmsnorm" if outline
                else FUSIONS)
    PassManager("canonicalize,cse,dce", [VerifyHook()]).run(plain)
    PassManager(f"canonicalize,cse,dce,{pipeline}", [VerifyHook()]).run(fused_m)
    names = {op.opdef.name for fn in fused_m.functions.values() for op in fn.ops}
    assert "llm.linear" in names and ops.slice_.name in names  # q/k/v and gate/up fused
    weights = random_weights(config)
    inputs = step_inputs(config, n)
    for got, want in zip(run_step(fused_m, config, inputs, weights),
                         run_step(plain, config, inputs, weights)):
        np.testing.assert_array_equal(got, want)
