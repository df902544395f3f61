"""jaxrt generate MODEL --prompt TEXT: generate text (greedy unless told otherwise).

The prompt is tokenized before anything is compiled, so the KV cache is planned for this
one request: prompt + --max-tokens tokens per sequence (one sequence per beam), rounded up
to pages, unless --max-model-len or --num-pages say otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import math
import time

from jaxrt.errors import InputError, SettingError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--parse-special", action="store_true",
                   help="turn special-token text in the prompt (<|im_start|>) into control "
                        "tokens; by default it is tokenized as plain text")
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
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="each prompt token's logprob and the N most likely tokens at its "
                        "position (raw model distribution; in --json output)")
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='speculative decoding: \'{"method": "ngram", "num_tokens": 4}\' or '
                        '\'{"method": "draft", "model": "smollm2-135m", "num_tokens": 4}\'')
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="FILE",
                            help="constrain the output to this JSON schema (a file)")
    constraint.add_argument("--regex", default=None, help="constrain the output to a regex")
    constraint.add_argument("--choice", default=None, metavar="A,B,...",
                            help="the output is one of these comma-separated strings")
    constraint.add_argument("--grammar", default=None, metavar="FILE",
                            help="constrain the output to a Lark or GBNF grammar (a file)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("-q", "--quantize", default="", metavar="MODE",
                   help="quantize the linear projections: int8-weight, fp8-weight, w8a8, fp8; "
                        "or the KV cache: kv-int8, kv-fp8")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N devices (Megatron-style; docs/parallelism.md)")
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                   help="scan: compile one layer body for the whole stack (fast compile); "
                        "unrolled: every layer apart (faster decode on GPUs); auto: scan on "
                        "CPUs, unrolled on accelerators")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="KV cache tokens per sequence (default: prompt + --max-tokens)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV cache pages of 16 tokens (default: what the request needs)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help="share of device memory for weights, activations and the KV cache "
                        "(default 0.9)")
    p.add_argument("--kv-cache-max-gib", type=float, default=None,
                   help="cap on the KV cache in GiB (default on a CPU: 4; elsewhere none)")


def check_cache_options(args) -> None:
    """One-line errors for cache sizes no plan can honour, before anything is loaded."""
    for flag, value in (("--max-model-len", args.max_model_len),
                        ("--num-pages", args.num_pages),
                        ("--tensor-parallel", args.tensor_parallel)):
        if value is not None and value < 1:
            raise SettingError(f"{flag} must be >= 1, got {value}")
    fraction, cap = args.kv_cache_memory_fraction, args.kv_cache_max_gib
    if fraction is not None and not 0 < fraction <= 1:
        raise SettingError(f"--kv-cache-memory-fraction must be in (0, 1], got {fraction}")
    if cap is not None and not 0 < cap < math.inf:
        raise SettingError(f"--kv-cache-max-gib must be a number > 0, got {cap}")


# CLI options that set SamplingParams fields (named in their errors)
_FLAGS = {"--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--seed",
          "--beam-width", "--length-penalty", "--repetition-penalty", "--stop", "--logprobs",
          "--prompt-logprobs", "--json-schema", "--regex", "--choice", "--grammar"}


def constraint_options(args) -> dict:
    """SamplingParams' structured-output fields from --json-schema / --regex / --choice /
    --grammar (files read as text; errors name the option)."""
    from jaxrt.errors import read_text_file
    if args.json_schema is not None:
        return {"json_schema": read_text_file(args.json_schema,
                                              "a JSON schema file (--json-schema)")}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": tuple(args.choice.split(","))}
    if args.grammar is not None:
        return {"grammar": read_text_file(args.grammar, "a grammar file (--grammar)")}
    return {}


def _build(args, source, is_engine, Target, compile_loaded, layers_choice, Engine, seqs,
           max_len, budget):
    """The compiled model and its warmed-up Engine for this one request."""
    if is_engine:
        if args.quantize or args.tensor_parallel != 1:
            raise SettingError(f"{args.model} is an engine directory: -q/--tensor-parallel "
                               f"apply when compiling it (jaxrt compile)")
        model = source
    else:
        target = Target.detect(args.dtype, kv_cache_max_gib=args.kv_cache_max_gib)
        model = compile_loaded(
            source, target=target, max_model_len=args.max_model_len or max_len,
            max_num_seqs=seqs, max_num_batched_tokens=budget, num_pages=args.num_pages or 0,
            memory_fraction=args.kv_cache_memory_fraction or 0.9,
            outline_layers=layers_choice(args.layers), quantize=args.quantize,
            tensor_parallel=args.tensor_parallel)
    runner = model.executable()
    # One request: one prefill bucket and one decode bucket per beam count, each sized to
    # the whole request, so warm-up compiles only what this run uses. Speculation also
    # verifies k + 1 tokens a step: it gets the small mixed buckets (from 16 tokens), or
    # every verify step would run the prompt's whole bucket (SmolLM2, CPU, n-gram k=4 on
    # a prompt it copies: 9.9 tok/s that way against 28.9 without speculation).
    floor = budget if args.speculative_config is None else min(budget, 16)
    engine = Engine(runner, tokenizer=model.tokenizer, max_num_seqs=seqs,
                    num_pages=args.num_pages if is_engine else None,
                    max_model_len=max_len, max_num_batched_tokens=budget,
                    min_bucket_tokens=floor, warmup=True,
                    speculative=args.speculative_config,
                    log=None if args.json else sys.stderr)
    return model, engine


def chat_ids(model, text: str, system: str | None, parse_special: bool) -> list[int]:
    from jaxrt.frontends.chat import encode_chat
    template = getattr(model, "chat_template", None)
    if not template:
        raise InputError("--chat: the model file has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    return encode_chat(model.tokenizer, template, messages, parse_special=parse_special)


def run(args) -> int:
    from jaxrt.compiler import Target, compile_loaded, layers_choice, load_engine
    from jaxrt.frontends.sources import load_model, resolve_model
    from jaxrt.runtime.engine import Engine
    from jaxrt.frontends.tokenizer import check_text
    from jaxrt.runtime.request import SamplingParams

    # Undecodable bytes in argv arrive as lone surrogates: refused here, naming the option.
    for flag, texts in (("--prompt", [args.prompt]), ("--system", [args.system or ""]),
                        ("--stop", list(args.stop))):
        for text in texts:
            check_text(text, flag)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
            logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
            repetition_penalty=args.repetition_penalty,
            beam_width=args.beam_width, length_penalty=args.length_penalty,
            **constraint_options(args))
    except SettingError as e:  # name the option that set the field
        flag = "--" + getattr(e, "setting", "").replace("_", "-")
        raise SettingError(f"{flag}: {e}" if flag in _FLAGS else str(e)) from None
    check_cache_options(args)
    from jaxrt.runtime.speculative import from_cli
    args.speculative_config = from_cli(args.speculative)
    start = time.perf_counter()
    is_engine = resolve_model(args.model)[0] == "engine"
    if is_engine:
        fixed = [flag for flag, value in (("--dtype", args.dtype),
                                          ("--kv-cache-memory-fraction",
                                           args.kv_cache_memory_fraction),
                                          ("--kv-cache-max-gib", args.kv_cache_max_gib))
                 if value is not None]
        if fixed:
            raise SettingError(f"{', '.join(fixed)}: {args.model} is an engine directory, "
                               f"compiled with its dtype and KV cache fixed (jaxrt compile)")
        source = load_engine(resolve_model(args.model)[1])
        context = source.kv_plan["max_model_len"]
        whose = "the engine's max-model-len"
    else:
        source = load_model(args.model)
        context = source.config.max_position
        whose = "the model's context"
    # A rendered chat template spells out its special tokens (BOS included) itself, so it
    # is encoded without adding any: what transformers' apply_chat_template does. Special
    # -token text the user typed stays text unless --parse-special (jaxrt.frontends.chat).
    prompt_ids = chat_ids(source, args.prompt, args.system, args.parse_special) \
        if args.chat else (source.tokenizer.encode if args.parse_special
                           else source.tokenizer.encode_text)(args.prompt)
    max_len = len(prompt_ids) + args.max_tokens
    if max_len > context:
        raise SettingError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {args.max_tokens} "
                           f"exceeds {whose} of {context} tokens: shorten the prompt or lower "
                           f"--max-tokens")
    if args.max_model_len is not None:
        if args.max_model_len > context:
            raise SettingError(f"--max-model-len {args.max_model_len} exceeds {whose} of "
                               f"{context} tokens")
        if max_len > args.max_model_len:
            raise SettingError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens "
                               f"{args.max_tokens} exceeds --max-model-len {args.max_model_len}"
                               f": raise --max-model-len or lower --max-tokens")
    # Reject bad parameters before anything is compiled.
    try:
        # max_logprobs: the Engine's default, which this command runs with
        params.validate(source.config.vocab_size, context, len(prompt_ids), max_logprobs=20)
    except SettingError as e:  # name the option that set the field
        flag = "--" + getattr(e, "setting", "").replace("_", "-")
        raise SettingError(f"{flag}: {e}" if flag in _FLAGS else str(e)) from None
    seqs = max(1, args.beam_width)  # a sequence per beam, each up to max_len tokens
    budget = min(512, max(16, 1 << (len(prompt_ids) - 1).bit_length()))
    try:
        model, engine = _build(args, source, is_engine, Target, compile_loaded, layers_choice,
                               Engine, seqs, max_len, budget)
    except InputError as e:
        if seqs == 1:
            raise
        # every beam is a sequence: say which option asked for them
        raise SettingError(f"--beam-width {seqs} needs {seqs} sequences: {e}") from None
    compile_s = engine.stats().warmup_seconds
    load_s = time.perf_counter() - start - compile_s
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
        "kv_cache": {"num_pages": engine.num_pages, "page_size": engine.page_size,
                     "bytes": model.kv_plan["bytes_per_token"] * engine.num_pages
                     * engine.page_size},
    }
    if args.json:
        obj = {"prompt_ids": out.prompt_ids, "ids": out.ids, "text": out.text,
               "finish_reason": out.finish_reason, **timing}
        if args.speculative_config is not None:
            st = engine.stats()
            obj["speculative"] = {"acceptance_rate": st.spec_acceptance_rate,
                                  "mean_accepted_length": st.spec_mean_accepted_length}
        if out.logprobs is not None:
            obj["logprobs"] = [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
        if out.prompt_logprobs is not None:
            obj["prompt_logprobs"] = [None if d is None else {
                str(k): {"logprob": v.logprob, "rank": v.rank, "decoded_token": v.decoded_token}
                for k, v in d.items()} for d in out.prompt_logprobs]
        print(json.dumps(obj))
    else:
        print(out.text)
        print(f"[{len(prompt_ids)} prompt + {n} generated tokens, finish: {out.finish_reason}; "
              f"load {load_s:.1f} s, compile {compile_s:.1f} s, prefill "
              f"{timing['prefill_tok_s']} tok/s, decode {timing['decode_tok_s']} tok/s]",
              file=sys.stderr)
    return 0

