"""Paged attention on a GPU: jaxrt's Mosaic GPU kernel against XLA and the deprecated
bundled Triton kernel, checked first, then timed (issue 12).

    python bench/bench_attention.py --out attention.json

1. Ceilings: HBM copy bandwidth (a 2 GiB bf16 read + write) measured in the same run.
2. Checks: the kernel against an f32 reference on fresh random data (page sizes 16..128,
   GQA ratios, Q = 1 / 5 / 16 queries a row, soft-cap, sliding window, empty rows,
   contexts ending mid-block), relative error < 2e-2 (bf16 operands).
3. Decode timing: batch 64, 32 query / 8 KV heads, head_dim 128, pages of 16, contexts
   512 / 2,048 / 8,192; bytes = K + V of every context token; TB/s against the copy
   ceiling. Batch 1 and Q > 1 rows (verify k = 4, prefill rows of 16) too.
Each timing is the median of several runs of a jitted call (events are not needed: the
call is synchronised and each run is hundreds of microseconds at least).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timeit(fn, *args, reps=20, inner=10):
    """Median seconds a call: `reps` samples of `inner` back-to-back calls with one sync
    each, as a model issues its layers' attention calls one after another (and as the
    copy and matmul ceilings are timed): a sync per call would add its round trip, tens of
    microseconds, to calls of ~100 us."""
    import jax
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return float(np.median(times))


def copy_bandwidth():
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a * 2)
    t = timeit(f, x, reps=10)
    return 2 * x.nbytes / t / 1e12


def make_case(rng, *, b, h, kvh, d, ps, ctx, n_q, extra_pages=0):
    import jax
    import jax.numpy as jnp
    mp = -(-max(ctx) // ps)
    pages = b * mp + extra_pages + 1
    kv = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))),
                           (1, 2, pages, ps, kvh, d), jnp.bfloat16)
    table = rng.permutation(pages)[:b * mp].reshape(b, mp)
    q = rng.standard_normal((b, n_q, h, d), dtype=np.float32)
    ctx = np.asarray(ctx, np.int32)
    q_start = np.maximum(ctx - n_q, 0).astype(np.int32)
    return (jnp.asarray(q, jnp.bfloat16), kv,
            jnp.asarray(table, jnp.int32), jnp.asarray(ctx), jnp.asarray(q_start))


def xla_paged(q, kv, layer, table, ctx, q_start, *, scale, softcap=None, window=None):
    """XLA today: gather the table's pages, attend densely (jaxrt's `attend`)."""
    import jax.numpy as jnp
    from types import SimpleNamespace

    from jaxrt.lowering.xla.attention import attend
    b, n_q, h, d = q.shape
    ps, kvh = kv.shape[3], kv.shape[4]
    mp = table.shape[1]
    k = kv[layer, 0][table].reshape(b, mp * ps, kvh, d)
    v = kv[layer, 1][table].reshape(b, mp * ps, kvh, d)
    attrs = SimpleNamespace(scale=scale, softcap=softcap, causal=True, window=window)
    q_pos = q_start[:, None] + jnp.arange(n_q)[None]
    k_pos = jnp.arange(mp * ps)
    out = attend(q.reshape(b, n_q, kvh, h // kvh, d), k, v, q_pos, k_pos,
                 k_pos[None] < ctx[:, None], attrs)
    return out.reshape(b, n_q, h, d).astype(q.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer timing cases")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from jaxrt.lowering.pallas import paged_attention_mgpu as K
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rng = np.random.default_rng(0)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    bw = copy_bandwidth()
    result["copy_tb_s"] = bw
    print(f"copy bandwidth: {bw:.2f} TB/s", flush=True)

    # ---- checks -------------------------------------------------------------------
    checks = []
    cases = [
        dict(b=3, h=32, kvh=8, d=128, ps=16, ctx=[1, 70, 300], n_q=1),
        dict(b=4, h=9, kvh=3, d=64, ps=16, ctx=[0, 17, 64, 129], n_q=1),
        dict(b=2, h=4, kvh=1, d=256, ps=32, ctx=[40, 500], n_q=1, softcap=50.0),
        dict(b=2, h=32, kvh=8, d=128, ps=64, ctx=[200, 1000], n_q=5),
        dict(b=2, h=32, kvh=8, d=128, ps=128, ctx=[129, 700], n_q=16, window=100),
        dict(b=3, h=12, kvh=4, d=64, ps=16, ctx=[16, 33, 2048], n_q=16, softcap=30.0),
        dict(b=1, h=32, kvh=8, d=128, ps=16, ctx=[4000], n_q=1),
    ]
    for c in cases:
        softcap, window = c.pop("softcap", None), c.pop("window", None)
        q, kv, table, ctx, q_start = make_case(rng, **c)
        scale = c["d"] ** -0.5
        try:
            out = jax.jit(lambda *a: K.paged_attention(
                *a, scale=scale, softcap=softcap, window=window))(q, kv, 0, table, ctx,
                                                                  q_start)
            ref = K.reference(q, kv, 0, table, ctx, q_start, scale=scale, softcap=softcap,
                              window=window)
            out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
            err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
            ok = bool(np.isfinite(out).all() and err < 2e-2)
            rec = dict(c, softcap=softcap, window=window, rel_err=err, ok=ok)
        except Exception as e:  # noqa: BLE001 - report and go on
            rec = dict(c, softcap=softcap, window=window, error=f"{type(e).__name__}: "
                       f"{str(e)[:2000]}", ok=False)
        checks.append(rec)
        print("check", {k: v for k, v in rec.items()}, flush=True)
    result["checks"] = checks
    all_ok = all(c["ok"] for c in checks)

    # ---- timing -------------------------------------------------------------------
    timings = []
    # the default first; then bigger blocks, a 2-stage ring (two programs fit an SM's
    # shared memory), twice the programs (more splits), deeper rings
    configs = [K.Config(), K.Config(128, 2), K.Config(64, 2),
               K.Config(64, 4, min_programs=528), K.Config(64, 6), K.Config(128, 3)]
    shapes = [(64, 1, 512), (64, 1, 2048), (64, 1, 8192), (1, 1, 2048), (1, 1, 8192),
              (64, 5, 2048), (1, 5, 2048), (8, 16, 2048)]
    if args.quick:  # the three decode points, one Q > 1 row each, four configs
        configs = configs[:4]
        shapes = [(64, 1, 512), (64, 1, 2048), (64, 1, 8192), (1, 1, 2048), (64, 5, 2048),
                  (8, 16, 2048)]
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as triton_pa
    except Exception:  # noqa: BLE001
        triton_pa = None
    for b, n_q, ctx_len in shapes:
        if not all_ok:
            break
        h, kvh, d, ps = 32, 8, 128, 16
        q, kv, table, ctx, q_start = make_case(rng, b=b, h=h, kvh=kvh, d=d, ps=ps,
                                               ctx=[ctx_len] * b, n_q=n_q)
        nbytes = b * ctx_len * kvh * d * 2 * 2
        scale = d ** -0.5
        row = {"batch": b, "q": n_q, "context": ctx_len, "bytes": nbytes}
        xla = jax.jit(lambda *a: xla_paged(*a, scale=scale))
        try:
            row["xla_us"] = timeit(xla, q, kv, 0, table, ctx, q_start) * 1e6
        except Exception as e:  # noqa: BLE001
            row["xla_error"] = str(e)[:300]
        best = None
        for cfg in configs:
            f = jax.jit(lambda *a, cfg=cfg: K.paged_attention(*a, scale=scale, config=cfg))
            name = f"kernel_bk{cfg.block_kv}_st{cfg.stages}_mp{cfg.min_programs}_us"
            try:
                row[name] = t = timeit(f, q, kv, 0, table, ctx, q_start) * 1e6
                best = t if best is None else min(best, t)
            except Exception as e:  # noqa: BLE001
                row[name.replace("_us", "_error")] = str(e)[:300]
        row["kernel_best_us"] = best
        if triton_pa is not None and n_q == 1:
            kp = jnp.transpose(kv[0, 0], (2, 0, 1, 3))   # [KVH, pages, ps, D]
            vp = jnp.transpose(kv[0, 1], (2, 0, 1, 3))
            qs = q[:, 0] * scale
            tf = jax.jit(lambda qs, kp, vp, t, c: triton_pa.paged_attention(
                qs, kp, vp, t, c, k_splits=max(1, min(16, 132 // (b * kvh)))))
            try:
                row["triton_us"] = timeit(tf, qs, kp, vp, table, ctx) * 1e6
            except Exception as e:  # noqa: BLE001
                row["triton_error"] = str(e)[:300]
        for key in ("xla_us", "kernel_best_us", "triton_us"):
            if row.get(key):
                row[key.replace("_us", "_tb_s")] = nbytes / (row[key] * 1e-6) / 1e12
        timings.append(row)
        print("time", row, flush=True)
    result["timings"] = timings
    print("\n| batch | Q | context | XLA TB/s | Triton TB/s | kernel TB/s | kernel us | "
          f"of copy ({bw:.2f}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in timings:
        f = lambda k: f"{r[k]:.2f}" if r.get(k) else "-"  # noqa: E731
        print(f"| {r['batch']} | {r['q']} | {r['context']} | {f('xla_tb_s')} | "
              f"{f('triton_tb_s')} | {f('kernel_best_tb_s')} | "
              f"{r['kernel_best_us'] or 0:.0f} | "
              f"{(r.get('kernel_best_tb_s') or 0) / bw:.0%} |")
    print("checks:", "all passed" if all_ok else "FAILED")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
