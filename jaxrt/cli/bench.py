"""jaxrt bench MODEL: an offline serving workload; prints a table and writes JSON.

    jaxrt bench smollm2-135m --num-requests 16 --input-len 64 --output-len 64
    jaxrt bench smollm2-135m --suite        # 1 vs 16 concurrent; shared prefix on vs off
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory, engine dir or alias")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                   help="every prompt starts with the same prefix of this many tokens")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the number of requests")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                   help="scan: compile one layer body for the whole stack (fast compile); "
                        "unrolled: every layer apart (faster decode on GPUs); auto: scan on "
                        "CPUs, unrolled on accelerators")
    p.add_argument("--page-size", type=int, default=None,
                   help="KV-cache page size (default 16; an engine directory's own)")
    p.add_argument("--bucket-growth", type=int, default=None,
                   help="shape-bucket growth factor (larger: fewer compiles, more padding)")
    p.add_argument("--suite", action="store_true",
                   help="the standard figures: 1 vs N concurrent requests, and a shared "
                        "prefix with prefix caching on vs off")
    p.add_argument("--prefix-len", type=int, default=1024, help="with --suite")
    p.add_argument("--out", default="bench/results/serving.json", help="JSON output path")
    p.add_argument("--speculative", default=None, metavar="JSON",
                   help='speculative decoding: \'{"method": "ngram", "num_tokens": 4}\' or '
                        '\'{"method": "draft", "model": "smollm2-135m", "num_tokens": 4}\'')


def _engine(model, args, max_num_seqs: int, prefix_caching: bool, max_len: int):
    from jaxrt.runtime.engine import Engine
    return Engine(model.executable(), tokenizer=model.tokenizer, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=prefix_caching, max_model_len=max_len,
                  bucket_growth=args.bucket_growth, warmup=True, log=sys.stderr,
                  speculative=args.speculative_config)


def run(args) -> int:
    from jaxrt.compiler import layers_choice, load
    from jaxrt.errors import SettingError
    from jaxrt.runtime.benchmark import Workload, format_table, run_workload

    # Refused before anything loads, naming the option (0 is an error, never the default).
    for flag, value, least in (("--max-num-seqs", args.max_num_seqs, 1),
                               ("--bucket-growth", args.bucket_growth, 2),
                               ("--num-requests", args.num_requests, 1),
                               ("--input-len", args.input_len, 1),
                               ("--output-len", args.output_len, 1),
                               ("--max-num-batched-tokens", args.max_num_batched_tokens, 1),
                               ("--shared-prefix", args.shared_prefix, 0),
                               ("--prefix-len", args.prefix_len if args.suite else 0, 0)):
        if value is not None and value < least:
            raise SettingError(f"{flag} must be >= {least}, got {value}")
    if not args.suite and args.shared_prefix >= args.input_len:
        raise SettingError(f"--shared-prefix must be < --input-len ({args.input_len}), got "
                           f"{args.shared_prefix}")
    from jaxrt.runtime.speculative import from_cli
    args.speculative_config = from_cli(args.speculative)
    start = time.perf_counter()
    scenarios: list[tuple[str, Workload, int, bool]] = []
    if args.suite:
        n, il, ol = args.num_requests, args.input_len, args.output_len
        scenarios += [
            ("1 request", Workload(1, il, ol), 1, True),
            (f"{n} concurrent", Workload(n, il, ol), n, True),
            ("shared prefix, caching on", Workload(n, args.prefix_len + il, ol,
                                                   args.prefix_len), n, True),
            ("shared prefix, caching off", Workload(n, args.prefix_len + il, ol,
                                                    args.prefix_len), n, False),
        ]
    else:
        w = Workload(args.num_requests, args.input_len, args.output_len, args.shared_prefix)
        seqs = args.num_requests if args.max_num_seqs is None else args.max_num_seqs
        scenarios.append(("workload", w, seqs, not args.no_prefix_caching))
    max_len = max(w.input_len + w.output_len for _, w, _, _ in scenarios)
    max_seqs = max(s for _, _, s, _ in scenarios)
    # unset options stay unset: an engine directory refuses only what differs from it
    given = {} if args.page_size is None else {"page_size": args.page_size}
    model = load(args.model, dtype=args.dtype, max_model_len=max_len, max_num_seqs=max_seqs,
                 outline_layers=layers_choice(args.layers), **given)
    load_s = time.perf_counter() - start
    rows = []
    for name, workload, seqs, caching in scenarios:
        engine = _engine(model, args, seqs, caching, max_len)
        row = run_workload(engine, workload)
        row.update(scenario=name, prefix_caching=caching, max_num_seqs=seqs)
        rows.append(row)
        del engine
    target = model.module.attributes.get("target", {})
    report = {"model": args.model, "backend": target.get("backend"),
              "dtype": model.module.attributes.get("float_dtype", "f32"), "load_s": load_s,
              "kv_cache": model.module.attributes.get("kv_cache"), "results": rows}
    if args.suite:
        one, many, on, off = rows
        report["speedup_concurrent_vs_one"] = many["output_tok_s"] / one["output_tok_s"]
        report["ttft_prefix_off_over_on"] = off["ttft_p50_s"] / on["ttft_p50_s"]
    print(format_table(rows))
    for key in ("speedup_concurrent_vs_one", "ttft_prefix_off_over_on"):
        if key in report:
            print(f"{key}: {report[key]:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
