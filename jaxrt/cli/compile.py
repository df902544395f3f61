"""jaxrt compile MODEL -o DIR: write an engine directory (IR, weights, tokenizer, config)."""
from __future__ import annotations

import argparse
import time

from jaxrt.errors import InputError, SettingError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, Hugging Face directory or alias")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    p.add_argument("-p", "--pipeline", default=None,
                   help="pass pipeline (default: the target's: canonicalize,cse,dce, the "
                        "fusion passes, outline-layers on a CPU, cast-float to bf16 on a GPU, "
                        "then plan-kv-cache; `jaxrt opt -p default-gpu|default-cpu` shows "
                        "all but the plan)")
    p.add_argument("-q", "--quantize", default=None, metavar="MODE",
                   help="quantize the linear projections (per-channel scales) in the default "
                        "pipeline, or the KV cache (kv-int8, kv-fp8); with -p, write "
                        "quantize{mode=...} / quantize-kv-cache{dtype=...} in the pipeline")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibration (jaxrt calibrate) for -q w8a8-smoothquant (default: "
                        "a data-free calibration, made once per model file), or with "
                        "--gptq the calibration holding GPTQ's codes")
    p.add_argument("--gptq", action="store_true",
                   help="take -q's weight codes from --calib (jaxrt calibrate --gptq MODE) "
                        "instead of rounding to nearest")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: by device)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the engine over N devices (the shard pass; docs/parallelism.md)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="M")
    p.add_argument("--layers", choices=("auto", "scan", "unrolled"), default="auto",
                   help="scan: compile one layer body for the whole stack (fast compile); "
                        "unrolled: every layer apart (faster decode on GPUs); auto: scan on "
                        "CPUs, unrolled on accelerators")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)


def run(args) -> int:
    from jaxrt.compiler import layers_choice, load, save_engine
    from jaxrt.frontends.sources import resolve_model

    if resolve_model(args.model)[0] == "engine":
        raise InputError(f"{args.model}: already an engine directory")
    if args.quantize and args.pipeline:
        raise SettingError(f"-q {args.quantize} applies to the default pipeline; with -p, "
                           f"write quantize{{mode=...}} / quantize-kv-cache{{dtype=...}} in "
                           f"the pipeline")
    if args.gptq and not args.quantize:
        raise SettingError("--gptq chooses -q's weight codes; give -q MODE (with -p, write "
                           "quantize{method=gptq calib=DIR} in the pipeline)")
    if args.gptq and not args.calib:
        raise SettingError("--gptq needs --calib DIR, a calibration with GPTQ codes "
                           "(jaxrt calibrate MODEL --gptq MODE -o DIR)")
    start = time.perf_counter()
    model = load(args.model, pipeline=args.pipeline, dtype=args.dtype,
                 page_size=args.page_size, max_model_len=args.max_model_len,
                 max_num_seqs=args.max_num_seqs, outline_layers=layers_choice(args.layers),
                 quantize=args.quantize or "", calib=args.calib or "",
                 quant_method="gptq" if args.gptq else "rtn",
                 tensor_parallel=args.tensor_parallel,
                 data_parallel=args.data_parallel)
    save_engine(model, args.output)
    plan = model.module.attributes.get("kv_cache", {})
    print(f"wrote {args.output}: pipeline {model.pipeline}; kv cache "
          f"{plan.get('num_pages')} pages x {plan.get('page_size')} ({plan.get('dtype')}); "
          f"{time.perf_counter() - start:.1f} s")
    return 0
