"""Small synthetic model files for the reader tests: GGUF via gguf.GGUFWriter, HF
directories via safetensors. Sizes are tiny so that fuzzing can rewrite them per example."""
from __future__ import annotations

import json
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType, GGUFWriter
from gguf.quants import quantize

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiny GPT-2 style vocabulary."""
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe", "Ġa", "in"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, types, scores) of a tiny SentencePiece vocabulary with byte fallback."""
    pieces = ["▁", "a", "b", "c", "▁a", "▁b", "ab", "bc", "abc", "▁ab", "▁abc", "h", "i",
              "▁hi", "hi"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def random_quantized(rng: np.random.Generator, shape: tuple[int, int], qtype: Q):
    """Raw uint8 blocks (or a float array) of a random [rows, cols] tensor of `qtype`."""
    return random_quantized_with_source(rng, shape, qtype)[0]


def random_quantized_with_source(rng: np.random.Generator, shape: tuple[int, int], qtype: Q):
    """(stored data, the f32 values it was quantized from or None for random K-quant
    blocks)."""
    values = rng.standard_normal(shape).astype(np.float32) * 0.5
    if qtype == Q.F32:
        return values, values
    if qtype == Q.F16:
        return values.astype(np.float16), values
    if qtype in (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        return quantize(values, qtype), values
    # K-quants: gguf-py cannot quantize them; random blocks with sane f16 scales.
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // block, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (size - 2,),
                Q.Q2_K: (size - 4, size - 2), Q.Q3_K: (size - 2,)}[qtype]
    for at in scale_at:
        scales = (rng.random(len(blocks)) * 0.01 + 0.001).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1), None


def write_tiny_gguf(path: str | os.PathLike, *, arch: str = "llama", hidden: int = 32,
                    heads: int = 2, kv_heads: int = 1, ff: int = 64, layers: int = 1,
                    qtypes: dict[str, Q] | None = None, tied: bool = True,
                    tokenizer: str = "gpt2", extra_meta: dict | None = None,
                    drop: tuple[str, ...] = (), seed: int = 0) -> str:
    """A llama/gemma3/qwen2 GGUF with random weights. `qtypes` maps a GGUF tensor-name
    suffix (e.g. "attn_q.weight") to its type; default F32 (norms always F32)."""
    rng = np.random.default_rng(seed)
    qtypes = qtypes or {}
    head_dim = hidden // heads
    w = GGUFWriter(os.fspath(path), arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", ff)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.attention.value_length", head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", 16)
    if tokenizer == "gpt2":
        tokens, types, merges = byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_key_value("tokenizer.ggml.unknown_token_id", 0, GGUFValueType.UINT32)
    for key, (value, vtype) in (extra_meta or {}).items():
        w.add_key_value(key, value, vtype)
    vocab = len(tokens)

    def add(name: str, shape: tuple[int, ...]):
        if name in drop:
            return
        if len(shape) == 1:  # norms: F32, near 1 like trained weights
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
        qtype = qtypes.get(suffix, Q.F32)
        data = random_quantized(rng, shape, qtype)
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (vocab, hidden))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_q.weight", (heads * head_dim, hidden))
        add(p + "attn_k.weight", (kv_heads * head_dim, hidden))
        add(p + "attn_v.weight", (kv_heads * head_dim, hidden))
        add(p + "attn_output.weight", (hidden, heads * head_dim))
        add(p + "ffn_gate.weight", (ff, hidden))
        add(p + "ffn_up.weight", (ff, hidden))
        add(p + "ffn_down.weight", (hidden, ff))
        add(p + "attn_norm.weight", (hidden,))
        add(p + "ffn_norm.weight", (hidden,))
        if arch == "qwen2":
            for n, rows in (("attn_q", heads), ("attn_k", kv_heads), ("attn_v", kv_heads)):
                if p + n + ".bias" not in drop:
                    w.add_tensor(p + n + ".bias",
                                 rng.standard_normal(rows * head_dim).astype(np.float32))
        if arch == "gemma3":
            add(p + "attn_q_norm.weight", (head_dim,))
            add(p + "attn_k_norm.weight", (head_dim,))
            add(p + "post_attention_norm.weight", (hidden,))
            add(p + "post_ffw_norm.weight", (hidden,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


# ---- Hugging Face directories --------------------------------------------------------

def tiny_hf_config(model_type: str = "llama", **overrides) -> dict:
    config = {"model_type": model_type, "vocab_size": 16, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu"}
    config.update(overrides)
    return config


def tiny_hf_weights(config: dict, rng: np.random.Generator | None = None,
                    dtype=np.float32) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nh, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // nh
    gemma = config["model_type"].startswith("gemma3")
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (nh * d, h),
                       p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h),
                       p + "self_attn.o_proj.weight": (h, nh * d),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f),
                       p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
        if config["model_type"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (nh * d,),
                           p + "self_attn.k_proj.bias": (kv * d,),
                           p + "self_attn.v_proj.bias": (kv * d,)})
        if gemma:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                           p + "pre_feedforward_layernorm.weight": (h,),
                           p + "post_feedforward_layernorm.weight": (h,)})
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def tiny_tokenizer_json(vocab_size: int = 16) -> str:
    """A word-level tokenizer.json with <unk>, <s>, </s> and filler words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def write_tiny_hf_dir(root: str | os.PathLike, config: dict | None = None,
                      weights: dict[str, np.ndarray] | None = None,
                      tokenizer_config: dict | None = None) -> str:
    from safetensors.numpy import save_file

    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    config = config or tiny_hf_config()
    text = config.get("text_config", config)
    weights = weights if weights is not None else tiny_hf_weights(
        {**text, "model_type": config["model_type"]})
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write(tiny_tokenizer_json(text["vocab_size"]))
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config or {"bos_token": "<s>", "eos_token": "</s>",
                                       "chat_template": "{{ messages[0]['content'] }}"}, f)
    save_file(weights, os.path.join(root, "model.safetensors"))
    return root
