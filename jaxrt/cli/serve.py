"""jaxrt serve MODEL: the OpenAI-compatible HTTP server (jaxrt.serve).

Prints one line once it is ready; SIGINT or SIGTERM stop it (in-flight requests get
--shutdown-timeout seconds to finish, then are aborted)."""
from __future__ import annotations

import argparse
import sys

from jaxrt.errors import SettingError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 (else 401)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-pending", type=int, default=256,
                   help="requests accepted and not finished; past it new ones get 429")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    p.add_argument("--parse-special", action="store_true",
                   help="text prompts of /v1/completions may spell control tokens "
                        "(<|im_start|>); chat messages never do")
    add_engine_arguments(p)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    p.add_argument("--kv-cache-max-gib", type=float, default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("-q", "--quantize", default="", metavar="MODE",
                   help="quantize the linear projections: int8-weight, fp8-weight, w8a8, fp8; "
                        "or the KV cache: kv-int8, kv-fp8")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N devices (docs/parallelism.md)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="M",
                   help="replicas of the model over a dp axis (docs/parallelism.md)")
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--warmup", choices=("auto", "true", "false", "background"),
                   default="auto")
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='speculative decoding: \'{"method": "ngram", "num_tokens": 4}\' or '
                        '\'{"method": "draft", "model": "smollm2-135m", "num_tokens": 4}\'')


def engine_kwargs(args) -> dict:
    from jaxrt.compiler import layers_choice
    for flag, value in (("--max-num-seqs", args.max_num_seqs),
                        ("--max-model-len", args.max_model_len),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--num-pages", args.num_pages), ("--page-size", args.page_size),
                        ("--decode-steps", args.decode_steps),
                        ("--tensor-parallel", args.tensor_parallel),
                        ("--data-parallel", args.data_parallel)):
        if value is not None and value < 1:
            raise SettingError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.kv_cache_memory_fraction <= 1:
        raise SettingError(f"--kv-cache-memory-fraction must be in (0, 1], got "
                         f"{args.kv_cache_memory_fraction}")
    warmup = {"true": True, "false": False}.get(args.warmup, args.warmup)
    from jaxrt.runtime.speculative import from_cli
    return dict(speculative=from_cli(args.speculative),
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
                page_size=args.page_size,
                kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                kv_cache_max_gib=args.kv_cache_max_gib, dtype=args.dtype,
                outline_layers=layers_choice(args.layers), decode_steps=args.decode_steps,
                enable_prefix_caching=not args.no_prefix_caching,
                max_logprobs=args.max_logprobs, seed=args.seed, warmup=warmup,
                quantize=args.quantize, tensor_parallel=args.tensor_parallel,
                data_parallel=args.data_parallel)


def run(args) -> int:
    if not 0 <= args.port <= 65535:
        raise SettingError(f"--port must be in [0, 65535], got {args.port}")
    for flag, value in (("--max-pending", args.max_pending),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise SettingError(f"{flag} must be >= 1, got {value}")
    if not args.shutdown_timeout >= 0:
        raise SettingError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key:
        raise SettingError("--api-key must not be empty")
    kwargs = engine_kwargs(args)
    from jaxrt.serve.server import bind_listener, serve

    # bound before the model loads: a bad --host or a busy --port fails in a second
    sock = bind_listener(args.host, args.port)
    try:
        from jaxrt.runtime.engine import Engine
        engine = Engine(args.model, parse_special=args.parse_special, **kwargs)
        try:
            serve(engine, model_name=args.served_model_name or args.model, host=args.host,
                  port=args.port, api_key=args.api_key, max_pending=args.max_pending,
                  max_body_bytes=args.max_body_bytes,
                  shutdown_timeout=args.shutdown_timeout, out=sys.stdout, sock=sock)
        finally:
            engine.close()
    finally:
        sock.close()
    return 0
