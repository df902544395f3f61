"""One thread owns the Engine; everyone else talks to it through an inbox.

    loop = EngineLoop(engine, max_pending=256)
    loop.start()
    loop.submit([Submission(rid, prompt_ids, params)], sink)   # any thread
    loop.abort(rid)                                              # any thread
    loop.shutdown()                                              # aborts what is left

`submit` and `abort` only append to deques under a condition variable and wake the
thread; the thread is the only caller of `Engine.open_stream`, `Engine.step` and
`Engine.abort`, and blocks on the condition while there is nothing to do. A `sink` is a
callable the engine thread calls with each event of a request, in order:
`("accepted", rid)` or `("error", rid, ValueError)`, then `StreamDelta`s (the last one has
`finish_reason`). An asyncio handler turns it into a queue with `call_soon_threadsafe`.

Back-pressure: `submit` refuses (`Overloaded`) when `max_pending` requests are accepted
and not finished, so the inbox, the scheduler's queue and the per-request buffers stay
bounded. Parallel samples (`n` > 1) of one prompt are submitted as a group: the first is
queued at once, the others once its prompt is in the KV cache, so they take its full
pages from the prefix cache instead of computing them again.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ..runtime.request import SamplingParams, StreamDelta

Sink = Callable[[Any], None]


class Overloaded(Exception):
    """Too many requests pending: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The loop is stopping (or stopped after an engine failure): no new requests."""


@dataclass(frozen=True)
class Submission:
    request_id: str
    prompt: Any                    # token ids (or text, tokenized by the engine)
    params: SamplingParams


@dataclass
class _Tracked:
    stream: Any                    # RequestStream
    sink: Sink
    submitted: float               # perf_counter when the handler submitted it
    prompt_len: int
    first_token: float | None = None
    last_token: float | None = None


class EngineLoop:
    def __init__(self, engine, *, max_pending: int = 256, metrics: Any = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        self._cond = threading.Condition()
        self._adds: deque[tuple[list[Submission], Sink, float]] = deque()
        self._aborts: deque[str] = deque()
        self._pending = 0              # accepted by submit(), not finished or refused
        self._stopping = False
        self._draining = False         # refusing new requests, finishing the others
        self._failed: BaseException | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._groups: list[tuple[str, list[Submission], Sink, float]] = []  # leader, rest
        self._thread = threading.Thread(target=self._main, name="jaxrt-engine", daemon=True)
        self._preemptions = 0

    # ---- any thread -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, group: list[Submission], sink: Sink) -> None:
        """Queue requests (parallel samples of one prompt share `sink`); Overloaded when
        the limit would be passed, ShuttingDown when the loop stops."""
        with self._cond:
            if self._stopping or self._draining or self._failed is not None:
                raise ShuttingDown("the server is shutting down" if self._failed is None
                                   else f"the engine failed: {self._failed}")
            if self._pending + len(group) > self.max_pending:
                raise Overloaded(f"{self._pending} requests are pending (limit "
                                 f"{self.max_pending}); retry later")
            self._pending += len(group)
            self._adds.append((group, sink, time.perf_counter()))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request (queued, running or not yet added); its pages are freed by the
        engine thread. Unknown or finished ids are ignored."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def drain(self) -> None:
        """Refuse new requests (ShuttingDown); those accepted go on."""
        with self._cond:
            self._draining = True

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, abort those left (their sinks get an "abort" delta) and
        join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------

    def _main(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._stopping
                           or engine.has_unfinished() or self._groups):
                    self._cond.wait()
                adds, self._adds = self._adds, deque()
                aborts, self._aborts = self._aborts, deque()
                stopping = self._stopping
            # adds first: a handler submits before it aborts, so every abort finds its id
            for group, sink, submitted in adds:
                self._add(group, sink, submitted)
            for rid in aborts:
                self._abort(rid)
            if stopping:
                for rid in list(self._tracked):
                    self._abort(rid)
                for _, rest, sink, _ in self._groups:
                    for sub in rest:
                        self._refuse(sub, sink, ShuttingDown("the server is shutting down"))
                self._groups = []
                return
            try:
                if engine.has_unfinished():
                    engine.step()
                self._release_groups()
                self._poll()
            except Exception as e:  # a bug: fail every request, loudly, and stop taking more
                self._fail(e)
                return

    def _add(self, group: list[Submission], sink: Sink, submitted: float) -> None:
        first, rest = group[0], group[1:]
        if self._open(first, sink, submitted) and rest:
            if self.engine.block_manager.enable_prefix_caching:
                self._groups.append((first.request_id, rest, sink, submitted))
            else:
                for sub in rest:
                    self._open(sub, sink, submitted)
        elif rest:
            for sub in rest:  # the first was refused: so are its siblings
                self._refuse(sub, sink, None)

    def _open(self, sub: Submission, sink: Sink, submitted: float) -> bool:
        try:
            stream = self.engine.open_stream(sub.prompt, sub.params, sub.request_id)
        except ValueError as e:
            self._refuse(sub, sink, e)
            return False
        prompt_len = len(stream.request.prompt_ids)
        self._tracked[sub.request_id] = _Tracked(stream, sink, submitted, prompt_len)
        sink(("accepted", sub.request_id))
        return True

    def _refuse(self, sub: Submission, sink: Sink, error: Exception | None) -> None:
        self._done_pending(1)
        if error is not None:
            sink(("error", sub.request_id, error))

    def _release_groups(self) -> None:
        """Open a group's other samples once its first has its prompt cached (its first
        token exists) or has gone."""
        keep = []
        for leader, rest, sink, submitted in self._groups:
            t = self._tracked.get(leader)
            if t is not None and not t.stream.request.output_ids \
                    and not t.stream.request.is_finished:
                keep.append((leader, rest, sink, submitted))
                continue
            for sub in rest:
                self._open(sub, sink, submitted)
        self._groups = keep

    def _poll(self) -> None:
        now = time.perf_counter()
        for rid, t in list(self._tracked.items()):
            delta = t.stream.poll()
            if delta is None:
                continue
            if delta.ids:
                if t.first_token is None:
                    t.first_token = now
                    if self.metrics is not None:
                        self.metrics.first_token(now - t.submitted)
                t.last_token = now
            self._emit(t, delta)
            if delta.finish_reason is not None:
                self._finish(rid, t, delta, now)
        if self.metrics is not None:
            self.metrics.engine_state(self.engine)

    def _emit(self, t: _Tracked, event: Any) -> None:
        try:
            t.sink(event)
        except Exception:  # the handler's event loop is gone: nobody reads this request
            self._aborts.append(t.stream.request_id)

    def _finish(self, rid: str, t: _Tracked, delta: StreamDelta, now: float) -> None:
        del self._tracked[rid]
        self._done_pending(1)
        if self.metrics is not None:
            n = len(delta.output.ids) if delta.output is not None else 0
            tpot = (t.last_token - t.first_token) / (n - 1) \
                if n > 1 and t.first_token is not None else None
            self.metrics.finished(delta.finish_reason, now - t.submitted, tpot,
                                  t.prompt_len, n)

    def _abort(self, rid: str) -> None:
        t = self._tracked.get(rid)
        if t is None:
            for g in self._groups:  # a sample not opened yet
                for sub in g[1]:
                    if sub.request_id == rid:
                        g[1].remove(sub)
                        self._done_pending(1)
                        return
            return
        self.engine.abort(rid)
        delta = t.stream.poll()   # the "abort" delta, with what was generated
        if delta is not None:
            self._emit(t, delta)
            self._finish(rid, t, delta, time.perf_counter())
        else:
            del self._tracked[rid]
            self._done_pending(1)

    def _done_pending(self, k: int) -> None:
        with self._cond:
            self._pending -= k

    def _fail(self, error: Exception) -> None:
        import traceback
        traceback.print_exc()
        with self._cond:
            self._failed = error
        for rid, t in list(self._tracked.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            try:
                t.sink(("error", rid, RuntimeError(f"the engine failed: {error}")))
            except Exception:
                pass
        self._tracked.clear()
        with self._cond:
            self._pending = 0
