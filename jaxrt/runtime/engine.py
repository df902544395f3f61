"""Engine: requests in, tokens out, over one `@step` runner.

    engine = Engine("smollm2-135m", max_num_seqs=16)              # loads and warms up
    engine = Engine(runner, tokenizer=tok)                         # or any runner object
    outs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))

A runner is what `jaxrt.lowering.executable.StepExecutable` is: `run(tokens, positions,
slot_mapping, page_table, context_lens, q_index, logit_index) -> logits [N, vocab]`,
`compile_for(T, S, Q, MP, N) -> seconds`, `vocab_size`, `num_pages`, `page_size` (and
optionally `max_model_len`). The engine may use fewer pages than the runner has
(`num_pages=`): padding slots point past the runner's whole cache.

Each step: schedule -> pad into a shape bucket -> runner.run -> sample on device ->
scheduler.update. Every step bucket and sampler variant compiles once; `warmup` says when:
- True: all of them before the constructor returns, with a progress line on `log`
  (stderr; None for quiet);
- "background": what one short request needs (the smallest decode and prefill buckets and
  their samplers) before it returns, the rest on a background thread, smallest first,
  while no request is in flight; a step that needs a shape the thread has not reached
  compiles it on the spot;
- False: each on first use;
- "auto" (default): background on a CPU, where compiling everything first would keep a
  new user waiting (12 buckets and 12 sampler variants: 25 s for SmolLM2, 42 s for
  Gemma 3 on two cores), True on accelerators and with `strict_compiles`.
`warmup()` compiles whatever is left and waits for a background warm-up; a blocking
warm-up compiles on `compile_threads` threads (default: 1 on a CPU, half the host's
cores up to 8 beside an accelerator; JAXRT_COMPILE_THREADS overrides). A compilation on
the request path is counted in `stats().compiles_after_warmup` (and raises with
`strict_compiles=True`). `close()` stops a background warm-up.

`tensor_parallel` / `data_parallel` (> 1: the `shard` pass, a device mesh; see
docs/parallelism.md), `quantize` (a mode of the quantize pass: int8-weight, fp8-weight,
w8a8, fp8; or kv-int8 / kv-fp8, the quantize-kv-cache pass), `fuse` (the fusion passes; None: compiler.default_pipeline's choice),
`kv_cache_memory_fraction`, `kv_cache_max_gib` (a cap on the cache;
on a CPU 4 GiB by default) and `dtype` matter only when the engine loads the model itself; a runner object
arrives with its cache and dtype already chosen.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import math
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxrt.errors import InputError, SettingError, check_text, short_repr
from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from .request import (BeamOutput, Request, RequestOutput, SamplingParams, StreamDelta,
                      validate_prompt_ids)
from .sampler import SampledToken, Sampler, SamplingBatch
from .programs import greedy_sampling, unpack_sampled
from . import prompt_logprobs
from . import draft as draft_model, speculative as spec, structured
from .scheduler import (BucketPolicy, ScheduledBatch, ScheduledSeq, Scheduler,
                        SchedulerConfig, StepInputs, build_step_inputs)

Prompt = str | Seq[int]

# runner -> buckets already run once: engines sharing a runner pay its first-run set-up once.
_FIRST_RUN_DONE: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()
IDLE_POLL_SECONDS = 0.02
DEFAULT_DECODE_STEPS = 8  # on accelerators; see _decode_steps
_NO_TOP_IDS = np.zeros(0, np.int32)           # a token sampled without top-n logprobs
_NO_TOP_LOGPROBS = np.zeros(0, np.float32)  # a background warm-up waits this long between looks for idleness


@dataclass(frozen=True)
class _DecodeCall:
    """A decode loop on the device: row i is rows[i] (num_tokens steps from start);
    out = (tokens [K, S], logprobs [K, S]), device arrays. `masked`: one step, the split
    decode step of structured output (`Engine._dispatch_forward`)."""
    rows: list
    out: tuple
    masked: bool = False


@dataclass(frozen=True)
class EngineStats:
    steps: int
    generated_tokens: int
    preemptions: int
    prefix_cache_hit_rate: float
    evictions: int
    num_pages: int
    pages_in_use: int
    free_pages: int
    num_buckets: int
    warmup_seconds: float
    compile_seconds: float        # runner + sampler, warmup included
    compiles_after_warmup: int    # should stay 0: a compile on the request path
    warming_up: bool = False      # a background warm-up is still compiling
    decode_loops: int = 0         # runner calls that ran several decode steps
    # speculative decoding: proposed tokens accepted / proposed, and tokens a verifying
    # sequence gained per step (accepted + the target's own)
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0
    spec_mean_accepted_length: float = 0.0
    spec_draft_steps: int = 0     # draft-model runner calls (method "draft")


class Engine:
    def __init__(self, model: Any, *, tokenizer: Any = None,
                 eos_token_ids: Seq[int] | None = None, page_size: int | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 kv_cache_memory_fraction: float = 0.9, kv_cache_max_gib: float | None = None,
                 outline_layers: bool | None = None,
                 tensor_parallel: int = 1, data_parallel: int = 1, quantize: str = "",
                 fuse: bool | None = None, num_pages: int | None = None,
                 max_model_len: int | None = None, dtype: Any = None, max_logprobs: int = 20,
                 seed: int | None = None, q_block: int = 16, bucket_growth: int | None = None,
                 min_bucket_tokens: int = 16, decode_steps: int | None = None,
                 warmup: bool | str = "auto",
                 strict_compiles: bool = False, compile_threads: int | None = None,
                 parse_special: bool = False, chat_template: str | None = None,
                 speculative: dict | None = None, log: Any = "stderr"):
        compile_threads = _compile_threads(compile_threads)  # refused before loading
        self.speculative = spec.SpeculativeConfig.parse(speculative)
        decode_steps = _decode_steps(decode_steps)
        mode = _warmup_mode(warmup, strict_compiles)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SettingError(f"seed must be an integer or None, got {seed!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_logprobs", max_logprobs),
                            ("q_block", q_block), ("min_bucket_tokens", min_bucket_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingError(f"{name} must be an integer, got {value!r:.40}")
        if seed is not None and not 0 <= seed < 2**64:
            raise SettingError(f"seed must be in [0, 2**64), got {seed}")
        for name, value in (("max_model_len", max_model_len), ("num_pages", num_pages),
                            ("page_size", page_size),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, np.integer))
                                      or value < 1):  # never truncated, never "the default"
                raise SettingError(f"{name} must be an integer >= 1 (or None), got "
                                   f"{value!r:.40}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise SettingError(f"chat_template must be a string (jinja2) or None, got "
                               f"{type(chat_template).__name__}")
        if isinstance(model, (str, os.PathLike)):
            # a draft loaded by name shares the device and the page ids: the target's
            # cache is planned with the draft's weights and its cache counted
            shared = _draft_share(self.speculative, os.fspath(model), dtype=dtype,
                                  page_size=page_size, num_pages=num_pages,
                                  max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  outline_layers=outline_layers)
            model, tok, eos, model_len, template = _load(
                os.fspath(model), dtype=dtype, page_size=page_size, num_pages=num_pages,
                memory_fraction=kv_cache_memory_fraction, max_cache_gib=kv_cache_max_gib,
                max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, outline_layers=outline_layers,
                tensor_parallel=tensor_parallel, data_parallel=data_parallel,
                quantize=quantize, fuse=fuse, shared=shared)
            tokenizer = tokenizer if tokenizer is not None else tok
            eos_token_ids = eos_token_ids if eos_token_ids is not None else eos
            chat_template = chat_template if chat_template is not None else template
        else:
            # a runner arrives compiled: what it was compiled with cannot change here
            for name, value, neutral in (("tensor_parallel", tensor_parallel, 1),
                                         ("data_parallel", data_parallel, 1),
                                         ("quantize", quantize, ""), ("fuse", fuse, None),
                                         ("dtype", dtype, None),
                                         ("kv_cache_memory_fraction",
                                          kv_cache_memory_fraction, 0.9),
                                         ("kv_cache_max_gib", kv_cache_max_gib, None),
                                         ("outline_layers", outline_layers, None)):
                if value != neutral:
                    raise SettingError(f"{name}={value!r} applies when the Engine loads the "
                                       f"model from a path or alias; this runner is "
                                       f"already compiled")
            if chat_template is None:
                chat_template = getattr(model, "chat_template", None)
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
            model_len = getattr(model, "max_model_len", None)
            if eos_token_ids is None:
                eos_token_ids = getattr(model, "eos_token_ids", None) \
                    or getattr(tokenizer, "eos_ids", ())
        self.runner, self.tokenizer = model, tokenizer
        self.chat_template = chat_template  # for servers; None: the model has none
        self.vocab_size = int(model.vocab_size)
        eos = tuple(eos_token_ids or ())
        for t in eos:  # an id outside the vocabulary would never end a request
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) \
                    or not 0 <= t < self.vocab_size:
                raise SettingError(f"eos_token_ids: {t!r:.40} is not a token id of the "
                                   f"vocabulary [0, {self.vocab_size})")
        self.eos_token_ids = tuple(int(t) for t in eos)
        ps = int(model.page_size)
        if page_size is not None and page_size != ps:
            raise SettingError(f"page_size={page_size}, but the runner's cache has pages of {ps}")
        pages = int(num_pages) if num_pages is not None else int(model.num_pages)
        if not 1 <= pages <= model.num_pages:
            raise SettingError(f"num_pages={pages}: the runner's cache has {model.num_pages}")
        capacity = pages * ps
        if max_model_len is None:
            max_model_len = min(capacity, model_len or capacity)
        if max_model_len > capacity:
            raise SettingError(f"max_model_len={max_model_len} needs "
                               f"{math.ceil(max_model_len / ps)} pages; the KV cache has "
                               f"{pages} of {ps} tokens: lower max_model_len or give the "
                               f"cache more pages (num_pages, kv_cache_max_gib, "
                               f"kv_cache_memory_fraction)")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(max_num_seqs, 512 if enable_chunked_prefill
                                         else max_model_len)
        if max_logprobs < 2:
            raise SettingError(f"max_logprobs must be >= 2, got {max_logprobs}")
        self.max_model_len, self.page_size, self.num_pages = max_model_len, ps, pages
        self.max_logprobs = max_logprobs
        self.config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len,
                                      enable_chunked_prefill)
        self.block_manager = BlockManager(pages, ps, enable_prefix_caching)
        detok = self._detokenize if tokenizer is not None else None
        self.scheduler = Scheduler(self.config, self.block_manager, detok)
        self.policy = BucketPolicy(max_num_seqs, max_num_batched_tokens,
                                   math.ceil(max_model_len / ps), q_block=q_block,
                                   growth=(_default_growth() if bucket_growth is None
                                           else bucket_growth),
                                   token_floor=min_bucket_tokens,
                                   verify_logits=0 if self.speculative is None else
                                   max_num_seqs * (self.speculative.num_tokens + 1))
        if self.speculative is not None:
            self.scheduler.proposer = self._propose
            self.scheduler.spec_tokens = self.speculative.num_tokens
        self._run_lock = threading.Lock()  # the runners' caches: one run at a time
        self.drafter: draft_model.DraftProposer | None = None
        if self.speculative is not None and self.speculative.method == "draft":
            self.drafter = self._make_drafter(
                self.speculative, dtype=dtype, memory_fraction=kv_cache_memory_fraction,
                outline_layers=outline_layers, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens)
        self.sampler = Sampler(self.vocab_size, max_logprobs)
        self.grammars = structured.Grammars(tokenizer, self.vocab_size, self.eos_token_ids)
        self._masked_buckets: set = set()  # buckets whose masked step has run (compiled)
        # Runners with the step programs (jaxrt.runtime.programs) sample on the device and
        # run decode loops; others return logits to the sampler and step one at a time.
        self._fused = callable(getattr(model, "run_sampled", None))
        # Structured output's split decode step (`_dispatch_forward`): runners with a
        # decode forward; else constrained batches take the masked sampled step.
        self._split_masked = self._fused and callable(getattr(model, "decode_forward", None))
        self.decode_steps = decode_steps if callable(getattr(model, "decode", None)) else 1
        self._pad_slot = int(model.num_pages) * ps
        # Requests without a seed draw theirs from here: from the OS unless `seed` is given
        # (fresh engines must not repeat each other's "random" samples).
        self._rng = random.Random(seed)
        # Text prompts: special-token text (`<|im_start|>`) stays text unless the caller
        # opts in (llama.cpp's parse_special), so a prompt cannot forge a control token.
        self.parse_special = bool(parse_special)
        self._ids = itertools.count()
        self._live: dict[str, Request] = {}
        self._stashed: list[RequestOutput] = []
        self._streamed: set[str] = set()  # ids whose outputs go to a RequestStream
        self._log = sys.stderr if log == "stderr" else log   # None: quiet
        self._strict = strict_compiles
        self._compile_threads = compile_threads
        self._compiled: set = set()
        self._warm = self._serving = False  # _serving: compiles now land on requests
        self._warmup_seconds = self._compile_seconds = 0.0
        self._compiles_after_warmup = self._steps = self._generated = 0
        self._decode_loops = 0
        self._inflight: _DecodeCall | None = None  # a decode call queued, not yet applied
        # structured output: the decode forward queued behind `_inflight` (a masked call),
        # fed its tokens on the device; its mask is filled once they are applied
        self._queued_forward: tuple | None = None
        self._widths: dict[int, tuple[int, ...]] = {}  # decode rows -> table widths
        self.pipeline_decode = True  # queue the next decode call before applying one
        self._compile_lock = threading.RLock()   # one compile at a time, either thread
        self._step_lock = threading.RLock()  # scheduler state: one step, add or abort
        self._background: threading.Thread | None = None
        self._stop = threading.Event()
        if mode == "background":
            self._warm_in_background()
        elif mode:
            self.warmup()
        # A runner we loaded places its weights on a thread while the first buckets
        # compile (StepExecutable(wait=False)): ready to serve means they are there.
        ready = getattr(self.runner, "ready", None)
        if ready is not None:
            try:
                ready()
            except BaseException:
                self.close()
                raise

    # ---- compile --------------------------------------------------------------------

    def _warmup_tasks(self) -> tuple[list[tuple], int]:
        """Every compile, in the order a background warm-up takes them, and how many of
        the first ones one short request needs (the smallest decode and mixed buckets;
        their samplers too where the runner does not sample itself); the rest go by
        size: step buckets, decode loops, then the full sampler's variants."""
        buckets = self.policy.all_buckets()
        first = [b for b in buckets if b.Q == 1][:1] + [b for b in buckets if b.Q != 1][:1]
        rest = sorted((b for b in buckets if b not in first), key=lambda b: (b.T, b.Q))
        needed = [] if self._fused else sorted({b.N for b in first})
        samplers = [("sampler", n, p) for n in sorted({b.N for b in buckets})
                    for p in (False, True) if not (n in needed and not p)]
        loops = [("decode", s, w) for s in self.policy.decode_sizes
                 for w in self._decode_widths(s)] if self.decode_steps > 1 else []
        drafts = [("draft", b) for b in self.drafter.buckets()] \
            + [("draft-decode", s) for s in self.drafter.loop_sizes()] if self.drafter else []
        tasks = ([("step", b) for b in first] + [("sampler", n, False) for n in needed]
                 + [("step", b) for b in rest] + drafts + loops + samplers)
        return tasks, len(first) + len(needed)

    def _task_done(self, task: tuple) -> bool:
        if task[0] == "sampler":
            return self.sampler.is_compiled(task[1], task[2])
        return _task_key(task) in self._compiled

    def _compile_task(self, task: tuple) -> float:
        """Compile one warm-up task (no bookkeeping: thread-safe); returns the seconds."""
        if task[0] == "step":
            return self.runner.compile_for(*task[1].as_tuple())
        if task[0] == "decode":
            return self.runner.compile_decode(task[1], task[2], self.decode_steps)
        if task[0] == "decode-forward":
            return self.runner.compile_decode_forward(task[1], task[2])
        if task[0] == "draft":
            return self.drafter.runner.compile_for(*task[1].as_tuple())
        if task[0] == "draft-decode":
            return self.drafter.runner.compile_decode(task[1], self.policy.max_pages_per_seq,
                                                      self.drafter.num_tokens)
        return self.sampler.compile_for(task[1], task[2])

    def _run_task(self, task: tuple) -> None:
        with self._compile_lock:
            if self._task_done(task):
                return
            self._compile_seconds += self._compile_task(task)
            if task[0] != "sampler":
                self._first_run(task)
                self._compiled.add(_task_key(task))

    def warmup(self) -> float:
        """Compile every step bucket and sampler variant not compiled yet (waiting for a
        background warm-up to finish instead); returns the seconds warm-up took.

        Compiles run on `compile_threads` threads (XLA compiles without the GIL): on an
        accelerator a bucket of an unrolled 8B model compiles for ~12 s, mostly in XLA,
        and the host has cores to spare. First runs (set-up on the device) follow, one
        at a time, in bucket order."""
        if self._background is not None:
            self._background.join()
            if not self._warm:  # stopped by close(), or it failed: finish here
                self._background = None
                return self.warmup()
            return self._warmup_seconds
        tasks, _ = self._warmup_tasks()
        start = time.perf_counter()
        steps = sum(t[0] != "sampler" for t in tasks)
        if self._compile_threads > 1 and len(tasks) > 1:
            self._compile_concurrently(tasks)
        else:
            for i, task in enumerate(tasks):
                self._progress(f"compiling {_describe(task, i, len(tasks))}")
                self._run_task(task)
        self._warmup_seconds += time.perf_counter() - start
        self._warm = True
        if self._log is not None:
            print(f"\rjaxrt: warmup compiled {steps} step programs and {len(tasks) - steps} "
                  f"sampler variants in {self._warmup_seconds:.2f} s", file=self._log, flush=True)
        return self._warmup_seconds

    def _compile_concurrently(self, tasks: list[tuple]) -> None:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with self._compile_lock, ThreadPoolExecutor(
                self._compile_threads, thread_name_prefix="jaxrt-compile") as pool:
            todo = [t for t in tasks if not self._task_done(t)]
            futures = {pool.submit(self._compile_task, t): t for t in todo}
            try:
                for i, future in enumerate(as_completed(futures)):
                    self._compile_seconds += future.result()
                    self._progress(f"compiled {i + 1}/{len(todo)} shapes on "
                                   f"{self._compile_threads} threads")
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            for task in tasks:  # one-time device set-up, in order, outside the pool
                if task[0] != "sampler" and _task_key(task) not in self._compiled:
                    self._first_run(task)
                    self._compiled.add(_task_key(task))

    def _warm_in_background(self) -> None:
        tasks, k = self._warmup_tasks()
        start = time.perf_counter()
        for task in tasks[:k]:
            self._run_task(task)
        self._serving = True
        if self._log is not None:
            print(f"jaxrt: ready in {time.perf_counter() - start:.2f} s; compiling "
                  f"{len(tasks) - k} more shapes in the background", file=self._log, flush=True)
        self._background = threading.Thread(target=self._background_main,
                                            args=(tasks[k:], start), daemon=True,
                                            name="jaxrt-warmup")
        _WARMING.add(self)
        _register_stop_hook()
        self._background.start()

    def _background_main(self, tasks: list[tuple], start: float) -> None:
        try:
            for task in tasks:
                # Idle time only: on a small CPU a compile beside a request doubles its
                # latency (SmolLM2 TTFT 1.6 vs 0.13 s); a shape a request needs meanwhile
                # compiles on its path.
                while self._live and not self._stop.is_set():
                    self._stop.wait(IDLE_POLL_SECONDS)
                if self._stop.is_set():
                    return
                self._run_task(task)
            self._warmup_seconds = time.perf_counter() - start
            self._warm = True
        except Exception as e:  # the request path compiles on its own and reports it
            if self._log is not None:
                print(f"jaxrt: background warm-up stopped: {e}", file=self._log, flush=True)
        finally:
            _WARMING.discard(self)

    def close(self) -> None:
        """Stop a background warm-up (after the compile in progress). Compiled shapes
        stay; later steps compile what they need."""
        self._stop.set()
        if self._background is not None:
            self._background.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _first_run(self, task: tuple) -> None:
        """Run a compiled step program once on padding (every slot dropped, no context):
        on an accelerator an executable's first run pays one-time set-up (loading it onto
        the device) that must not land on the first request's TTFT. The cache is left
        untouched. Not on a CPU: there a first run costs what later ones do (SmolLM2, a
        512-token bucket: 0.63 vs 0.60 s), so it would only add work."""
        import jax
        if jax.default_backend() == "cpu":
            return
        runner = self.drafter.runner if task[0].startswith("draft") else self.runner
        try:
            done = _FIRST_RUN_DONE.setdefault(runner, set())
        except TypeError:  # a runner that cannot be weakly referenced: run every time
            done = set()
        key = (_task_key(task), self.drafter.num_tokens if task[0] == "draft-decode"
               else self.decode_steps)
        if key in done:
            return
        done.add(key)
        i32 = np.int32
        with self._run_lock:  # a background warm-up runs this beside the request path
            if task[0] in ("decode", "draft-decode"):
                s = task[1]
                # a draft loop reads the full table; the engine's own, its width's
                w = task[2] if task[0] == "decode" else self.policy.max_pages_per_seq
                out = runner.decode(np.zeros(s, i32), np.zeros(s, i32),
                                    np.zeros((s, w), i32), np.zeros(s, i32),
                                    self.decode_steps if task[0] == "decode"
                                    else self.drafter.num_tokens, greedy_sampling(s))
            else:
                b = task[1]
                zeros_t = np.zeros(b.T, i32)
                pad = self.drafter.pad_slot if task[0] == "draft" else self._pad_slot
                out = runner.run(zeros_t, zeros_t, np.full(b.T, pad, i32),
                                 np.zeros((b.S, b.MP), i32), np.zeros(b.S, i32),
                                 np.full((b.S, b.Q), b.T, i32), np.zeros(b.N, i32))
            import jax
            jax.block_until_ready(out)

    def _progress(self, line: str) -> None:
        if self._log is not None:
            print(f"\rjaxrt: {line}".ljust(72), end="", file=self._log, flush=True)

    def _note_compile(self, what: str) -> None:
        if self._warm or self._serving:
            self._compiles_after_warmup += 1
            if self._strict:
                raise RuntimeError(f"{what} was not compiled at warmup")

    # ---- requests -------------------------------------------------------------------

    def _detokenize(self, ids: Seq[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _make_request(self, prompt: Prompt, params: SamplingParams | None,
                      request_id: str | None) -> Request:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SettingError(f"params must be a SamplingParams, got a "
                               f"{type(params).__name__} (e.g. SamplingParams(**d) for a "
                               f"dict of its fields)")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer; pass token ids")
            prompt = self.encode_prompt(check_text(prompt, "prompt"))
        ids = validate_prompt_ids(prompt, self.vocab_size)
        params.validate(self.vocab_size, self.max_model_len, len(ids),
                        max_logprobs=self.max_logprobs)
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer to detokenize the output")
        if params.prompt_logprobs is not None and self._strict:
            raise SettingError("SamplingParams.prompt_logprobs needs step programs that "
                               "return every prompt token's logits; they compile on first "
                               "use, which strict_compiles=True forbids")
        if params.beam_width > self.config.max_num_seqs:
            raise SettingError(f"beam_width={params.beam_width} exceeds max_num_seqs="
                             f"{self.config.max_num_seqs}")
        # the last sampled token is never written to the cache
        need = params.beam_width * self.block_manager.pages_needed(
            len(ids) + params.max_tokens - 1)
        if need > self.num_pages:
            raise InputError(f"the request needs up to {need} KV pages; the cache has "
                             f"{self.num_pages}")
        if request_id is not None and not isinstance(request_id, str):
            # ids are strings (outputs, abort and the server use them as given): 5 and "5"
            # must not silently become one id
            raise InputError(f"request_id must be a str, got {type(request_id).__name__} "
                             f"{short_repr(request_id)}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._live:
            raise SettingError(f"request id {rid!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        # structured output: the request's matcher (a grammar llguidance rejects for this
        # vocabulary fails here, before anything is queued)
        grammar = self.grammars.matcher(params.constraint) \
            if params.constraint is not None else None
        return Request(rid, ids, params, time.perf_counter(), seed, self.eos_token_ids,
                       grammar=grammar)

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt as ids: BOS as the tokenizer adds it; special-token text stays
        text unless the engine was made with parse_special=True."""
        encode_text = getattr(self.tokenizer, "encode_text", None)
        if encode_text is None or self.parse_special:  # (a tokenizer with no special text)
            return self.tokenizer.encode(text)
        return encode_text(text)

    def _enqueue(self, req: Request) -> str:
        with self._step_lock:
            # checked again here: two threads may both pass _make_request's early check
            if req.request_id in self._live:
                raise ValueError(f"request id {req.request_id!r} is already in use")
            self._live[req.request_id] = req
            self.scheduler.add(req)
        return req.request_id

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request (ValueError on bad input, nothing queued); returns its id."""
        return self._enqueue(self._make_request(prompt, params, request_id))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a queued or running request; its output so far, finish_reason "abort".
        Safe from any thread at any time: a step in flight finishes first (its result
        for this request is dropped)."""
        with self._step_lock:
            req = self.scheduler.abort(request_id)
            if req is None:
                return None
            self._live.pop(request_id, None)
            self._streamed.discard(request_id)
            return self._output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One model step; the outputs of requests that finished (including ones that
        finished while generate()/stream() were stepping for their own requests)."""
        with self._step_lock:
            outs, self._stashed = self._stashed + self._step(), []
        return outs

    def _step(self) -> list[RequestOutput]:
        with self._step_lock:  # add_request / abort from other threads wait for it
            return self._step_locked()

    def _step_locked(self) -> list[RequestOutput]:
        if self._inflight is not None:  # a decode call queued by the last step
            call, self._inflight = self._inflight, None
            if call.masked:
                forward, self._queued_forward = self._queued_forward, None
                return self._advance_masked(call, forward)
            return self._advance(call)
        if self._split_masked and any(r.grammar is not None for r in self.scheduler.running):
            rows = self.scheduler.schedule_decode_steps(
                1, lambda r: self._loop_serves(r, grammar=True), min_steps=1)
            if rows is not None:  # constrained decoding, pipelined one step at a time
                return self._advance_masked(
                    self._sample_masked(self._dispatch_forward(rows, None)), None)
        elif self.decode_steps > 1:
            rows = self.scheduler.schedule_decode_steps(self.decode_steps,
                                                        self._loop_serves)
            if rows is not None:
                return self._decode_steps(rows)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise AssertionError("scheduler made no progress with requests pending")
            return []
        if self.drafter is not None:  # the draft model's proposals for the verify entries
            batch = self.drafter.fill(batch, self.block_manager, self.scheduler.running)
        inputs = build_step_inputs(batch, self.block_manager, self.policy, self._pad_slot,
                                   prompt_logprobs.rows_wanted(batch))
        self._ensure_compiled(("step", inputs.bucket))
        sampled = self._run_and_sample(inputs)
        sp = self.scheduler.spec_stats
        proposed, accepted = sp.proposed, sp.accepted
        finished = self.scheduler.update(batch, sampled, time.perf_counter())
        self._steps += 1
        # a verified proposal of k tokens has k + 1 logit rows and yields accepted + 1
        self._generated += len(inputs.logit_seqs) - (sp.proposed - proposed) \
            + (sp.accepted - accepted)
        return self._finished(finished)

    def _finished(self, finished: list[Request]) -> list[RequestOutput]:
        for req in finished:
            self._live.pop(req.request_id, None)
        outs = []
        for req in finished:
            if req.request_id in self._streamed:  # its RequestStream reads it
                self._streamed.discard(req.request_id)
            else:
                outs.append(self._output(req))
        return outs

    def _ensure_compiled(self, task: tuple) -> None:
        if _task_key(task) in self._compiled:
            return
        with self._compile_lock:  # a background warm-up may be compiling it now
            if _task_key(task) not in self._compiled:
                self._note_compile(f"{task[0]} {task[1]}")
                self._compile_seconds += self._compile_task(task)
                self._compiled.add(_task_key(task))

    @staticmethod
    def _can_decode_on_device(req: Request, grammar: bool = False) -> bool:
        """The decode loops' own sampling serves this request: no penalties, no top-n
        logprobs, no beams, and no truncation (top-k/top-p/min-p take the sampled step,
        whose sampler branches on them; see `sample_tokens(truncate=False)`). Nor a
        structured-output constraint: the host advances its grammar after every token,
        and the next token's mask depends on it, so such a request decodes one step a
        call (`grammar=True`: the split decode step, `_dispatch_forward`)."""
        p = req.params
        return not (p.uses_penalties or p.logprobs or p.is_beam_search or p.truncates
                    or (req.grammar is not None and not grammar))

    def _loop_serves(self, req: Request, grammar: bool = False) -> bool:
        """Decode loops serve the request: their sampling does, and speculation does not
        (a loop of K device steps cannot verify proposals)."""
        return self._can_decode_on_device(req, grammar) and not (
            self.speculative is not None and spec.eligible(req))

    def _propose(self, req: Request, seq, k: int) -> list[int]:
        if self.drafter is not None:  # drafted after scheduling, batched (`_step_locked`)
            return self.drafter.placeholder(req, k)
        return spec.propose(self.speculative, req, seq, k)

    def _make_drafter(self, config: spec.SpeculativeConfig, *, dtype, memory_fraction: float,
                      outline_layers, max_num_seqs: int,
                      max_num_batched_tokens) -> draft_model.DraftProposer:
        """The draft model of `speculative={"method": "draft", "model": M}`: loaded here
        (a name or path) with the target's page size and page count, or a runner as given;
        refused (SettingError) where it cannot share the target's pages and tokens."""
        model, tokenizer = config.model, None
        if isinstance(model, (str, os.PathLike)):
            if dtype is None and getattr(self.runner, "dtype", None) is not None:
                dtype = getattr(self.runner.dtype, "value", self.runner.dtype)  # the target's
            model, tokenizer, _, model_len, _ = _load(
                os.fspath(model), dtype=dtype, page_size=self.page_size,
                num_pages=int(self.runner.num_pages), memory_fraction=memory_fraction,
                max_cache_gib=None, max_num_seqs=max_num_seqs,
                max_model_len=self.max_model_len,
                max_num_batched_tokens=max_num_batched_tokens,
                outline_layers=outline_layers)
            if model_len < self.max_model_len:
                raise SettingError(f"speculative draft {config.model}: max_model_len "
                                   f"{model_len} is below the engine's {self.max_model_len}")
        draft_model.check_compatible(model, vocab_size=self.vocab_size,
                                     page_size=self.page_size, num_pages=self.num_pages,
                                     max_model_len=self.max_model_len,
                                     tokenizer=self.tokenizer, target=self.runner,
                                     draft_tokenizer=tokenizer)
        return draft_model.DraftProposer(
            model, num_tokens=config.num_tokens, policy=self.policy, run_lock=self._run_lock,
            ensure_compiled=self._ensure_compiled)

    @staticmethod
    def _sampling_rows(seqs) -> list:
        return spec.sampling_rows(seqs)

    def _run_and_sample(self, inputs: StepInputs) -> dict[int, SampledToken]:
        seqs = inputs.logit_seqs
        batch = SamplingBatch.build(self._sampling_rows(seqs), inputs.bucket.N,
                                    self.vocab_size)
        full = batch.needs_full_sampler or any(s.request.params.is_beam_search for s in seqs)
        mask = structured.step_bitmask(seqs, inputs.bucket.N, self.vocab_size)
        if self._fused:
            # the masked variant of the sampled step compiles on the first constrained
            # batch of a bucket; batches without a constraint never pay for the mask
            masked = mask is not None and structured.takes_mask(self.runner)
            if masked and inputs.bucket not in self._masked_buckets:
                self._note_compile(f"masked step {inputs.bucket}")
                self._masked_buckets.add(inputs.bucket)
            with self._run_lock:
                sampled, logits = self.runner.run_sampled(
                    *inputs.args(), batch.packed(), **({"token_bitmask": mask} if masked
                                                       else {}))
            self._collect_prompt_logprobs(inputs, logits)  # raw logits (vLLM)
            if mask is not None and not masked:   # mask, then sample on the host's side
                logits, full = structured.mask_logits(logits, mask), True
            if not full:  # tokens and logprobs: one read
                tokens, token_lp = unpack_sampled(sampled)
                return spec.by_seq(seqs, [SampledToken(int(tokens[i]), float(token_lp[i]),
                                                       _NO_TOP_IDS, _NO_TOP_LOGPROBS)
                                          for i in range(len(seqs))])
        else:
            with self._run_lock:
                logits = self.runner.run(*inputs.args())
            self._collect_prompt_logprobs(inputs, logits)  # raw logits (vLLM)
            if mask is not None:
                logits = structured.mask_logits(logits, mask)
        n, penalties = inputs.bucket.N, batch.has_penalties
        if not self.sampler.is_compiled(n, penalties):
            with self._compile_lock:
                if not self.sampler.is_compiled(n, penalties):
                    self._note_compile(f"sampler N={n}")
                    self._compile_seconds += self.sampler.compile_for(n, penalties)
        out = self.sampler(logits, batch)
        return spec.by_seq(seqs, out[:len(seqs)])

    def _collect_prompt_logprobs(self, inputs: StepInputs, logits) -> None:
        if inputs.prompt_rows:
            # one token's text, special tokens spelled out (vLLM's decoded_token)
            decode = (lambda t: self.tokenizer.decode([t], skip_special_tokens=False)) \
                if self.tokenizer is not None else None
            prompt_logprobs.collect(logits, inputs, min(self.max_logprobs, self.vocab_size),
                                    decode)

    def _decode_steps(self, rows: list[ScheduledSeq]) -> list[RequestOutput]:
        """Up to `decode_steps` tokens of every running sequence per runner call (rows
        from `Scheduler.schedule_decode_steps`)."""
        return self._advance(self._dispatch_decode(rows, None))

    def _advance(self, call: "_DecodeCall") -> list[RequestOutput]:
        """Queue the next decode call first where the batch can go on decoding (it starts
        from this call's tokens on the device), then read and apply this call's tokens:
        the host's bookkeeping overlaps the device's next call. A request that stops in
        this call leaves its row of the next call wasted; that row's tokens are dropped."""
        rows = self._next_decode_rows(call) if self.pipeline_decode else None
        if rows is None:
            return self._apply_decode(call)
        self._inflight = self._dispatch_decode(rows, call)
        return self._apply_decode(call)

    def _advance_masked(self, call: "_DecodeCall", forward: tuple | None
                        ) -> list[RequestOutput]:
        """Structured output's pipeline (vLLM V1's asynchronous scheduling): `call`
        samples step t, and `forward` (step t + 1, fed call's tokens on the device) is
        queued behind it. Step t's tokens are read and advance the grammars while that
        forward runs; then step t + 1 is sampled under the masks they give, and the
        forward of step t + 2 is queued at once behind it, fed its tokens on the device,
        so the device has work queued while the host returns, is called again and waits
        for step t + 1. Without `forward` (the first call of a run) it is queued here.
        The masks of step t + 1 are filled on a worker thread (llguidance, without the
        GIL) while step t's tokens go through the scheduler's bookkeeping: the grammars
        consume them first (`Request.grammar_ahead` tells the scheduler so)."""
        if forward is None:
            rows = self._next_decode_rows(call) if self.pipeline_decode else None
            forward = self._dispatch_forward(rows, call) if rows is not None else None
        read = self._read_decode(call)
        mask = None
        if forward is not None and structured.OVERLAP_FILL:
            self._consume_ahead(call, read[0])
            mask = structured.fill_bitmask_async(_grammar_rows(forward[0]),
                                                 forward[1].shape[0], self.vocab_size)
        try:
            outs = self._apply_decode(call, read)
        finally:
            mask = mask.result() if mask is not None else None  # the matchers are free
        if forward is None or all(r.request.is_finished for r in forward[0]):
            return outs   # every row stopped in `call`: the forward's logits are not read
        sampled = self._sample_masked(forward, mask)
        rows = self._next_decode_rows(sampled) if self.pipeline_decode else None
        self._inflight = sampled
        if rows is not None:
            self._queued_forward = self._dispatch_forward(rows, sampled)
        return outs

    @staticmethod
    def _consume_ahead(call: "_DecodeCall", tokens: np.ndarray) -> None:
        """Advance the grammars of a one-step call's live rows by their sampled tokens
        now, ahead of the scheduler's bookkeeping (`Request.grammar_ahead`)."""
        for i, r in enumerate(call.rows):
            req = r.request
            if req.grammar is not None and r.num_tokens > 0 and not req.is_finished:
                req.grammar_ahead.append(structured.advance(req.grammar, int(tokens[0, i])))

    def _next_decode_rows(self, call: "_DecodeCall") -> list[ScheduledSeq] | None:
        """The rows of the call after `call`, assuming no request in it stops before its
        last step, with their slots reserved; None when the batch must go back to the
        scheduler (a request waits or stopped, or the cache is short of pages)."""
        sched, k = self.scheduler, call.out[0].shape[0]
        if sched.waiting or len(sched.running) != len(call.rows):
            return None
        if call.masked and not any(r.request.grammar is not None
                                   and not r.request.is_finished for r in call.rows):
            return None  # no constraint left: back to the decode loops
        rows = []
        for r in call.rows:
            req, seq = r.request, r.seq
            if req.is_finished:
                return None
            start = r.start + r.num_tokens     # its last token's position then
            made = start + 1 - seq.prompt_len  # output tokens once `call` is applied
            steps = min(k, req.params.max_tokens - made, self.max_model_len - start - 1)
            if steps > 0:
                rows.append(ScheduledSeq(req, seq, start, steps, True))
        # the next call reads this one's tokens [K, S]: only within one decode bucket
        if not rows or self._decode_size(len(rows)) != call.out[0].shape[1]:
            return None
        for r in rows:
            if not self.block_manager.append_slots(r.seq.seq_id, r.start + r.num_tokens):
                return None
        return rows

    def _decode_size(self, rows: int) -> int:
        return next(n for n in self.policy.decode_sizes if n >= rows)

    def _decode_widths(self, s: int) -> tuple[int, ...]:
        """Page-table widths decode loops of s rows are compiled for (the runner's
        `decode_widths`; the full width where it has none), worked out once per s."""
        widths = self._widths.get(s)
        if widths is None:
            mp = self.policy.max_pages_per_seq
            of = getattr(self.runner, "decode_widths", None)
            widths = self._widths[s] = tuple(of(s, mp)) if of is not None else (mp,)
        return widths

    def _dispatch_decode(self, rows: list[ScheduledSeq],
                         feed: "_DecodeCall | None") -> "_DecodeCall":
        """Queue one decode loop over `rows` (row i runs rows[i].num_tokens steps from
        position rows[i].start); with `feed`, rows start from its tokens on the device."""
        s, mp, args, sampling = self._decode_inputs(rows, feed, "decode")
        with self._run_lock:
            out = self.runner.decode(*args[:4], self.decode_steps, sampling.packed(),
                                     feed=feed.out[0] if feed else None, feed_at=args[4])
        self._decode_loops += 1
        return _DecodeCall(rows, out)

    def _dispatch_forward(self, rows: list[ScheduledSeq],
                          feed: "_DecodeCall | None") -> tuple:
        """Queue the decode forward of `rows` (one step each; structured output): its
        logits stay on the device for `_sample_masked`."""
        s, mp, args, sampling = self._decode_inputs(rows, feed, "decode-forward")
        with self._run_lock:
            logits = self.runner.decode_forward(*args[:4],
                                                feed=feed.out[0] if feed else None,
                                                feed_at=args[4])
        return rows, logits, sampling

    def _sample_masked(self, forward: tuple, mask: np.ndarray | None = None
                       ) -> "_DecodeCall":
        """Sample a decode forward's logits under the bitmask of its rows' grammars, as
        they stand once every earlier token is applied (a row whose request finished
        meanwhile is dropped when the call is applied); `mask`: that bitmask, filled
        already."""
        rows, logits, sampling = forward
        if mask is None:
            mask = structured.fill_bitmask(_grammar_rows(rows), logits.shape[0],
                                           self.vocab_size)
        out = structured.sample_masked(logits, mask, sampling.packed())
        return _DecodeCall(rows, out, masked=True)

    def _decode_inputs(self, rows: list[ScheduledSeq], feed: "_DecodeCall | None",
                       program: str) -> tuple:
        """(S, MP, [tokens, positions, page_table, steps_left, feed_at], SamplingBatch)
        of a decode call over `rows` (see `_dispatch_decode`); `program` ("decode" or
        "decode-forward") compiled for them."""
        bm = self.block_manager
        s = self._decode_size(len(rows))
        # the narrowest table that holds every row's context at its last step
        need = max(-(-(r.start + r.num_tokens) // self.page_size) for r in rows)
        mp = next(w for w in self._decode_widths(s) if w >= need)
        self._ensure_compiled((program, s, mp))
        i32 = np.int32
        tokens, positions = np.zeros(s, i32), np.zeros(s, i32)
        page_table, steps_left = np.zeros((s, mp), i32), np.zeros(s, i32)
        feed_at = np.full((2, s), -1, i32)
        fed_from = {id(r.seq): (i, r) for i, r in enumerate(feed.rows)} if feed else {}
        sampling_rows = []
        for i, r in enumerate(rows):
            table = bm.page_table(r.seq.seq_id)
            positions[i], steps_left[i] = r.start, r.num_tokens
            table = table[:mp]  # pages past the last step's are not read
            page_table[i, :len(table)] = table
            if id(r.seq) in fed_from:      # its token is the last one `feed` samples
                j, prev = fed_from[id(r.seq)]
                feed_at[:, i] = (prev.num_tokens - 1, j)
            else:
                tokens[i] = r.seq.tokens[r.start]
            # the output index of the first token this row samples
            made = r.start + 1 - r.seq.prompt_len
            sampling_rows.append((r.request.params, r.request.seed, made, (), ()))
        sampling = SamplingBatch.build(sampling_rows, s, self.vocab_size)
        return s, mp, [tokens, positions, page_table, steps_left, feed_at], sampling

    @staticmethod
    def _read_decode(call: "_DecodeCall") -> tuple[np.ndarray, np.ndarray]:
        """A decode call's (tokens, logprobs) [K, S] on the host (waits for the call)."""
        import jax
        return jax.device_get(call.out)

    def _apply_decode(self, call: "_DecodeCall", read: tuple | None = None
                      ) -> list[RequestOutput]:
        """Read a decode call's tokens (unless `read` has them) and apply them one step at
        a time, as `_step` would: stops end a request and drop the rest of its row."""
        out_tokens, out_lp = read if read is not None else self._read_decode(call)  # [K, S]
        now = time.perf_counter()
        finished: list[Request] = []
        for step in range(out_tokens.shape[0]):
            live = [(i, r) for i, r in enumerate(call.rows)
                    if step < r.num_tokens and not r.request.is_finished]
            if not live:
                break
            batch = ScheduledBatch([ScheduledSeq.of(r.request, r.seq, 1) for _, r in live],
                                   [])
            sampled = {r.seq.seq_id: SampledToken(int(out_tokens[step, i]),
                                                  float(out_lp[step, i]), _NO_TOP_IDS,
                                                  _NO_TOP_LOGPROBS) for i, r in live}
            finished += self.scheduler.update(batch, sampled, now)
            self._steps += 1
            self._generated += len(live)
        return self._finished(finished)

    # ---- outputs --------------------------------------------------------------------

    def _text(self, ids: list[int]) -> str:
        return self._detokenize(ids) if self.tokenizer is not None else ""

    def _is_stop_token(self, req: Request, token: int) -> bool:
        p = req.params
        return (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids

    def _visible(self, req: Request, ids: list[int], reason: str | None) -> list[int]:
        """Ids the text is made of: a final stop token is left out."""
        return ids[:-1] if reason == "stop" and ids and self._is_stop_token(req, ids[-1]) \
            else ids

    def _output(self, req: Request) -> RequestOutput:
        beams = []
        if req.params.is_beam_search and req.beam_hyps:
            for ids, cum, reason in req.best_beams()[:req.params.beam_width]:
                beams.append(BeamOutput(ids, self._text(self._visible(req, ids, reason)), cum,
                                        req.beam_score(len(ids), cum), reason))
        ids = beams[0].ids if beams else list(req.output_ids)
        if beams:
            text, cum = beams[0].text, beams[0].cumulative_logprob
        else:
            text = req.stop_text if req.stop_text is not None else \
                self._text(self._visible(req, ids, req.finish_reason))
            cum = req.seqs[0].cum_logprob if req.seqs else 0.0
        t0 = req.arrival_time
        return RequestOutput(
            req.request_id, list(req.prompt_ids), ids, text, req.finish_reason,
            [dict(d) for d in req.logprobs] if req.logprobs is not None else None, cum,
            None if req.first_token_time is None else req.first_token_time - t0,
            [t - t0 for t in req.token_times], beams, req.num_preemptions,
            list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
            dataclasses.replace(req.spec_stats) if req.spec_stats.verifies else None)

    # ---- high level -----------------------------------------------------------------

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion, outputs in prompt order.
        Every prompt is validated before any is queued."""
        if _is_one_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise SettingError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        reqs = [self._make_request(p, sp, None) for p, sp in zip(prompts, params)]
        mine = {self._enqueue(r) for r in reqs}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(reqs):
            with self._step_lock:
                for out in self._step():
                    (done.__setitem__(out.request_id, out) if out.request_id in mine
                     else self._stashed.append(out))
        return [done[r.request_id] for r in reqs]

    def chat(self, conversations, params: SamplingParams | Seq[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """Replies to one conversation (a list of {"role", "content"} messages) or to a
        list of them, under the model's chat template: the prompt `jaxrt generate --chat`
        and the server's /v1/chat/completions build (`frontends.chat.encode_chat`; the
        template spells its own special tokens, and message text stays text unless the
        engine was made with parse_special=True). Outputs in conversation order, as
        `generate`'s."""
        from ..frontends.chat import encode_chat
        if not self.chat_template or self.tokenizer is None:
            raise InputError("chat: this model has no chat template (or no tokenizer); "
                             "use generate() with a prompt")
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Seq):
            raise InputError(f"chat: expected a list of messages or a list of "
                             f"conversations, got {type(conversations).__name__}")
        one = not conversations or not isinstance(conversations[0], Seq) \
            or isinstance(conversations[0], (str, bytes))
        prompts = []
        for i, messages in enumerate([conversations] if one else conversations):
            try:
                prompts.append(encode_chat(self.tokenizer, self.chat_template, messages,
                                           parse_special=self.parse_special))
            except (ValueError, TypeError) as e:
                where = "" if one else f"conversation {i}: "
                raise InputError(f"chat: {where}{e}") from None
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[StreamDelta]:
        """Yield new tokens (and the text they complete) as they are generated. Text that
        could still turn out to start a stop string is held back until it cannot."""
        req = self._make_request(prompt, params, request_id)
        if req.params.is_beam_search:
            raise SettingError("stream() does not support beam search; use generate()")
        return self._stream(req)

    def _stream(self, req: Request) -> Iterator[StreamDelta]:
        # The consumer's next() steps the engine: for one thread (or a few sharing the
        # engine under its lock). A server has one thread step for everyone
        # (jaxrt.serve.engine_loop) and reads deltas through `open_stream`.
        stream = self._open(req, own_output=False)
        rid = req.request_id
        try:
            while True:
                with self._step_lock:
                    if not req.is_finished:  # (it may have finished in someone else's step)
                        self._stashed += [o for o in self._step() if o.request_id != rid]
                    delta = stream.poll()
                    if delta is not None and delta.finish_reason is not None:
                        self._stashed = [o for o in self._stashed if o.request_id != rid]
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            if not req.is_finished:
                self.abort(rid)

    def open_stream(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> "RequestStream":
        """Queue a request and return its `RequestStream`, whose `poll()` gives the delta
        since the last poll. Nothing steps the engine: the caller's own loop (one thread
        calling `step()`) does. The request's output is not returned by `step()`."""
        req = self._make_request(prompt, params, request_id)
        if req.params.is_beam_search:
            raise ValueError("streams do not support beam search; use generate()")
        return self._open(req, own_output=True)

    def _open(self, req: Request, own_output: bool) -> "RequestStream":
        stream = RequestStream(self, req)
        with self._step_lock:
            self._enqueue(req)
            if own_output:
                self._streamed.add(req.request_id)
        return stream

    def stats(self) -> EngineStats:
        b, sp = self.block_manager.stats(), self.scheduler.spec_stats
        return EngineStats(self._steps, self._generated, self.scheduler.num_preemptions,
                           b.prefix_cache_hit_rate, b.evictions, b.num_pages, b.pages_in_use,
                           b.free_pages, len(self.policy.all_buckets()), self._warmup_seconds,
                           self._compile_seconds, self._compiles_after_warmup,
                           self._background is not None and self._background.is_alive(),
                           self._decode_loops, sp.proposed, sp.accepted, sp.acceptance_rate,
                           sp.mean_accepted_length,
                           self.drafter.steps if self.drafter is not None else 0)


class RequestStream:
    """One request's deltas: `poll()` returns the tokens (with their logprobs when asked)
    and text new since the last poll, or None; the last delta has `finish_reason` and the
    full output. Text that could still turn out to start a stop string is held back until
    it cannot; half UTF-8 characters stay in the detokenizer. Poll from the thread that
    steps the engine (or any thread: it takes the engine's lock)."""

    def __init__(self, engine: Engine, req: Request):
        self.engine, self.request = engine, req
        self.request_id = req.request_id
        self._holdback = max((len(s) for s in req.params.stop), default=1) - 1
        self._sent_ids, self._sent_text, self._done = 0, "", False
        self._sent_prompt_logprobs = req.prompt_logprobs is None
        self._detok = IncrementalDetokenizer(engine._detokenize) \
            if engine.tokenizer is not None else None

    @property
    def finished(self) -> bool:
        return self._done

    def poll(self) -> StreamDelta | None:
        if self._done:
            return None
        req, rid = self.request, self.request_id
        with self.engine._step_lock:
            ids = list(req.output_ids)
            lps = req.logprobs
            new_lps = [dict(d) for d in lps[self._sent_ids:len(ids)]] \
                if lps is not None else None
            if req.is_finished:
                self._done = True
                final = self.engine._output(req)
                text = final.text
                delta = text[len(self._sent_text):] if text.startswith(self._sent_text) \
                    else ""
                return StreamDelta(rid, ids[self._sent_ids:], delta, final.finish_reason,
                                   final, new_lps, self._prompt_logprobs())
        if len(ids) == self._sent_ids:
            return None
        if self._detok is not None:
            self._detok.update(ids)
        text = self._detok.text if self._detok is not None else ""
        safe = text[:len(text) - self._holdback]
        delta = safe[len(self._sent_text):] if safe.startswith(self._sent_text) else ""
        out = StreamDelta(rid, ids[self._sent_ids:], delta, None, None, new_lps,
                          self._prompt_logprobs())
        self._sent_ids, self._sent_text = len(ids), self._sent_text + delta
        return out

    def _prompt_logprobs(self):
        """The prompt logprobs, on the first delta only (they are all computed once a
        token is out)."""
        if self._sent_prompt_logprobs:
            return None
        self._sent_prompt_logprobs = True
        return list(self.request.prompt_logprobs)


def _grammar_rows(rows: Seq[ScheduledSeq]) -> list[tuple[int, Any]]:
    """(row, matcher) of a decode call's constrained rows still running: the rows whose
    mask llguidance fills (`structured.fill_bitmask`)."""
    return [(i, r.request.grammar) for i, r in enumerate(rows)
            if r.request.grammar is not None and not r.request.is_finished]


def _is_one_prompt(x) -> bool:
    if isinstance(x, str) or (isinstance(x, np.ndarray) and x.ndim == 1):
        return True
    return isinstance(x, Seq) and len(x) > 0 and isinstance(x[0], (int, np.integer))


def _warmup_mode(warmup: bool | str, strict: bool) -> bool | str:
    if warmup == "auto":
        import jax
        return True if strict or jax.default_backend() != "cpu" else "background"
    if warmup not in (True, False, "background"):
        raise SettingError(f"warmup={warmup!r}: expected True, False, 'background' or 'auto'")
    if warmup == "background" and strict:
        raise SettingError("warmup='background' compiles on the request path; "
                         "strict_compiles=True forbids that")
    return warmup


# Engines with a background warm-up: stopped at exit, so that no compile is in flight
# while the interpreter shuts down.
_WARMING: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _stop_warmups() -> None:
    for engine in list(_WARMING):
        engine.close()


def _register_stop_hook() -> None:
    """(Re-)register `_stop_warmups` as the newest exit handler. atexit runs handlers
    last-registered first, and `weakref.finalize` registers its own (which runs JAX's
    cache finalizers) when the first finalizer is made, after jaxrt's import: a compile
    in progress under it failed with a bare `Var(id=...)`. Registered again each time a
    warm-up starts (after it has compiled), ours runs before it."""
    atexit.unregister(_stop_warmups)
    atexit.register(_stop_warmups)


def _task_key(task: tuple):
    """What `Engine._compiled` records for a step program task."""
    return task[1] if task[0] == "step" else task


def _describe(task: tuple, i: int, n: int) -> str:
    if task[0] == "step":
        b = task[1]
        return f"step {i + 1}/{n} (T={b.T} S={b.S} Q={b.Q} MP={b.MP} N={b.N})"
    if task[0] == "decode":
        return f"decode loop {i + 1}/{n} (S={task[1]} MP={task[2]})"
    if task[0] == "decode-forward":
        return f"decode forward {i + 1}/{n} (S={task[1]} MP={task[2]})"
    if task[0] == "draft":
        b = task[1]
        return f"draft step {i + 1}/{n} (T={b.T} S={b.S} Q={b.Q} N={b.N})"
    if task[0] == "draft-decode":
        return f"draft decode loop {i + 1}/{n} (S={task[1]})"
    return f"sampler {i + 1}/{n} (N={task[1]})"


def _decode_steps(value: int | None) -> int:
    """Decode steps per runner call: 1 on a CPU, where a step's compute dwarfs the
    host's share; DEFAULT_DECODE_STEPS beside an accelerator, whose steps are short
    enough that the host's per-step work and launches would otherwise idle it."""
    if value is None:
        import jax
        return 1 if jax.default_backend() == "cpu" else DEFAULT_DECODE_STEPS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"decode_steps must be a positive integer, got {value!r}")
    return value


def _compile_threads(value: int | None) -> int:
    """Threads for a blocking warm-up's compiles: JAXRT_COMPILE_THREADS, else 1 on a CPU
    (XLA's CPU compiles of these graphs are short and the cores run the model) and half
    the host's cores, at most 8, beside an accelerator."""
    if value is None:
        env = os.environ.get("JAXRT_COMPILE_THREADS")
        if env:
            try:
                value = int(env)
            except ValueError:
                raise SettingError(f"JAXRT_COMPILE_THREADS={env!r} is not an integer") from None
    if value is None:
        import jax
        if jax.default_backend() == "cpu":
            return 1
        return max(1, min(8, (os.cpu_count() or 2) // 2))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"compile_threads must be a positive integer, got {value!r}")
    return value


def _default_growth() -> int:
    """Shape-bucket growth: 2 on CPUs; 4 on accelerators, where each bucket compiles
    slower (Llama-3.1-8B, 256 sequences, 4,096-token budget on an H200: 18 buckets and
    67 s cold at 2, 10 buckets and 33 s at 4)."""
    import jax
    return 2 if jax.default_backend() == "cpu" else 4


# ---- loading (the one place that knows the compiler) -----------------------------------

def _draft_share(config, target: str, *, dtype, page_size, num_pages, max_model_len,
                 max_num_seqs, max_num_batched_tokens, outline_layers) -> tuple[float, int]:
    """(GiB, bytes per token) a speculative draft loaded by name will hold beside the
    target's cache: its weights and activations, and its own cache's bytes per token (it
    keeps a cache of the target's page count). (0, 0) where nothing is to plan: no draft
    by name, an explicit num_pages, or a target that is an engine directory (planned when
    compiled). The draft's pipeline runs once here to read its plan's numbers."""
    from ..compiler import Target, load
    from ..frontends.sources import resolve_model
    if config is None or config.method != "draft" \
            or not isinstance(config.model, (str, os.PathLike)) or num_pages is not None \
            or resolve_model(target)[0] == "engine":
        return (0.0, 0)
    draft = os.fspath(config.model)
    target_plan = Target.detect(dtype) if resolve_model(draft)[0] != "engine" else None
    compiled = load(draft, target=target_plan, dtype=dtype, page_size=page_size or 16,
                    max_model_len=max_model_len or 0, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens or 2048,
                    outline_layers=outline_layers)
    plan = compiled.kv_plan
    budget = plan.get("budget", {})
    held = int(budget.get("weight_bytes", 0)) + int(budget.get("activation_bytes", 0))
    return (held / 2**30, int(plan["bytes_per_token"]))


def _load(model: str, *, dtype, page_size: int | None, num_pages: int | None,
          memory_fraction: float, max_cache_gib: float | None, max_num_seqs: int,
          max_model_len: int | None, max_num_batched_tokens: int | None,
          outline_layers: bool | None = None, tensor_parallel: int = 1,
          data_parallel: int = 1, quantize: str = "", fuse: bool | None = None,
          shared: tuple[float, int] = (0.0, 0)):
    """Path or alias -> (StepExecutable, tokenizer, eos ids, the planned max length).
    The plan-kv-cache pass sizes the cache (num_pages) from these options and the target
    (device memory; on a CPU the available host memory and a cap on the cache).
    `shared` = (GiB, bytes per token) another model on the device holds besides its
    cache, and its cache's cost per token of these pages (a speculative draft's)."""
    from ..compiler import Target, load
    from ..frontends.sources import resolve_model
    if resolve_model(model)[0] == "engine":
        # planned when it was compiled: no passes run, and load() refuses a setting that
        # differs from what the directory fixed (None: as compiled)
        target = None
        if max_cache_gib is not None:
            raise SettingError(f"kv_cache_max_gib={max_cache_gib}: {model} is an engine "
                             f"directory; its KV cache was planned when it was compiled")
    else:
        target = Target.detect(dtype, kv_cache_max_gib=max_cache_gib)
        page_size = page_size or 16
    compiled = load(model, target=target, dtype=dtype, page_size=page_size,
                    memory_fraction=memory_fraction,
                    max_model_len=max_model_len or 0, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens or 2048,
                    num_pages=num_pages or 0, outline_layers=outline_layers,
                    tensor_parallel=tensor_parallel, data_parallel=data_parallel,
                    quantize=quantize, fuse=fuse,
                    **({"kv_reserve_gib": shared[0],
                        "kv_companion_bytes_per_token": shared[1]} if any(shared) else {}))
    if target is None:  # an engine directory: its mesh and quantization were compiled in
        mesh = dict(compiled.module.attributes.get("mesh") or {})
        have = (int(mesh.get("tp", 1)), int(mesh.get("dp", 1)))
        if (tensor_parallel, data_parallel) != have:
            raise SettingError(f"tensor_parallel={tensor_parallel}, data_parallel="
                               f"{data_parallel}: {model} is an engine directory compiled "
                               f"for tp={have[0]}, dp={have[1]}")
        if quantize:
            raise SettingError(f"quantize={quantize!r}: {model} is an engine directory; "
                               f"quantize when compiling it (jaxrt compile -q)")
        if fuse is not None:
            raise SettingError(f"fuse={fuse}: {model} is an engine directory; its passes "
                               f"ran when it was compiled")
    eos = tuple(compiled.config.eos_token_ids) or tuple(getattr(compiled.tokenizer, "eos_ids",
                                                                ()))
    # The planned length: the model's context, or what max_model_len / an engine directory's
    # compile options asked for.
    return (compiled.executable(wait=False), compiled.tokenizer, eos,
            compiled.kv_plan["max_model_len"], compiled.chat_template)
