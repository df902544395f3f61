"""Decoder-only LLM building blocks that emit the `@step` function.

`DecoderBuilder` declares the step arguments exactly as docs/architecture.md specifies,
declares weights (f32, Hugging Face names) as they are first used, and offers the pieces
architectures compose: embedding, RMSNorm, the paged attention block, the gated MLP and
the logits head. Per-architecture files (`llama.py`, `gemma3.py`) only arrange them.
"""
from __future__ import annotations

from jaxrt.errors import InputError
from ..ir import Builder, DType, Module, TensorType, Value, ops
from .config import ModelConfig

F32, I32 = DType.f32, DType.int32

# The @step signature: name -> shape (all i32 except the cache). Order is the contract.
STEP_ARGS: tuple[tuple[str, tuple], ...] = (
    ("tokens", ("T",)),
    ("positions", ("T",)),
    ("slot_mapping", ("T",)),
    ("page_table", ("S", "MP")),
    ("context_lens", ("S",)),
    ("q_index", ("S", "Q")),
    ("logit_index", ("N",)),
)

_GATED = {"silu": (ops.swiglu, {}), "gelu_tanh": (ops.geglu, {"approximate": "tanh"})}


def kv_cache_type(config: ModelConfig, dtype: DType = F32) -> TensorType:
    """kv[layers, 2, pages, page_size, kv_heads, head_dim] with symbolic pages/page_size."""
    return TensorType((config.num_layers, 2, "pages", "page_size", config.num_kv_heads,
                       config.head_dim), dtype)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


class DecoderBuilder:
    """Emits one `@step` function for `config` into a fresh module.

    norm_offset: RMSNorm computes x_hat * (offset + w) (Gemma stores w - 1, offset 1).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Gemma 3, Qwen 3).
    """

    def __init__(self, config: ModelConfig, *, norm_offset: float = 0.0, qk_norm: bool = False,
                 name: str | None = None):
        if config.hidden_act not in _GATED:
            raise InputError(f"unsupported hidden_act {config.hidden_act!r}; "
                             f"expected one of {sorted(_GATED)}")
        bad = [t for t in config.layer_types if t not in ("full", "sliding")]
        if bad:
            raise InputError(f"unknown layer types {sorted(set(bad))}")
        if "sliding" in config.layer_types and not config.sliding_window:
            raise InputError("sliding layers need config.sliding_window")
        if config.num_heads % config.num_kv_heads:
            raise InputError(f"{config.num_heads} heads are not a multiple of "
                             f"{config.num_kv_heads} kv heads")
        self.config = config
        self.norm_offset = float(norm_offset)
        self.qk_norm = qk_norm
        self.module = Module(name or config.model_type or config.arch,
                             attributes={"config": config.to_dict()})
        args = [(n, TensorType(shape, I32)) for n, shape in STEP_ARGS]
        args.append(("kv", kv_cache_type(config)))
        self.b = Builder.new_function(self.module, "step", args)
        self.kv = self.arg("kv")  # threaded through every layer's kv.update

    # ---- small pieces ---------------------------------------------------------------

    def arg(self, name: str) -> Value:
        return self.b.fn.arg(name)

    def weight(self, name: str, *shape: int) -> Value:
        return self.b.weight(name, TensorType(tuple(shape), F32))

    def add(self, x: Value, y: Value) -> Value:
        return self.b(ops.add, x, y)

    def rms_norm(self, x: Value, name: str) -> Value:
        w = self.weight(name, x.shape[-1])
        return self.b(ops.rms_norm, x, w, eps=self.config.rms_eps, offset=self.norm_offset)

    def linear(self, x: Value, name: str, out_features: int, in_features: int,
               bias: bool = False) -> Value:
        operands = [x, self.weight(f"{name}.weight", out_features, in_features)]
        if bias:
            operands.append(self.weight(f"{name}.bias", out_features))
        return self.b(ops.linear, *operands)

    # ---- blocks ---------------------------------------------------------------------

    def embed(self, scale: float | None = None) -> Value:
        """Token embeddings [T, hidden], optionally times a scalar (Gemma: sqrt(hidden))."""
        c = self.config
        self.embed_table = self.weight("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
        x = self.b(ops.embedding, self.arg("tokens"), self.embed_table)  # [T, hidden]
        if scale is not None:
            # A scalar of the compute dtype, as transformers casts embed_scale to the
            # weight dtype (bf16 rounds sqrt(3072) to 55.5).
            s = self.b(ops.constant, value=float(scale), result_types=[TensorType((), F32)])
            x = self.b(ops.mul, x, s)
        return x

    def rope_attrs(self, layer: int) -> dict:
        """RoPE of one layer: sliding layers with their own base are unscaled (Gemma 3)."""
        c = self.config
        if c.layer_types[layer] == "sliding" and c.rope_local_theta is not None:
            return {"theta": float(c.rope_local_theta)}
        attrs = {"theta": float(c.rope_theta)}
        rs = c.rope_scaling
        if rs.kind != "none":
            attrs.update(scaling=rs.kind, factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                         high_freq_factor=rs.high_freq_factor,
                         original_max_position=rs.original_max_position)
        return attrs

    def attention_attrs(self, layer: int) -> dict:
        c = self.config
        window = c.sliding_window if c.layer_types[layer] == "sliding" else None
        return {"layer": layer, "scale": c.attn_scale, "causal": True, "window": window,
                "softcap": c.attn_logit_softcap}

    def attention(self, layer: int, h: Value) -> Value:
        """Self-attention of one layer on normed hidden states h[T, hidden] -> [T, hidden].

        Writes this step's K/V into the cache (updating `self.kv`) before attending, so
        queries see their own token and the rest of their chunk.
        """
        c, b = self.config, self.b
        p = layer_prefix(layer) + "self_attn."
        nh, kvh, d, hidden = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        q = self.linear(h, p + "q_proj", nh * d, hidden, c.qkv_bias)  # [T, nh*d]
        k = self.linear(h, p + "k_proj", kvh * d, hidden, c.qkv_bias)  # [T, kvh*d]
        v = self.linear(h, p + "v_proj", kvh * d, hidden, c.qkv_bias)
        q = b(ops.reshape, q, shape=("T", nh, d))  # [T, nh, d]
        k = b(ops.reshape, k, shape=("T", kvh, d))  # [T, kvh, d]
        v = b(ops.reshape, v, shape=("T", kvh, d))
        if self.qk_norm:
            q = self.rms_norm(q, p + "q_norm.weight")
            k = self.rms_norm(k, p + "k_norm.weight")
        positions = self.arg("positions")
        rope = self.rope_attrs(layer)
        q = b(ops.rope, q, positions, **rope)
        k = b(ops.rope, k, positions, **rope)
        self.kv = b(ops.kv_update, self.kv, k, v, self.arg("slot_mapping"), layer=layer)
        a = b(ops.paged_attention, q, self.kv, self.arg("page_table"), self.arg("context_lens"),
              self.arg("q_index"), positions, **self.attention_attrs(layer))  # [T, nh, d]
        a = b(ops.reshape, a, shape=("T", nh * d))
        return self.linear(a, p + "o_proj", hidden, nh * d)

    def mlp(self, layer: int, h: Value) -> Value:
        """Gated MLP: down(act(gate(h)) * up(h))."""
        c = self.config
        p = layer_prefix(layer) + "mlp."
        gate = self.linear(h, p + "gate_proj", c.intermediate_size, c.hidden_size)
        up = self.linear(h, p + "up_proj", c.intermediate_size, c.hidden_size)
        opdef, attrs = _GATED[c.hidden_act]
        return self.linear(self.b(opdef, gate, up, **attrs), p + "down_proj", c.hidden_size,
                           c.intermediate_size)

    def finish(self, x: Value) -> Module:
        """Final norm and logits of the `logit_index` rows; returns (logits, kv)."""
        c = self.config
        rows = self.b(ops.take, x, self.arg("logit_index"), axis=0)  # [N, hidden]
        rows = self.rms_norm(rows, "model.norm.weight")  # per row: norm after take is exact
        head = (self.embed_table if c.tie_embeddings
                else self.weight("lm_head.weight", c.vocab_size, c.hidden_size))
        logits = self.b(ops.logits, rows, head, softcap=c.final_logit_softcap)  # f32[N, V]
        self.b.ret(logits, self.kv)
        return self.module
