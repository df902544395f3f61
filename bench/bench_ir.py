"""IR benchmark: print, parse and `canonicalize,cse,dce` on a Llama-3.1-8B decode graph.

    python bench/bench_ir.py [--layers 32] [--repeat 5] [--out bench/results/ir.json]

Times are the median over --repeat runs, each on a freshly built graph (building is not
timed). Parsing is skipped, with a message, until jaxrt.ir.parser exists.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.graphs import llama_decode_graph  # noqa: E402
from jaxrt.ir import verify  # noqa: E402
from jaxrt.ir.printer import print_module  # noqa: E402
from jaxrt.passes import PassManager  # noqa: E402

PIPELINE = "canonicalize,cse,dce"


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ir.json"))
    args = ap.parse_args(argv)

    module = llama_decode_graph(args.layers)
    ops_before = sum(len(f.ops) for f in module.functions.values())
    text = print_module(module)
    rows: dict[str, float | None] = {}
    rows["print"] = median_seconds(lambda: print_module(module), args.repeat)

    try:
        from jaxrt.ir.parser import parse
    except ImportError:
        print("parse: skipped (jaxrt.ir.parser.parse does not exist yet)", file=sys.stderr)
        rows["parse"] = None
    else:
        rows["parse"] = median_seconds(lambda: parse(text), args.repeat)

    pipeline_times, pass_times, rule_stats, ops_after = [], {}, None, 0
    for _ in range(args.repeat):
        fresh = llama_decode_graph(args.layers)
        pm = PassManager(PIPELINE)
        start = time.perf_counter()
        pm.run(fresh)
        pipeline_times.append(time.perf_counter() - start)
        for p in pm.stats.passes:
            pass_times.setdefault(p.name, []).append(p.seconds)
        rule_stats = pm.stats
        ops_after = sum(len(f.ops) for f in fresh.functions.values())
    verify(fresh)
    rows[PIPELINE] = statistics.median(pipeline_times)
    for name, times in pass_times.items():
        rows[f"  {name}"] = statistics.median(times)

    print(f"Llama-3.1-8B decode graph, {args.layers} layers: {ops_before} ops "
          f"({len(text) / 1e3:.0f} kB of text) -> {ops_after} ops after {PIPELINE}")
    print(f"{'step':<28} {'ms (median of ' + str(args.repeat) + ')':>20}")
    for name, secs in rows.items():
        shown = "skipped" if secs is None else f"{secs * 1e3:.2f}"
        print(f"{name:<28} {shown:>20}")

    result = {
        "graph": {"model": "llama-3.1-8b", "layers": args.layers, "ops": ops_before,
                  "ops_after": ops_after, "text_bytes": len(text)},
        "repeat": args.repeat,
        "seconds": rows,
        "pipeline_stats": rule_stats.to_json(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
