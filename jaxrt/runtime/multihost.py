"""Several processes (hosts), one sharded model: the scheduler on process 0, the step
everywhere (docs/parallelism.md).

Every process calls `initialize(...)` before touching a device, compiles the same
sharded module (`StepExecutable` builds its mesh from all processes' devices) and then:

    if jax.process_index() == 0:
        engine = Engine(LeaderRunner(exe), ...)     # scheduler, sampling, detokenizing
        ...; engine.close(); runner.stop()
    else:
        follow(exe)                                  # runs each step process 0 runs

A step's computation is one SPMD program over every process's devices, so every process
must launch the same programs in the same order. `LeaderRunner` wraps process 0's
runner: before each compile or run it broadcasts what it is about to do (a fixed-size
header, then the call's int32 arrays packed in one buffer) with
`multihost_utils.broadcast_one_to_all`; `follow` receives and repeats it. A decode call's
`feed` (tokens of an earlier call, still on the devices) is sent as that call's number.
Logits that the engine's full sampler reads (penalties, top-n logprobs, beams) are copied
to process 0's first device first, so that sampler runs on process 0 alone (a host round
trip, in that path only).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

_HEADER = 32
_OPS = ("stop", "compile_for", "compile_decode", "run_sampled", "decode")
_KEEP_FED = 4  # decode outputs kept for a later call's `feed` (the engine uses the last)


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`, with gloo collectives for CPU processes (JAX's CPU
    backend has no cross-process collectives without it)."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def _broadcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _send(op: str, ints: list[int], arrays: list[np.ndarray]) -> None:
    header = np.zeros(_HEADER, np.int32)
    shapes = [len(ints)] + ints + [len(arrays)]
    for a in arrays:
        shapes += [a.ndim, *a.shape]
    if len(shapes) + 2 > _HEADER:
        raise ValueError(f"multihost: {op} does not fit the header")
    header[0], header[1] = _OPS.index(op), sum(a.size for a in arrays)
    header[2:2 + len(shapes)] = shapes
    _broadcast(header)
    if arrays:
        _broadcast(np.concatenate([np.ascontiguousarray(a).view(np.int32).reshape(-1)
                                   for a in arrays]))


def _receive() -> tuple[str, list[int], list[np.ndarray]]:
    header = _broadcast(np.zeros(_HEADER, np.int32))
    op, size, rest = _OPS[int(header[0])], int(header[1]), [int(x) for x in header[2:]]
    n_ints = rest[0]
    ints, rest = rest[1:1 + n_ints], rest[1 + n_ints:]
    count, rest = rest[0], rest[1:]
    shapes = []
    for _ in range(count):
        ndim, rest = rest[0], rest[1:]
        shapes.append(tuple(rest[:ndim]))
        rest = rest[ndim:]
    arrays = []
    if count:
        flat, at = _broadcast(np.zeros(size, np.int32)), 0
        for shape in shapes:
            n = int(np.prod(shape, dtype=np.int64))
            arrays.append(flat[at:at + n].reshape(shape))
            at += n
    return op, ints, arrays


def _f32(a: np.ndarray) -> np.ndarray:
    return a.view(np.float32)


class LeaderRunner:
    """Process 0's runner: `StepExecutable`'s interface, each call mirrored on every
    other process (see the module docstring). Call `stop()` when done."""

    def __init__(self, exe):
        self._exe = exe
        self._lock = threading.Lock()  # one call at a time: the order is the protocol
        self._fed: dict[int, int] = {}  # id(decode tokens) -> call number
        self._outs: dict[int, Any] = {}
        self._calls = 0

    def __getattr__(self, name: str):
        return getattr(self._exe, name)

    def compile_for(self, T: int, S: int, Q: int, MP: int, N: int) -> float:
        with self._lock:
            _send("compile_for", [T, S, Q, MP, N], [])
            return self._exe.compile_for(T, S, Q, MP, N)

    def compile_decode(self, S: int, MP: int, num_steps: int) -> float:
        with self._lock:
            _send("compile_decode", [S, MP, num_steps], [])
            return self._exe.compile_decode(S, MP, num_steps)

    def run_sampled(self, tokens, positions, slot_mapping, page_table, context_lens,
                    q_index, logit_index, sampling):
        import jax
        arrays = [np.asarray(a, np.int32) for a in (tokens, positions, slot_mapping,
                                                     page_table, context_lens, q_index,
                                                     logit_index)]
        floats, ints = (np.asarray(sampling[0], np.float32), np.asarray(sampling[1],
                                                                          np.int32))
        with self._lock:
            _send("run_sampled", [], [*arrays, floats.view(np.int32), ints])
            sampled, logits = self._exe.run_sampled(*arrays, (floats, ints))
        local = jax.device_put(np.asarray(logits), jax.local_devices()[0])
        return sampled, local

    def run(self, *args):
        from .programs import greedy_sampling
        return self.run_sampled(*args, greedy_sampling(len(args[6])))[1]

    def decode(self, tokens, positions, page_table, steps_left, num_steps: int,
               sampling, feed=None, feed_at=None):
        s = len(tokens)
        if feed_at is None:
            feed_at = np.full((2, s), -1, np.int32)
        arrays = [np.asarray(a, np.int32) for a in (tokens, positions, page_table,
                                                     steps_left, feed_at)]
        floats, ints = (np.asarray(sampling[0], np.float32), np.asarray(sampling[1],
                                                                          np.int32))
        fed = -1 if feed is None else self._fed[id(feed)]
        with self._lock:
            _send("decode", [num_steps, fed], [*arrays, floats.view(np.int32), ints])
            out = self._exe.decode(*arrays[:4], num_steps, (floats, ints),
                                   feed=None if feed is None else self._outs[fed],
                                   feed_at=arrays[4])
            self._remember(out[0])
        return out

    def _remember(self, tokens) -> None:
        self._fed[id(tokens)] = self._calls
        self._outs[self._calls] = tokens
        old = self._calls - _KEEP_FED
        if old in self._outs:
            self._fed.pop(id(self._outs.pop(old)), None)
        self._calls += 1

    def stop(self) -> None:
        """Release the followers (their `follow` returns)."""
        with self._lock:
            _send("stop", [], [])


def follow(exe) -> int:
    """Run every compile and step process 0's `LeaderRunner` runs, until it stops;
    returns the number of runs."""
    outs: dict[int, Any] = {}
    calls = runs = 0
    while True:
        op, ints, arrays = _receive()
        if op == "stop":
            return runs
        if op == "compile_for":
            exe.compile_for(*ints)
        elif op == "compile_decode":
            exe.compile_decode(*ints)
        elif op == "run_sampled":
            *args, floats, sampling_ints = arrays
            exe.run_sampled(*args, (_f32(floats), sampling_ints))
            runs += 1
        elif op == "decode":
            num_steps, fed = ints
            tokens, positions, page_table, steps_left, feed_at, floats, sampling_ints = \
                arrays
            out = exe.decode(tokens, positions, page_table, steps_left, num_steps,
                             (_f32(floats), sampling_ints),
                             feed=None if fed < 0 else outs[fed], feed_at=feed_at)
            outs[calls] = out[0]
            outs.pop(calls - _KEEP_FED, None)
            calls += 1
            runs += 1
