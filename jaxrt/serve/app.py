"""The OpenAI HTTP API over an `EngineLoop` (FastAPI).

Handlers never touch the Engine's state: they tokenize, validate, submit to the loop and
read their request's events from an asyncio queue the engine thread fills through
`call_soon_threadsafe`. Every refusal is OpenAI's error JSON with a 4xx status
(`{"error": {"message", "type", "param", "code"}}`); a 5xx means a bug or a failed
engine. A client that goes away (a closed stream, or a dropped connection while a
non-streaming request runs) aborts its requests, which frees their pages.
"""
from __future__ import annotations

import dataclasses

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.request import SamplingParams, StreamDelta, validate_prompt_ids
from .engine_loop import EngineLoop, Overloaded, ShuttingDown, Submission
from .metrics import ServerMetrics
from .protocol import BadRequest, ChatCompletionRequest, CompletionRequest

DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks its client


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code
        self.headers = headers or {}


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(loop: EngineLoop, config: ServerConfig,
               metrics: ServerMetrics | None = None) -> FastAPI:
    engine = loop.engine
    app = FastAPI(title="jaxrt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop, app.state.config, app.state.metrics = loop, config, metrics

    def refuse(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        if metrics is not None:
            metrics.error(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return refuse(e.status, _error_body(e.message, e.type, e.param, e.code), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return refuse(e.status_code, _error_body(str(e.detail), kind, None, None),
                      getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return refuse(400, _error_body(str(e), "invalid_request_error", None, None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return refuse(500, _error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error", None, None))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def read_body(request: Request, model_cls):
        authorize(request)
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if int(length) > limit:
                raise ApiError(413, f"the request body is {length} bytes; the limit is "
                                    f"{limit}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
        try:
            req = model_cls.model_validate_json(bytes(body))
        except ValidationError as e:
            message, loc = _validation_message(e)
            raise ApiError(400, message, param=loc) from None
        if req.model != config.model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server "
                                f"serves '{config.model_name}'", param="model",
                           code="model_not_found")
        try:
            req.check()
        except BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        return req

    @app.get("/health")
    async def health():
        if loop._failed is not None:
            raise ApiError(503, f"the engine failed: {loop._failed}", "server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_endpoint():
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": config.created,
            "owned_by": "jaxrt", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await read_body(request, CompletionRequest)
        prompts = [_prompt_ids(engine, p) for p in req.prompts()]
        groups = [[(_sample_params(engine, req, req.max_output_tokens, req.logprobs, ids, j,
                                   req.prompt_logprobs_wanted), ids)
                   for j in range(req.n)] for ids in prompts]
        run = _Run(loop, groups, "cmpl")
        await run.start(request)
        kind = _CompletionFormat(engine, req, run, prompts)
        if req.stream:
            return StreamingResponse(_sse(run, kind), media_type="text/event-stream")
        return JSONResponse(kind.full(await run.collect(request)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        if not engine.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        from ..frontends.chat import encode_chat
        try:
            ids = encode_chat(engine.tokenizer, engine.chat_template, req.chat_messages(),
                              parse_special=False)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = req.max_output_tokens
        if max_tokens is None:
            max_tokens = engine.max_model_len - len(ids)
            if max_tokens < 1:
                raise ApiError(400, f"the messages are {len(ids)} tokens; the context is "
                                    f"{engine.max_model_len}", param="messages",
                               code="context_length_exceeded")
        top = req.top_logprobs or 0
        groups = [[(_sample_params(engine, req, max_tokens, top if req.logprobs else None,
                                   ids, j), ids) for j in range(req.n)]]
        run = _Run(loop, groups, "chatcmpl")
        await run.start(request)
        kind = _ChatFormat(engine, req, run)
        if req.stream:
            return StreamingResponse(_sse(run, kind), media_type="text/event-stream")
        return JSONResponse(kind.full(await run.collect(request)))

    return app


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON: {err.get('msg')}", None
    more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
    return (f"{loc}: {err.get('msg')}{more}" if loc else f"{err.get('msg')}{more}"), \
        loc or None


def _prompt_ids(engine, prompt) -> list[int]:
    try:
        if isinstance(prompt, str):
            if engine.tokenizer is None:
                raise ValueError("this model has no tokenizer: send token ids")
            ids = engine.encode_prompt(prompt)
        else:
            ids = prompt
        return validate_prompt_ids(ids, engine.vocab_size)
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None


def _sample_params(engine, req, max_tokens: int, logprobs: int | None, ids: list[int],
                   j: int, prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        params = req.sampling_params(max_tokens, logprobs, prompt_logprobs)  # (bad schema: 400)
        if params.seed is not None and j:  # parallel samples must differ (vLLM: seed + j)
            params = dataclasses.replace(params, seed=(params.seed + j) % (2 ** 63))
        params.validate(engine.vocab_size, engine.max_model_len, len(ids),
                        max_logprobs=engine.max_logprobs)
    except ValueError as e:
        raise ApiError(400, str(e).replace("SamplingParams.", ""),
                       code="context_length_exceeded" if "max_model_len" in str(e)
                       else None) from None
    return params


class _Run:
    """The requests of one HTTP call (prompts x n samples) and their event queue."""

    def __init__(self, loop: EngineLoop, groups, prefix: str):
        self.loop = loop
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.rids: list[str] = []
        self.subs: list[list[Submission]] = []
        for i, group in enumerate(groups):
            subs = []
            for j, (params, ids) in enumerate(group):
                rid = f"{self.id}-{i}-{j}"
                self.rids.append(rid)
                subs.append(Submission(rid, ids, params))
            self.subs.append(subs)
        self.index = {rid: k for k, rid in enumerate(self.rids)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: dict[str, StreamDelta] = {}
        self.buffered: list[Any] = []

    def _sink(self, aloop):
        put = self.queue.put_nowait

        def sink(event):
            aloop.call_soon_threadsafe(put, event)
        return sink

    async def start(self, request: Request) -> None:
        """Submit and wait until every request is accepted by the engine (or one is
        refused: the others are aborted, and the caller gets a 400)."""
        sink = self._sink(asyncio.get_running_loop())
        submitted = []
        try:
            for subs in self.subs:
                self.loop.submit(subs, sink)
                submitted += [s.request_id for s in subs]
        except Overloaded as e:
            self.abort(submitted)
            raise ApiError(429, str(e), "rate_limit_error", code="server_overloaded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ShuttingDown as e:
            self.abort(submitted)
            raise ApiError(503, str(e), "server_error", headers={"Retry-After": "5"}) \
                from None
        waiting = set(self.rids)
        try:
            while waiting:
                event = await self.queue.get()
                if isinstance(event, tuple) and event[0] == "accepted":
                    waiting.discard(event[1])
                elif isinstance(event, tuple) and event[0] == "error":
                    err = event[2]
                    if isinstance(err, ShuttingDown):
                        raise ApiError(503, str(err), "server_error",
                                       headers={"Retry-After": "5"})
                    if isinstance(err, ValueError):
                        raise ApiError(400, str(err))
                    raise ApiError(500, str(err), "server_error")
                else:
                    self.buffered.append(event)
        except BaseException:
            self.abort()
            raise

    def abort(self, rids=None) -> None:
        for rid in (self.rids if rids is None else rids):
            if rid not in self.finished:
                self.loop.abort(rid)

    async def events(self):
        """StreamDeltas until every request finished."""
        while self.buffered:
            yield self._note(self.buffered.pop(0))
        while len(self.finished) < len(self.rids):
            yield self._note(await self.queue.get())

    def _note(self, event):
        if isinstance(event, tuple):
            if event[0] == "disconnected":
                raise ApiError(499, "client disconnected")
            # ("error", rid, e): the engine failed mid-request
            raise ApiError(500, str(event[2]), "server_error")
        if event.finish_reason is not None:
            self.finished[event.request_id] = event
        return event

    async def collect(self, request: Request) -> dict[str, StreamDelta]:
        """Wait for every request to finish; abort them if the client goes away."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            for event in self.buffered:
                self._note(event)
            self.buffered.clear()
            while len(self.finished) < len(self.rids):
                self._note(await self.queue.get())
            return self.finished
        finally:
            watcher.cancel()
            self.abort()   # (finished requests are skipped)

    async def _watch(self, request: Request) -> None:
        """(asyncio.wait_for over queue.get can lose an item on Python 3.11: a watcher
        task posts to the queue instead.)"""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            if await request.is_disconnected():
                self.queue.put_nowait(("disconnected",))
                return


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Format:
    """Shared by completions and chat: token strings, logprobs, usage."""

    def __init__(self, engine, req, run: _Run):
        self.engine, self.req, self.run = engine, req, run
        self.n = req.n

    def token_text(self, token: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([token], skip_special_tokens=False) if tok is not None else ""

    full_object = ""  # the non-streamed response's "object"

    def choice(self, rid: str, out, ids: list[int]) -> dict:
        """One finished request's choice fields (before its finish_reason); `ids` are the
        output ids its text is made of."""
        raise NotImplementedError

    def full(self, finished: dict[str, StreamDelta]) -> dict:
        """The non-streamed response of the run's finished requests."""
        choices = []
        for rid in self.run.rids:
            d = finished[rid]
            out = d.output
            choices.append({"index": self.run.index[rid],
                            **self.choice(rid, out, out.ids[:self.visible(d, out.ids)]),
                            "finish_reason": out.finish_reason})
        return {"id": self.run.id, "object": self.full_object, "created": self.run.created,
                "model": self.req.model, "choices": choices,
                "usage": self.usage(finished, self.prompts)}

    def visible(self, delta: StreamDelta, ids: list[int]) -> int:
        """How many of `ids` (the last ones of a request) the text is made of: a final
        stop token is not (as Engine._visible)."""
        if delta.finish_reason == "stop" and ids:
            last, req = ids[-1], self.req
            if (last in self.engine.eos_token_ids and not req.ignore_eos) \
                    or last in (req.stop_token_ids or ()):
                return len(ids) - 1
        return len(ids)

    def prompt_len(self, rid: str) -> int:
        """The prompt tokens of one request of the run."""
        return len(self.prompts[self.run.index[rid] // self.n])

    def usage(self, finished: dict[str, StreamDelta], prompts: list[list[int]]) -> dict:
        out = sum(len(d.output.ids) for d in finished.values() if d.output is not None)
        return _usage(sum(len(p) for p in prompts), out)

    def sse_usage(self, finished, prompts) -> dict:
        return {"id": self.run.id, "object": self.chunk_object, "created": self.run.created,
                "model": self.req.model, "choices": [], "usage": self.usage(finished,
                                                                           prompts)}


class _CompletionFormat(_Format):
    chunk_object = "text_completion"
    full_object = "text_completion"

    def __init__(self, engine, req: CompletionRequest, run: _Run, prompts):
        super().__init__(engine, req, run)
        self.prompts = prompts
        self.offsets: dict[str, int] = {}

    def prompt_text(self, rid: str) -> str:
        if not self.req.echo:
            return ""
        ids = self.prompts[self.run.index[rid] // self.n]
        tok = self.engine.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def prompt_ids(self, rid: str) -> list[int]:
        return self.prompts[self.run.index[rid] // self.n]

    def echo_logprobs(self, rid: str, plp) -> dict:
        """OpenAI's logprobs of the echoed prompt: null for its first token; each later
        one's top dict holds the `logprobs` best and the prompt token itself."""
        tokens, token_lps, tops, offsets, at = [], [], [], [], 0
        for p, t in enumerate(self.prompt_ids(rid)):
            d = plp[p] if plp is not None else None
            s = self.token_text(t)
            tokens.append(s)
            token_lps.append(None if d is None else d[t].logprob)
            best = [] if d is None else sorted(d, key=lambda k: d[k].rank)
            keep = set(best[:self.req.logprobs]) | {t}
            tops.append(None if d is None else
                        {self.token_text(k): d[k].logprob for k in best if k in keep})
            offsets.append(at)
            at += len(s)
        self.offsets[rid] = at
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def logprobs(self, rid: str, ids: list[int], lps, plp=None, first=False) -> dict | None:
        """Generated tokens' logprobs; under `echo`, the prompt's come first (`first`:
        this is the request's first chunk, or the whole of it)."""
        if self.req.logprobs is None or lps is None:
            return None
        out = self.echo_logprobs(rid, plp) if self.req.echo and first else None
        tokens, token_lps, tops, offsets = [], [], [], []
        at = self.offsets.get(rid, 0)
        for t, d in zip(ids, lps):
            s = self.token_text(t)
            tokens.append(s)
            token_lps.append(d.get(t))
            best = sorted(d.items(), key=lambda kv: -kv[1])[:self.req.logprobs]
            tops.append({self.token_text(k): v for k, v in best})
            offsets.append(at)
            at += len(s)
        self.offsets[rid] = at
        gen = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
               "text_offset": offsets}
        return gen if out is None else {k: out[k] + gen[k] for k in gen}

    def prompt_logprobs_json(self, plp) -> list | None:
        """vLLM's `prompt_logprobs` of a choice: None, then token id -> its Logprob."""
        if self.req.prompt_logprobs is None or plp is None:
            return None
        return [None if d is None else {str(t): {"logprob": v.logprob, "rank": v.rank,
                                                 "decoded_token": v.decoded_token}
                                        for t, v in d.items()} for d in plp]

    def chunk(self, delta: StreamDelta, first: bool) -> dict:
        ids = delta.ids[:self.visible(delta, delta.ids)] if delta.finish_reason else delta.ids
        text = (self.prompt_text(delta.request_id) if first else "") + delta.text
        return {"id": self.run.id, "object": "text_completion", "created": self.run.created,
                "model": self.req.model, "choices": [{
                    "index": self.run.index[delta.request_id], "text": text,
                    "logprobs": self.logprobs(delta.request_id, ids, delta.logprobs,
                                              delta.prompt_logprobs, first),
                    **self._vllm_prompt_logprobs(delta.prompt_logprobs if first else None),
                    "finish_reason": delta.finish_reason}]}

    def _vllm_prompt_logprobs(self, plp) -> dict:
        if self.req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": self.prompt_logprobs_json(plp)}

    def choice(self, rid: str, out, ids: list[int]) -> dict:
        return {"text": self.prompt_text(rid) + out.text,
                "logprobs": self.logprobs(rid, ids, out.logprobs, out.prompt_logprobs, True),
                **self._vllm_prompt_logprobs(out.prompt_logprobs)}

    def first_chunks(self) -> list[dict]:
        return []

    def usage_prompts(self):
        return self.prompts


class _ChatFormat(_Format):
    chunk_object = "chat.completion.chunk"
    full_object = "chat.completion"

    def __init__(self, engine, req: ChatCompletionRequest, run: _Run):
        super().__init__(engine, req, run)
        self.prompts = [s.prompt for s in run.subs[0][:1]]

    def logprobs(self, ids: list[int], lps) -> dict | None:
        if not self.req.logprobs or lps is None:
            return None
        k = self.req.top_logprobs or 0
        content = []
        for t, d in zip(ids, lps):
            s = self.token_text(t)
            best = sorted(d.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": s, "logprob": d.get(t), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token_text(a), "logprob": v,
                                              "bytes": list(self.token_text(a).encode())}
                                             for a, v in best]})
        return {"content": content}

    def first_chunks(self) -> list[dict]:
        return [{"id": self.run.id, "object": "chat.completion.chunk",
                 "created": self.run.created, "model": self.req.model,
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]}
                for i in range(len(self.run.rids))]

    def chunk(self, delta: StreamDelta, first: bool) -> dict:
        ids = delta.ids[:self.visible(delta, delta.ids)] if delta.finish_reason else delta.ids
        body = {"content": delta.text} if delta.text or not delta.finish_reason else {}
        return {"id": self.run.id, "object": "chat.completion.chunk",
                "created": self.run.created, "model": self.req.model, "choices": [{
                    "index": self.run.index[delta.request_id], "delta": body,
                    "logprobs": self.logprobs(ids, delta.logprobs),
                    "finish_reason": delta.finish_reason}]}

    def choice(self, rid: str, out, ids: list[int]) -> dict:
        return {"message": {"role": "assistant", "content": out.text},
                "logprobs": self.logprobs(ids, out.logprobs)}


def _sse_line(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse(run: _Run, fmt: _Format):
    """Server-sent events; cancelled by Starlette when the client disconnects, which
    aborts every request of the run. Under `continuous_usage_stats` every chunk carries
    its choice's usage so far (vLLM's: the choice's prompt, the tokens generated so far,
    a final stop token included)."""
    continuous = fmt.req.continuous_usage
    generated = dict.fromkeys(run.rids, 0)

    def line(chunk: dict, rid: str) -> bytes:
        if continuous:
            chunk["usage"] = _usage(fmt.prompt_len(rid), generated[rid])
        return _sse_line(chunk)

    try:
        for rid, c in zip(run.rids, fmt.first_chunks()):
            yield line(c, rid)
        seen: set[str] = set()
        try:
            async for delta in run.events():
                rid = delta.request_id
                first = rid not in seen
                seen.add(rid)
                generated[rid] += len(delta.ids)
                if delta.ids or delta.text or delta.finish_reason or \
                        (first and isinstance(fmt, _CompletionFormat) and fmt.req.echo):
                    yield line(fmt.chunk(delta, first), rid)
        except ApiError as e:  # headers are sent: report it in the stream
            yield _sse_line(_error_body(e.message, e.type, e.param, e.code))
            return
        if fmt.req.include_usage:
            yield _sse_line(fmt.sse_usage(run.finished, fmt.prompts))
        yield b"data: [DONE]\n\n"
    finally:
        run.abort()
