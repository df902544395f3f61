"""The GPU benchmark suite (issue 12): one process measures the ceilings and, per model,
jaxrt's decode, offline, prefill and warm-up figures; writes one JSON and a PNG chart.

    python bench/bench_suite.py --out $OUT/suite.json --chart $OUT/suite_chart.png
    python bench/bench_suite.py --tiny --out /tmp/suite.json       # CPU, tiny shapes, < 2 min
    python bench/bench_suite.py --chart-only --results suite.json --peers peer_jax.json \
        --chart bench/results/suite_chart.png                       # redraw anywhere

Random weights at the real shapes (bench/bench_gpu.py SHAPES; speed does not depend on the
values), bf16 on a GPU. Every prompt is 128 random tokens and every request makes 128 new
tokens (`ignore_eos`), as the peers (shared/peers/peer_gpu.py) do.

1. Ceilings, in the same run: HBM copy bandwidth (a 1 GiB f32 `a + 1`: read + write) and a
   bf16 matmul peak (8192^3 `jnp.dot`); each the median of 5 samples of 10 back-to-back
   calls.
2. Paged decode attention at batch 64, 32 query / 8 KV heads, head_dim 128, pages of 16,
   contexts 512 / 2,048 / 8,192 (bench/bench_attention.py's cases): XLA's gather + einsum
   and, on a Hopper GPU, jaxrt's Mosaic GPU kernel; bytes = K + V of every context token.
3. Per model, with one compiled runner (max_num_seqs 256, max_model_len 4,096):
   - warm-up: `Engine(runner, max_num_seqs=256)` construction (its blocking warm-up
     compiles every step bucket) plus the first `generate` (one request);
   - decode at batch 1, 16, 64 and 256: B requests at once through that engine, otherwise
     Engine's defaults (decode_steps, budget max(B, 512) tokens, bucket growth) as a
     newcomer gets them. `output_tok_s` = B x 128 / wall time, prefill included (the
     peers' definition); `decode_tok_s` = B / median time per output token. The
     roofline: weight bytes streamed once per step at the copy bandwidth, B x
     (copy bandwidth / weight bytes) at batch B, capped by the compute ceiling (matmul
     peak / 2 FLOPs per matmul weight per token); KV reads and attention are left out, so
     it bounds from above;
   - prefill of 2,048 tokens (one step, one sequence), as MFU against the measured matmul
     peak: FLOPs = 2 * P_layers * n + 2 * hidden * vocab (the last row's logits only)
     + 2 * layers * heads * head_dim * n^2 (causal QK^T and PV: 2 matmuls x 2 FLOPs x
     head_dim x n^2 / 2 pairs), P_layers = the q/k/v/o/gate/up/down weights.
     `mfu_all_weights` counts 2 * (all parameters) * n instead, the formula of the
     figures in issue 12 (it counts the embedding table and every row's LM head);
   - with --offline, 512 requests of 128/128 on `Engine(max_num_seqs=256,
     max_num_batched_tokens=4096)` (bench/bench_decode.py's offline figure).
Each part is guarded: an error is recorded in the JSON and the suite goes on; past
--time-budget seconds the remaining parts are skipped. The JSON is rewritten after every
part, so a run stopped from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import suite_chart  # noqa: E402

# Shapes and sizes of a full run and of --tiny (CPU, end to end in under two minutes:
# there its decode engine's budget is 64 tokens, not Engine's default 512, whose prefill
# buckets take most of a minute to compile on two cores).
FULL = SimpleNamespace(models="smollm2-135m,llama-3.2-1b,llama-3.1-8b", batches="1,16,64,256",
                       input_len=128, output_len=128, prefill_len=2048, max_model_len=4096,
                       offline_requests=512, offline_budget=4096, copy_mib=1024,
                       matmul=8192, attention=dict(b=64, h=32, kvh=8, d=128, ps=16),
                       contexts=(512, 2048, 8192), time_budget=540.0, engine_budget=None)
TINY = SimpleNamespace(models="tiny", batches="1,4,16", input_len=16, output_len=16,
                       prefill_len=64, max_model_len=256, offline_requests=32,
                       offline_budget=128, copy_mib=16, matmul=256,
                       attention=dict(b=4, h=4, kvh=2, d=64, ps=16), contexts=(64, 256),
                       time_budget=110.0, engine_budget=64)
TINY_SHAPE = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=512)


def samples(fn, *args, inner: int = 10, outer: int = 5) -> float:
    """Median seconds of one call of `fn`: `outer` samples of `inner` back-to-back calls
    (one sync per sample, so its cost is spread over `inner` calls)."""
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(outer):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return float(np.median(times))


def copy_bandwidth(mib: int) -> float:
    """Bytes/s of an elementwise pass over `mib` MiB of f32 (read + write)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((mib << 18,), jnp.float32)
    return 2 * x.nbytes / samples(jax.jit(lambda a: a + 1.0), x)


def matmul_peak(n: int) -> float:
    """FLOP/s of an n^3 bf16 `jnp.dot`."""
    import jax
    import jax.numpy as jnp
    k = jax.random.key(0)
    a = jax.random.normal(k, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(k, 1), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / samples(jax.jit(jnp.dot), a, b)


def model_config(name: str, max_len: int):
    if name != "tiny":
        from bench.bench_gpu import config_for
        return config_for(name, max_len)
    from jaxrt.frontends.config import ModelConfig
    s = TINY_SHAPE
    return ModelConfig(arch="llama", vocab_size=s["vocab"], hidden_size=s["hidden"],
                       intermediate_size=s["inter"], num_layers=s["layers"],
                       num_heads=s["heads"], num_kv_heads=s["kv"],
                       head_dim=s["hidden"] // s["heads"], max_position=max_len,
                       tie_embeddings=True, model_type="tiny")


def param_counts(config) -> tuple[int, int]:
    """(every parameter, the layers' matmul weights q/k/v/o/gate/up/down)."""
    from jaxrt.frontends.loaded import expected_weight_shapes
    shapes = expected_weight_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    layers = sum(int(np.prod(s)) for n, s in shapes.items()
                 if ".layers." in n and n.endswith("proj.weight"))
    return total, layers


def prefill_mfu(exe, config, n: int, peak: float, reps: int = 5) -> dict:
    """One step prefilling an n-token prompt (one sequence); MFU as the module docstring
    states."""
    import jax
    from bench.bench_gpu import prefill_args
    total, layer_params = param_counts(config)
    args = prefill_args(exe, config, n)
    compile_s = exe.compile_for(n, 1, n, args[3].shape[1], 1)
    jax.block_until_ready(exe.run(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(exe.run(*args))
        times.append(time.perf_counter() - t)
    step = float(np.median(times))
    attention = 2 * config.num_layers * config.num_heads * config.head_dim * n * n
    flops = 2 * layer_params * n + 2 * config.hidden_size * config.vocab_size + attention
    return {"tokens": n, "step_s": step, "tok_s": n / step, "flops": flops,
            "mfu": flops / step / peak,
            "mfu_all_weights": (2 * total * n + attention) / step / peak,
            "compile_s": compile_s}


def decode_point(engine, batch: int, s, repeats: int, roof_b1: float, ceiling: float) -> dict:
    from jaxrt.runtime.benchmark import Workload, run_workload
    runs = [run_workload(engine, Workload(batch, s.input_len, s.output_len))
            for _ in range(repeats)]
    rates = [r["output_tok_s"] for r in runs]
    mid = runs[int(np.argsort(rates)[len(rates) // 2])]
    roof = min(batch * roof_b1, ceiling)
    return {"batch": batch, "output_tok_s": float(np.median(rates)), "runs_tok_s": rates,
            "decode_tok_s": batch / mid["tpot_p50_s"] if mid["tpot_p50_s"] else None,
            "ttft_p50_s": mid["ttft_p50_s"], "tpot_p50_s": mid["tpot_p50_s"],
            "wall_s": mid["wall_s"], "roofline_tok_s": roof,
            "fraction_of_roofline": float(np.median(rates)) / roof,
            "preemptions": mid["preemptions"],
            "compiles_after_warmup": engine.stats().compiles_after_warmup}


class Suite:
    """The report and its guarded parts: each part's result or error lands in the JSON,
    which is written after every part."""

    def __init__(self, args, report: dict):
        self.args, self.report = args, report
        self.deadline = time.perf_counter() + args.time_budget

    def save(self):
        with open(self.args.out, "w") as f:
            json.dump(self.report, f, indent=1, default=str)

    def part(self, where: dict, key: str, fn, *a, **kw):
        """where[key] = fn(*a, **kw), or the error / the skip under where["errors"]."""
        if time.perf_counter() > self.deadline:
            where.setdefault("skipped", []).append(key)
            print(f"skipped {key}: past --time-budget", flush=True)
            return None
        t = time.perf_counter()
        try:
            where[key] = value = fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - a GPU run reports every part it can
            where.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:1500]}"
            traceback.print_exc()
            value = None
        print(f"[{time.perf_counter() - t:6.1f}s] {where.get('model', '')} {key}: "
              f"{json.dumps(where.get(key, where.get('errors', {}).get(key)), default=str)[:400]}",
              flush=True)
        self.save()
        return value


def bench_model(suite: Suite, name: str, bw: float, peak: float) -> dict:
    from jaxrt.compiler import compile_loaded
    from jaxrt.ir.weights import resident_weights
    from jaxrt.runtime.benchmark import Workload, run_workload
    from jaxrt.runtime.engine import Engine
    from jaxrt.runtime.request import SamplingParams

    from bench.bench_layers import ViewWeights
    args, s = suite.args, suite.args.shapes
    batches = [int(b) for b in args.batches.split(",")]
    out = {"model": name}
    suite.report["models"].append(out)
    config = model_config(name, s.max_model_len)

    def load():
        t0 = time.perf_counter()
        loaded = SimpleNamespace(config=config, weights=ViewWeights(config), tokenizer=None,
                                 chat_template=None, source=f"random:{name}")
        model = compile_loaded(loaded, max_model_len=s.max_model_len,
                               max_num_seqs=max(batches))
        exe = model.executable()
        # what a decode step reads: the weights on the device, at their compute dtype
        wbytes = sum(exe.module.weights[n].nbytes() for n in resident_weights(exe.module))
        total, layer_params = param_counts(config)
        out.update(weight_bytes=wbytes, params=total, layer_matmul_params=layer_params,
                   num_pages=exe.num_pages, roofline_tok_s_b1=bw / wbytes,
                   compute_ceiling_tok_s=peak / (2 * (layer_params + config.hidden_size
                                                      * config.vocab_size)),
                   roofline_note="roofline at batch B = min(B x roofline_tok_s_b1, "
                                 "compute_ceiling_tok_s); KV-cache reads left out")
        box["exe"] = exe
        return {"seconds": time.perf_counter() - t0}

    box = {}
    if suite.part(out, "load", load) is None:
        return out
    exe = box.pop("exe")

    def warmup():
        t0 = time.perf_counter()
        box["engine"] = eng = Engine(exe, max_num_seqs=max(batches), warmup=True,
                                     max_num_batched_tokens=s.engine_budget, log=sys.stderr)
        built = time.perf_counter() - t0
        prompt = Workload(1, s.input_len, s.output_len).prompts(config.vocab_size)
        eng.generate(prompt, SamplingParams(max_tokens=s.output_len, ignore_eos=True))
        st = eng.stats()
        return {"seconds": time.perf_counter() - t0, "construct_s": built,
                "first_generate_s": time.perf_counter() - t0 - built,
                "engine_warmup_s": st.warmup_seconds, "buckets": st.num_buckets,
                "decode_steps": eng.decode_steps, "max_num_batched_tokens":
                eng.config.max_num_batched_tokens}

    if suite.part(out, "warmup", warmup) is not None:
        out["decode"] = []
        for b in batches:
            point = suite.part(out, f"decode_b{b}", decode_point, box["engine"], b, s,
                               args.repeats, out["roofline_tok_s_b1"],
                               out["compute_ceiling_tok_s"])
            out.pop(f"decode_b{b}", None)
            if point is not None:
                out["decode"].append(point)
                suite.save()
    box.clear()
    gc.collect()
    suite.part(out, "prefill", prefill_mfu, exe, config, s.prefill_len, peak)

    def offline():
        eng = Engine(exe, max_num_seqs=max(batches), max_num_batched_tokens=s.offline_budget,
                     warmup=True, log=sys.stderr)
        row = run_workload(eng, Workload(s.offline_requests, s.input_len, s.output_len))
        row.update(max_num_seqs=max(batches), max_num_batched_tokens=s.offline_budget)
        return row

    if name in args.offline:
        suite.part(out, "offline", offline)
    return out


def attention_bandwidth(s, bw: float) -> list[dict]:
    """Paged decode attention at the module docstring's shapes: XLA, and the kernel on a
    Hopper GPU; TB/s and the fraction of the copy bandwidth."""
    import jax

    from bench.bench_attention import make_case, timeit, xla_paged
    from jaxrt.lowering.pallas import hopper
    from jaxrt.lowering.pallas import paged_attention_mgpu as K
    rng = np.random.default_rng(0)
    c = s.attention
    rows = []
    for ctx in s.contexts:
        q, kv, table, lens, q_start = make_case(rng, b=c["b"], h=c["h"], kvh=c["kvh"],
                                                d=c["d"], ps=c["ps"], ctx=[ctx] * c["b"],
                                                n_q=1)
        nbytes = c["b"] * ctx * c["kvh"] * c["d"] * 2 * 2
        scale = c["d"] ** -0.5
        row = {"batch": c["b"], "context": ctx, "bytes": nbytes}
        impls = {"xla": jax.jit(lambda *a: xla_paged(*a, scale=scale))}
        if hopper():
            impls["kernel"] = jax.jit(lambda *a: K.paged_attention(*a, scale=scale))
        for key, f in impls.items():
            try:
                t = timeit(f, q, kv, 0, table, lens, q_start)
                row[f"{key}_TB_s"] = nbytes / t / 1e12
                row[f"{key}_of_copy"] = nbytes / t / bw
            except Exception as e:  # noqa: BLE001
                row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        rows.append(row)
        del q, kv
    return rows


def git_commit() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # a copy of the tree without its .git


def chart(results: dict, peers: list[dict], path: str) -> None:
    try:
        suite_chart.draw(results, peers, path)
        print(f"wrote {path}", flush=True)
    except ImportError as e:  # a device without matplotlib: redraw with --chart-only
        print(f"no chart ({e}); redraw with --chart-only", flush=True)


def chart_only(args) -> int:
    from jaxrt.errors import InputError
    try:
        if not args.results:
            raise InputError("--chart-only needs --results FILE (a bench_suite JSON)")
        with open(args.results) as f:
            results = json.load(f)
        peers = suite_chart.load_peers(args.peers)
        suite_chart.draw(results, peers, args.chart)
    except (OSError, json.JSONDecodeError, InputError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.chart} ({len(results.get('models', []))} models, {len(peers)} peer "
          f"points)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**results, "peers": peers}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help=f"default: {FULL.models}")
    p.add_argument("--batches", default=None, help=f"default: {FULL.batches}")
    p.add_argument("--offline", default=None,
                   help="models that also run offline 512 x 128/128 (default: all; '' none)")
    p.add_argument("--repeats", type=int, default=2, help="runs per decode point (median)")
    p.add_argument("--quick", action="store_true",
                   help="batches 1 and 64, one run each, offline for the last model only")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on any backend (CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds; later parts are skipped (default {FULL.time_budget:.0f}, "
                        f"--tiny {TINY.time_budget:.0f})")
    p.add_argument("--out", default=None,
                   help="the JSON (default $OUT/suite.json, else bench/results/suite.json)")
    p.add_argument("--chart", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--peers", default="", help="peer_gpu.py output(s), comma-separated")
    p.add_argument("--chart-only", action="store_true",
                   help="redraw --chart from --results and --peers; --out FILE also writes "
                        "the results with the peer points merged in")
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    args.peers = [x for x in args.peers.split(",") if x]
    if args.chart_only:
        if args.chart is None:
            args.chart = os.path.splitext(args.results or "suite")[0] + ".png"
        return chart_only(args)
    s = args.shapes = TINY if args.tiny else FULL
    args.models = args.models or s.models
    args.batches = args.batches or ("1,64" if args.quick and not args.tiny else s.batches)
    models = args.models.split(",")
    if args.offline is None:
        args.offline = models[-1:] if args.quick else models
    else:
        args.offline = [m for m in args.offline.split(",") if m]
    if args.quick:
        args.repeats = 1
    args.time_budget = args.time_budget or s.time_budget
    args.out = args.out or os.path.join(os.environ.get("OUT", "bench/results"), "suite.json")
    args.chart = args.chart or os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    import jax

    from jaxrt.lowering.pallas import default_backends, kernels_mode
    start = time.perf_counter()
    dev = jax.devices()[0]
    report = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
              "jax": jax.__version__, "backends": list(default_backends()),
              "kernels": kernels_mode(), "commit": git_commit(),
              "args": {k: v for k, v in vars(args).items() if k != "shapes"},
              "shapes": vars(s), "models": []}
    suite = Suite(args, report)
    bw = suite.part(report, "copy_bandwidth_GBps", lambda: copy_bandwidth(s.copy_mib) / 1e9)
    peak = suite.part(report, "bf16_matmul_TFLOPs", lambda: matmul_peak(s.matmul) / 1e12)
    if bw is None or peak is None:
        return 1
    bw, peak = bw * 1e9, peak * 1e12
    if not args.no_attention:
        suite.part(report, "attention", attention_bandwidth, s, bw)
    for name in models:
        bench_model(suite, name, bw, peak)
        gc.collect()
    report["seconds"] = time.perf_counter() - start
    try:  # peers that ran before this process, in the same lease
        report["peers"] = suite_chart.load_peers(args.peers)
    except (OSError, UnicodeDecodeError) as e:
        print(f"peers not read ({e}); add them with --chart-only", flush=True)
        report["peers"] = []
    suite.save()
    chart(report, report["peers"], args.chart)
    print_summary(report)
    return 0


def print_summary(r: dict) -> None:
    print(f"\n{r['device']}: copy {r['copy_bandwidth_GBps']:.4g} GB/s, bf16 matmul "
          f"{r['bf16_matmul_TFLOPs']:.3g} TFLOP/s, {r['seconds']:.0f} s in all")
    for a in r.get("attention") or []:
        tb = lambda k: f"{a[k]:.3g} TB/s ({a[k.replace('TB_s', 'of_copy')]:.0%} of copy)" \
            if k in a else "-"  # noqa: E731
        print(f"attention b{a['batch']} ctx {a['context']}: XLA {tb('xla_TB_s')}, kernel "
              f"{tb('kernel_TB_s')}")
    for m in r["models"]:
        pts = " ".join(f"b{d['batch']} {d['output_tok_s']:.0f} ({d['fraction_of_roofline']:.0%})"
                       for d in m.get("decode", []))
        pf, off, w = m.get("prefill") or {}, m.get("offline") or {}, m.get("warmup") or {}
        print(f"{m['model']}: warm-up {w.get('seconds', 0):.1f}s; decode tok/s (of "
              f"roofline) {pts}; prefill {pf.get('tokens', 0)} MFU {pf.get('mfu', 0):.1%}; "
              f"offline {off.get('output_tok_s', 0):.0f} tok/s"
              + (f"; errors {sorted(m['errors'])}" if m.get("errors") else "")
              + (f"; skipped {m['skipped']}" if m.get("skipped") else ""))


if __name__ == "__main__":
    sys.exit(main())
