"""jaxrt generate MODEL --prompt TEXT: generate text (greedy unless told otherwise)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--beam-width", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("--max-model-len", type=int, default=None)


def chat_prompt(model, text: str, system: str | None) -> str:
    from jaxrt.frontends.tokenizer import render_chat
    template = getattr(model, "chat_template", None)
    if not template:
        raise ValueError("--chat: the model file has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    tok = model.tokenizer
    return render_chat(template, messages, add_generation_prompt=True,
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")


def run(args) -> int:
    from jaxrt.compiler import load
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
        logprobs=args.logprobs, repetition_penalty=args.repetition_penalty,
        beam_width=args.beam_width, length_penalty=args.length_penalty)
    start = time.perf_counter()
    model = load(args.model, dtype=args.dtype, max_model_len=args.max_model_len or 0,
                 max_num_seqs=max(1, args.beam_width))
    text = chat_prompt(model, args.prompt, args.system) if args.chat else args.prompt
    # A rendered chat template spells out its special tokens (BOS included) itself, so it
    # is encoded without adding any: what transformers' apply_chat_template does.
    prompt_ids = model.tokenizer.encode(text, add_special_tokens=not args.chat)
    context = model.module.attributes["kv_cache"]["max_model_len"]
    if len(prompt_ids) + args.max_tokens > context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {args.max_tokens} "
                         f"exceeds the model's context of {context} tokens")
    # Reject bad parameters before anything is compiled.
    params.validate(model.config.vocab_size, context, len(prompt_ids))
    runner = model.executable()
    load_s = time.perf_counter() - start
    # One request: one prefill bucket and one decode bucket per beam count, each sized to
    # the whole request, so warm-up compiles only what this run uses.
    max_len = len(prompt_ids) + args.max_tokens
    budget = min(512, max(16, 1 << (len(prompt_ids) - 1).bit_length()))
    engine = Engine(runner, tokenizer=model.tokenizer, max_num_seqs=max(1, args.beam_width),
                    max_model_len=max_len, max_num_batched_tokens=budget,
                    min_bucket_tokens=budget, min_bucket_pages=-(-max_len // runner.page_size),
                    log=None if args.json else sys.stderr)
    compile_s = engine.stats().warmup_seconds
    t0 = time.perf_counter()
    (out,) = engine.generate([prompt_ids], params)
    wall = time.perf_counter() - t0
    n = len(out.ids)
    prefill_s = out.ttft or 0.0
    decode_s = (out.token_times[-1] - out.token_times[0]) if n > 1 else 0.0
    timing = {
        "load_s": round(load_s, 3), "compile_s": round(compile_s, 3),
        "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
        "prefill_tok_s": round(len(prompt_ids) / prefill_s, 1) if prefill_s else None,
        "decode_tok_s": round((n - 1) / decode_s, 1) if decode_s else None,
        "total_s": round(wall, 3), "backend": model.module.attributes["target"]["backend"]
        if "target" in model.module.attributes else None,
    }
    if args.json:
        obj = {"prompt_ids": out.prompt_ids, "ids": out.ids, "text": out.text,
               "finish_reason": out.finish_reason, **timing}
        if out.logprobs is not None:
            obj["logprobs"] = [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
        print(json.dumps(obj))
    else:
        print(out.text)
        print(f"[{len(prompt_ids)} prompt + {n} generated tokens, finish: {out.finish_reason}; "
              f"load {load_s:.1f} s, compile {compile_s:.1f} s, prefill "
              f"{timing['prefill_tok_s']} tok/s, decode {timing['decode_tok_s']} tok/s]",
              file=sys.stderr)
    return 0

