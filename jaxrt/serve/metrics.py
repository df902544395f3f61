"""Prometheus metrics of one server (its own registry, so servers in one process do not
share counters). Names follow vLLM's (`vllm:` -> `jaxrt_`)."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; vLLM's buckets, which span a CPU's slow steps and a GPU's fast ones
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
         2.5, 5.0, 7.5, 10.0, 20.0)
_E2E = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
        40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class ServerMetrics:
    """Updated by the engine thread (latencies, tokens, engine state) and the handlers
    (HTTP errors); `render()` is the /metrics body."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self._requests = Counter("jaxrt_request_success", "Finished requests by finish "
                                 "reason (stop, length, abort)", ["model_name",
                                                                  "finished_reason"],
                                 registry=r)
        self._errors = Counter("jaxrt_request_errors", "Requests refused, by HTTP status",
                               ["model_name", "status"], registry=r)
        self._ttft = Histogram("jaxrt_time_to_first_token_seconds", "Submission to first "
                               "token", ["model_name"], buckets=_TTFT, registry=r)
        self._tpot = Histogram("jaxrt_time_per_output_token_seconds", "Mean time between "
                               "output tokens of a request", ["model_name"], buckets=_TPOT,
                               registry=r)
        self._e2e = Histogram("jaxrt_e2e_request_latency_seconds", "Submission to last "
                              "token", ["model_name"], buckets=_E2E, registry=r)
        self._prompt = Counter("jaxrt_prompt_tokens", "Prompt tokens of finished requests",
                               ["model_name"], registry=r)
        self._generation = Counter("jaxrt_generation_tokens", "Generated tokens of "
                                   "finished requests", ["model_name"], registry=r)
        self._running = Gauge("jaxrt_num_requests_running", "Requests holding KV pages",
                              ["model_name"], registry=r)
        self._waiting = Gauge("jaxrt_num_requests_waiting", "Requests queued in the "
                              "scheduler", ["model_name"], registry=r)
        self._kv = Gauge("jaxrt_kv_cache_usage_perc", "Share of KV pages in use (0..1)",
                         ["model_name"], registry=r)
        self._hit = Gauge("jaxrt_prefix_cache_hit_rate", "Prompt tokens found in the prefix "
                          "cache / prompt tokens admitted (0..1)", ["model_name"], registry=r)
        self._preempt = Counter("jaxrt_num_preemptions", "Requests preempted (recomputed)",
                                ["model_name"], registry=r)
        self._labels = labels
        # every series exists (at 0) from the start, as scrapers expect
        for metric in (self._ttft, self._tpot, self._e2e, self._prompt, self._generation,
                       self._running, self._waiting, self._kv, self._hit, self._preempt):
            self._l(metric)
        for reason in ("stop", "length", "abort"):
            self._requests.labels(finished_reason=reason, **labels)
        self._seen_preemptions = 0
        self._lock = threading.Lock()

    def _l(self, metric):
        return metric.labels(**self._labels)

    def first_token(self, seconds: float) -> None:
        self._l(self._ttft).observe(seconds)

    def finished(self, reason: str, e2e: float, tpot: float | None, prompt_tokens: int,
                 output_tokens: int) -> None:
        self._requests.labels(finished_reason=reason, **self._labels).inc()
        self._l(self._e2e).observe(e2e)
        if tpot is not None:
            self._l(self._tpot).observe(tpot)
        self._l(self._prompt).inc(prompt_tokens)
        self._l(self._generation).inc(output_tokens)

    def error(self, status: int) -> None:
        self._errors.labels(status=str(status), **self._labels).inc()

    def engine_state(self, engine) -> None:
        """From the engine thread, after a step."""
        sched, bm = engine.scheduler, engine.block_manager
        self._l(self._running).set(len(sched.running))
        self._l(self._waiting).set(len(sched.waiting))
        stats = bm.stats()
        self._l(self._kv).set(stats.pages_in_use / stats.num_pages if stats.num_pages else 0)
        self._l(self._hit).set(stats.prefix_cache_hit_rate)
        new = sched.num_preemptions - self._seen_preemptions
        if new > 0:
            self._l(self._preempt).inc(new)
            self._seen_preemptions = sched.num_preemptions

    def render(self) -> bytes:
        return generate_latest(self.registry)
