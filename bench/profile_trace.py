"""Per-step breakdown of an engine run from a JAX profiler trace (issue 10's closing note).

    with profile_steps(engine) as prof:      # wraps engine.step in a TraceAnnotation
        engine.generate(...)
    print(prof.summary())                    # host µs, device µs, GPU idle µs per step

From the trace (`jax.profiler`, XPlane read back with `jax.profiler.ProfileData`):
- **step wall**: each `Engine.step()` call on the host, start to end;
- **device busy**: the union of the GPU's kernel and copy intervals (every "Stream" line
  of the GPU plane), in the window between the first and the last step;
- **GPU idle**: that window minus device busy, per step: the time the device waited for
  the host (or for a host round trip inside a program, such as a while loop's predicate);
- **host**: each step's wall time minus the time it spent blocked on the device (Python
  trace events whose names show a blocking transfer).
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time

STEP = "jaxrt.engine.step"
# host events that wait for the device (names as the Python tracer and PJRT record them)
_BLOCKING = ("device_get", "block_until_ready", "_value", "__array__", "ToLiteral",
             "_single_device_array_to_np_array", "copy_to_host")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(union: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in union)


class StepProfile:
    def __init__(self, trace_dir: str):
        self.trace_dir = trace_dir
        self.wall_s = 0.0

    def analyze(self) -> dict:
        from jax.profiler import ProfileData
        files = sorted(glob.glob(os.path.join(self.trace_dir, "**", "*.xplane.pb"),
                                 recursive=True))
        if not files:
            return {"error": "no trace written"}
        data = ProfileData.from_file(files[-1])
        steps, blocking, device = [], [], []
        kernels: dict[str, list[float]] = {}   # name -> [count, total ns]
        for plane in data.planes:
            if plane.name.startswith("/device:GPU"):
                for line in plane.lines:
                    if line.name.startswith("Stream"):
                        device += [(e.start_ns, e.start_ns + e.duration_ns)
                                   for e in line.events]
                        for e in line.events:
                            k = kernels.setdefault(e.name[:80], [0, 0.0])
                            k[0] += 1
                            k[1] += e.duration_ns
            elif plane.name == "/host:CPU":
                for line in plane.lines:
                    for e in line.events:
                        span = (e.start_ns, e.start_ns + e.duration_ns)
                        if e.name == STEP:
                            steps.append(span)
                        elif any(k in e.name for k in _BLOCKING):
                            blocking.append(span)
        if not steps:
            return {"error": "no engine steps in the trace"}
        steps.sort()
        busy, blocked = _union(device), _union(blocking)
        rows = []
        for lo, hi in steps:
            wall = hi - lo
            dev = _overlap(busy, lo, hi)
            rows.append({"wall_us": wall / 1e3, "device_busy_us": dev / 1e3,
                         "gpu_idle_us": (wall - dev) / 1e3,
                         "host_us": (wall - _overlap(blocked, lo, hi)) / 1e3})
        lo, hi = steps[0][0], steps[-1][1]
        window = hi - lo
        dev = _overlap(busy, lo, hi)

        def median(key):
            vals = sorted(r[key] for r in rows)
            return vals[len(vals) // 2]

        return {"steps": len(rows), "window_ms": window / 1e6,
                "device_busy_fraction": dev / window if window else 0.0,
                "gpu_idle_ms": (window - dev) / 1e6,
                "kernels": len(device),
                "top_kernels": [{"name": n, "count": c, "total_us": t / 1e3}
                                for n, (c, t) in sorted(kernels.items(),
                                                        key=lambda kv: -kv[1][1])[:20]],
                "median_step": {k: median(k) for k in rows[0]},
                "host_us_per_step_mean": sum(r["host_us"] for r in rows) / len(rows),
                "device_available": bool(device)}


@contextlib.contextmanager
def profile_steps(engine, trace_dir: str | None = None):
    """Trace everything in the block, with each `engine.step` call annotated."""
    import jax
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxrt-trace-")
    prof = StepProfile(trace_dir)
    inner = engine._step

    def step():
        with jax.profiler.TraceAnnotation(STEP):
            return inner()

    engine._step = step
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    try:
        yield prof
    finally:
        prof.wall_s = time.perf_counter() - start
        jax.profiler.stop_trace()
        engine._step = inner
