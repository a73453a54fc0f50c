"""OpenAI-compatible HTTP server: one engine, owned by a scheduler thread that decodes requests together.

Requests are admitted first come, first served into at most ``max_batch`` active sequences; every
scheduler iteration runs ONE ``engine.step`` over all of them, so each layer the pager brings in
serves every active request (this is where offloading gains most). Beyond ``max_queue`` waiting
requests the server answers 429 at once rather than letting latency grow without bound.

Everything a request carries is untrusted: the body is size- and time-limited before it is parsed,
parsed with depth limits, validated field by field, and user text is tokenized so that it can never
spell a control token. The ``model`` field is only compared with the loaded model's name; no
request can make the server open a file.

Run it with ``python -m pagellm.server MODEL --port 8080`` or ``serve(model_path, ...)``.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagellm.api import (LLM, PromptBuilder, chat_chunk, chat_dict, completion_dict, merge_stops, new_id,
                         openai_finish_reason, usage_dict)
from pagellm.engine import EngineConfig, InferenceEngine, SequenceState
from pagellm.offload.policy import NoOffload, OffloadPolicy
from pagellm.offload.pressure import peak_rss_bytes, process_rss_bytes
from pagellm.sampling import SamplerConfig

log = logging.getLogger("pagellm.server")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server; every bound answers with an error instead of a stall."""

    max_body_bytes: int = 1 << 20  # larger bodies get 413 before any byte is parsed
    body_timeout_s: float = 30.0  # the whole body must arrive within this (slow clients get 408)
    header_timeout_s: float = 10.0  # request line and headers must arrive within this, or the connection closes
    max_json_depth: int = 32  # nesting deeper than any valid request gets 400
    max_queue: int = 64  # requests waiting for a slot; beyond it 429
    max_batch: int = 8  # sequences decoded together in one step
    max_connections: int = 256  # open connections uvicorn accepts; beyond it 503
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this
    graceful_shutdown_s: int = 600  # on SIGTERM, in-flight requests get this long to finish
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string
    disconnect_poll_s: float = 0.25  # how often a waiting request checks that its client is still there


# Roles OpenAI clients send; "developer" is OpenAI's newer name for "system", which templates know.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# -- errors ----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client closed the connection while its request was being served."""


# -- reading and validating requests -------------------------------------------------------------------


async def read_json(request: Request, limits: ServerLimits) -> dict[str, Any]:
    """The request body as a JSON object, enforcing size, time, UTF-8 and depth before trusting it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_content_length")
        if int(declared) > limits.max_body_bytes:
            raise _too_large(limits)
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:  # a chunked body has no Content-Length to check up front
                raise _too_large(limits)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), limits.body_timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="request_timeout") from None
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_utf8") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="json_too_deep") from None
    except ValueError as error:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise ApiError(422, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if _depth(body) > limits.max_json_depth:
        raise ApiError(400, f"the JSON body is nested deeper than {limits.max_json_depth} levels", code="json_too_deep")
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object", code="invalid_type")
    return body


def _too_large(limits: ServerLimits) -> ApiError:
    return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes", code="request_too_large")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion for an attacker to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "bool": ((bool,), "a boolean"),
    "str": ((str,), "a string"),
    "dict": ((dict,), "an object"),
    "list": ((list,), "an array"),
}


def _field(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """``body[name]`` checked against ``kind`` (422 when of the wrong type); ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    types, described = _KINDS[kind]
    if (isinstance(value, bool) and kind != "bool") or not isinstance(value, types):
        raise ApiError(422, f"'{name}' must be {described}, got {type(value).__name__}", param=name,
                       code="invalid_type")
    return value


def _bad_value(name: str, message: str) -> ApiError:
    return ApiError(400, f"'{name}' {message}", param=name, code="invalid_value")


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    """A number field within [low, high] (400 outside it)."""
    value = _field(body, name, "number", default)
    if not low <= value <= high:
        raise _bad_value(name, f"must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


@dataclass
class GenerationRequest:
    """The validated, engine-ready part of a completion or chat completion request."""

    sampler: SamplerConfig
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_common(body: dict[str, Any], defaults: SamplerConfig, limits: ServerLimits,
                 default_max_tokens: int | None) -> GenerationRequest:
    """Sampling, length, stop and streaming fields shared by both endpoints."""
    _field(body, "model", "str")
    _field(body, "user", "str")
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise _bad_value("n", "must be 1: pagellm generates one choice per request")
    for name, neutral in (("logit_bias", ({},)), ("suffix", ("",)), ("tools", ([],)), ("functions", ([],))):
        if body.get(name) is not None and body[name] not in neutral:
            raise _bad_value(name, "is not supported by pagellm")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _bad_value("logprobs", "is not supported by pagellm")
    response_format = _field(body, "response_format", "dict")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise _bad_value("response_format", "only {'type': 'text'} is supported by pagellm")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none", "auto"):
        raise _bad_value("tool_choice", "is not supported by pagellm")

    max_tokens = _field(body, "max_completion_tokens", "int", None)
    max_tokens = _field(body, "max_tokens", "int", default_max_tokens if max_tokens is None else max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise _bad_value("max_tokens", f"must be at least 1, got {max_tokens}")
    seed = _field(body, "seed", "int")
    if seed is not None and seed < 0:
        seed = None if seed == -1 else _raise(_bad_value("seed", f"must be >= 0 (or -1 for random), got {seed}"))
    if seed is not None and seed >= 2**64:
        raise _bad_value("seed", "must be below 2**64")
    try:
        sampler = SamplerConfig(
            temperature=_number(body, "temperature", defaults.temperature, 0.0, 100.0),
            top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
            top_k=_top_k(body, defaults.top_k),
            min_p=_number(body, "min_p", defaults.min_p, 0.0, 1.0),
            repeat_penalty=_number(body, "repeat_penalty", defaults.repeat_penalty, 1e-6, 100.0),
            frequency_penalty=_number(body, "frequency_penalty", defaults.frequency_penalty, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", defaults.presence_penalty, -2.0, 2.0),
            repeat_last_n=defaults.repeat_last_n,
            seed=seed,
        )
    except ValueError as error:
        raise ApiError(400, str(error), code="invalid_value") from None

    stop_field = body.get("stop")
    if stop_field is None:
        stops: list[str] = []
    elif isinstance(stop_field, str):
        stops = [stop_field]
    elif isinstance(stop_field, list) and all(isinstance(s, str) for s in stop_field):
        stops = list(stop_field)
    else:
        raise ApiError(422, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stops) > limits.max_stop:
        raise _bad_value("stop", f"may hold at most {limits.max_stop} strings")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise _bad_value("stop", f"strings may be at most {limits.max_stop_chars} characters long")

    stream = _field(body, "stream", "bool", False)
    options = _field(body, "stream_options", "dict")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad_value("stream_options", "is only allowed when 'stream' is true")
        include_usage = bool(_field(options, "include_usage", "bool", False))
    return GenerationRequest(sampler, max_tokens, stops, stream, include_usage)


def _top_k(body: dict[str, Any], default: int) -> int:
    value = _field(body, "top_k", "int", default)
    if value < 0:
        raise _bad_value("top_k", f"must be >= 0 (0 turns it off), got {value}")
    return value


def _raise(error: Exception) -> Any:
    raise error


def clean_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages reduced to the fields templates need, each checked (roles from a fixed set)."""
    messages = _field(body, "messages", "list")
    if messages is None:
        raise ApiError(422, "'messages' is required", param="messages", code="missing_field")
    if not messages:
        raise _bad_value("messages", "must hold at least one message")
    cleaned = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(422, f"'{where}' must be an object", param=where, code="invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise _bad_value(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {str(role)[:40]!r}")
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise ApiError(422, f"'{where}.content' must be a string or an array of content parts",
                           param=f"{where}.content", code="invalid_type")
        # Only role, content and name reach the template: anything else a client adds is not
        # validated, so it must not be rendered.
        copy: dict[str, Any] = {"role": _ROLES[role], "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ApiError(422, f"'{where}.name' must be a string", param=f"{where}.name", code="invalid_type")
            copy["name"] = name
        cleaned.append(copy)
    return cleaned


def completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """The ``prompt`` of a completion request: a string or token ids (a batch of one of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one, as clients send for a single prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if prompt is None:
        raise ApiError(422, "'prompt' is required", param="prompt", code="missing_field")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad_value("prompt", "must be one prompt: pagellm does not batch prompts in one request")
    raise ApiError(422, "'prompt' must be a string or an array of token ids", param="prompt", code="invalid_type")


# -- the scheduler --------------------------------------------------------------------------------------


class QueueFull(Exception):
    """No room in the request queue."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


class Job:
    """One request's generation, passed between the HTTP handler (event loop) and the scheduler thread."""

    def __init__(self, ids: list[int], request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.ids = ids
        self.max_tokens = request.max_tokens if request.max_tokens is not None else 1 << 30  # capped by start()
        self.sampler = request.sampler
        self.stop = request.stop
        self.loop = loop
        self.seq: SequenceState | None = None
        self.cancelled = False  # set by the handler; the scheduler acts on it between steps
        self.failed = False
        self._events: deque[tuple[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._last_check = loop.time()

    # scheduler side
    def push(self, kind: str, value: Any) -> None:
        """Hand an event ("text", "done", "error") to the waiting handler."""
        self._events.append((kind, value))
        try:
            self.loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the event loop is gone (shutdown): nobody will read this
            self.cancelled = True

    def on_text(self, _token: int, text: str) -> None:
        """Engine callback: a piece of final text."""
        if not self.failed and text:
            self.push("text", text)

    # handler side
    async def next_event(self, request: Request, poll_s: float) -> tuple[str, Any]:
        """The next event, raising _ClientGone if the client has disconnected (checked every ``poll_s``)."""
        while True:
            # Checked on a clock, not only when no event comes: tokens arriving faster than the
            # poll interval must not hide a client that left.
            now = self.loop.time()
            if now - self._last_check >= poll_s:
                self._last_check = now
                if await request.is_disconnected():
                    raise _ClientGone()
            if self._events:
                return self._events.popleft()
            self._wakeup.clear()
            if self._events:  # pushed between the check and the clear
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), poll_s)
            except TimeoutError:
                pass


class Metrics:
    """Counters the server exposes at /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefill_seconds = 0.0
        self.step_tokens = 0  # tokens made by batched decode steps
        self.step_seconds = 0.0
        self.steps = 0
        self.step_sequences = 0  # sequences decoded, summed over steps (over steps: the mean batch)
        self.max_batch_seen = 0
        self.engine_errors = 0
        self.cancelled = 0

    def count_request(self, endpoint: str, status: int) -> None:
        """One answered request."""
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add(self, **amounts: float) -> None:
        """Add to named counters."""
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)


class Scheduler:
    """Owns the engine: admits queued jobs FIFO, then decodes every active sequence in one step."""

    def __init__(self, engine: InferenceEngine, limits: ServerLimits, metrics: Metrics):
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []  # touched by the scheduler thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagellm-scheduler", daemon=True)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Sequences being decoded."""
        return len(self._active)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull (queue full) or ShuttingDown at once."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._pending) >= self.limits.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and active, then end the thread (waiting at most ``timeout``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._active:
                    return
                admitted = []
                while self._pending and len(self._active) + len(admitted) < self.limits.max_batch:
                    admitted.append(self._pending.popleft())
            try:
                for job in admitted:
                    self._admit(job)
                if self._active:
                    self._step()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one failure
                log.exception("scheduler iteration failed")
                for job in self._active:
                    self._fail(job, "internal error in the scheduler")
                self._active = []

    def _admit(self, job: Job) -> None:
        """Prefill a job's prompt and make it active (or answer it, when it ends at once or fails)."""
        if job.cancelled:
            self.metrics.add(cancelled=1)
            return
        t0 = time.perf_counter()
        try:
            job.seq = self.engine.start(job.ids, job.max_tokens, sampler=job.sampler, stop=job.stop,
                                        on_token=job.on_text)
        except ValueError as error:  # the request's own fault (checked before, so rare)
            job.failed = True
            job.push("error", ApiError(400, str(error), code="invalid_value"))
            return
        except Exception as error:  # noqa: BLE001 - e.g. an I/O error from the pager: this request fails, the server lives
            log.exception("prefill failed")
            self._fail(job, f"the engine failed: {type(error).__name__}: {error}")
            return
        self.metrics.add(prefill_seconds=time.perf_counter() - t0)
        if job.seq.done:
            self._answer(job)
        else:
            self._active.append(job)

    def _step(self) -> None:
        """One decode step for every active sequence; on an engine error, retry each alone to find the failing one."""
        for job in self._active:
            if job.cancelled and job.seq is not None:
                job.seq.cancel()
        live = [job for job in self._active if not job.seq.done]
        if live:
            before = {id(job): (job.seq.cache.n_tokens, len(job.seq.new_ids)) for job in live}
            t0 = time.perf_counter()
            try:
                self.engine.step([job.seq for job in live])
            except Exception:  # noqa: BLE001 - a batched step failed; find out which sequences it concerns
                log.exception("decode step failed; retrying the %d sequences one by one", len(live))
                for job in live:
                    job.seq.cache.truncate(before[id(job)][0])  # undo positions the failed pass wrote
                for job in live:
                    try:
                        self.engine.step([job.seq])
                    except Exception as error:  # noqa: BLE001
                        self._fail(job, f"the engine failed: {type(error).__name__}: {error}")
            made = sum(len(job.seq.new_ids) - before[id(job)][1] for job in live if job.seq is not None)
            self.metrics.add(step_seconds=time.perf_counter() - t0, step_tokens=made, steps=1,
                             step_sequences=len(live))
            self.metrics.max_batch_seen = max(self.metrics.max_batch_seen, len(live))
        still = []
        for job in self._active:
            if job.failed:
                continue
            if job.seq.done:
                self._answer(job)
            else:
                still.append(job)
        self._active = still

    def _answer(self, job: Job) -> None:
        seq = job.seq
        self.metrics.add(prompt_tokens=len(seq.prompt_ids), generated_tokens=len(seq.new_ids),
                         cancelled=int(seq.finish_reason == "cancelled"))
        job.push("done", (seq.text, seq.finish_reason, len(seq.prompt_ids), len(seq.new_ids)))

    def _fail(self, job: Job, message: str) -> None:
        job.failed = True
        if job.seq is not None:
            job.seq.cancel()
        self.metrics.add(engine_errors=1)
        job.push("error", ApiError(500, message, type="server_error", code="engine_error"))


# -- the application -------------------------------------------------------------------------------------


class _CountRequests:
    """ASGI middleware: counts answered requests by endpoint and status for /metrics."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label so clients cannot grow the metrics without bound.
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.count_request(endpoint, status)


def create_app(engine_or_llm: InferenceEngine | LLM, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI application serving a loaded engine (or LLM) as ``model_name``; starts its scheduler."""
    limits = limits or ServerLimits()
    if isinstance(engine_or_llm, LLM):
        engine, prompts = engine_or_llm.engine, engine_or_llm.prompts
    else:
        engine, prompts = engine_or_llm, PromptBuilder.for_engine(engine_or_llm)
    metrics = Metrics()
    scheduler = Scheduler(engine, limits, metrics)
    scheduler.start()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has already waited for in-flight requests; let the scheduler finish and end.
        await asyncio.to_thread(scheduler.stop, 30.0)

    app = FastAPI(title="pagellm", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.limits = scheduler, metrics, limits
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(error.detail), code=code, headers=error.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return ApiError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "pagellm"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and the scheduler runs."""
        return {"status": "ok", "model": model_name, "queued": scheduler.queued, "active": scheduler.active}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        """The one model this server serves."""
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        """The served model, by its name."""
        authorize(request)
        if model_id != model_name:
            raise ApiError(404, f"The model '{model_id[:100]}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics_text(request: Request) -> PlainTextResponse:
        """Prometheus text: requests, tokens, tokens/s, pager counters, memory."""
        authorize(request)
        text = render_metrics(metrics, scheduler, engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def submit(request: Request, ids: list[int], gen: GenerationRequest) -> Job:
        if len(ids) >= engine.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {engine.n_ctx} tokens; the prompt has "
                           f"{len(ids)} tokens, leaving no room to generate.", param="messages",
                           code="context_length_exceeded")
        job = Job(ids, gen, asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, "The server is busy: too many requests are waiting. Retry shortly.",
                           type="server_overloaded", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down") from None
        return job

    async def tokenize(fn: Any, *args: Any) -> list[int]:
        # Tokenizing a large prompt takes a while; off the event loop, so other clients are not held up.
        try:
            return await run_in_threadpool(fn, *args)
        except ValueError as error:
            raise ApiError(400, str(error), code="invalid_value") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI's legacy completions: continue a prompt."""
        authorize(request)
        body = await read_json(request, limits)
        gen = parse_common(body, engine.config.sampler, limits, default_max_tokens=16)
        prompt = completion_prompt(body)
        echo = _field(body, "echo", "bool", False)
        ids = await tokenize(prompts.prompt_ids, prompt)
        job = await submit(request, ids, gen)
        cid, now = new_id("cmpl"), int(time.time())
        prefix = prompt if echo and isinstance(prompt, str) else (
            prompts.tokenizer.decode(ids) if echo else "")

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return completion_dict(cid, now, model_name, text, finish)

        def whole(text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
            return completion_dict(cid, now, model_name, prefix + text, finish, usage)

        return await respond(request, job, gen, chunk, whole, [chunk(prefix, None)] if prefix else [])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI's chat completions, through the model's chat template."""
        authorize(request)
        body = await read_json(request, limits)
        gen = parse_common(body, engine.config.sampler, limits, default_max_tokens=None)
        messages = clean_messages(body)
        gen.stop = merge_stops(gen.stop, prompts.chat_stop)
        ids = await tokenize(prompts.chat_ids, messages)
        job = await submit(request, ids, gen)
        cid, now = new_id("chatcmpl"), int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return chat_chunk(cid, now, model_name, {"content": text} if finish is None else {}, finish)

        def whole(text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
            return chat_dict(cid, now, model_name, text, finish, usage)

        opening = [chat_chunk(cid, now, model_name, {"role": "assistant", "content": ""})]
        return await respond(request, job, gen, chunk, whole, opening)

    async def respond(request: Request, job: Job, gen: GenerationRequest, chunk: Any, whole: Any,
                      opening: list[dict[str, Any]]) -> Response:
        """Wait for the job and answer: one JSON body, or an SSE stream of chunks."""
        poll = limits.disconnect_poll_s
        try:
            # Wait for the first event before answering, so that a failure in prefill is a real
            # error status rather than an error inside a 200 stream.
            first = await job.next_event(request, poll)
            if first[0] == "error":
                raise first[1]
            if not gen.stream:
                parts, event = [], first
                while event[0] == "text":
                    parts.append(event[1])
                    event = await job.next_event(request, poll)
                if event[0] == "error":
                    raise event[1]
                text, reason, n_prompt, n_new = event[1]
                return JSONResponse(whole(text, openai_finish_reason(reason), usage_dict(n_prompt, n_new)))
        except _ClientGone:
            job.cancelled = True
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except BaseException:
            job.cancelled = True
            raise
        return _JobStream(job, stream(request, job, gen, chunk, opening, first), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(request: Request, job: Job, gen: GenerationRequest, chunk: Any,
                     opening: list[dict[str, Any]], first: tuple[str, Any]) -> AsyncIterator[str]:
        """SSE events for a streaming answer; ends with ``data: [DONE]``."""
        with_usage = gen.include_usage
        try:
            for item in opening:
                yield _sse(item, with_usage)
            event = first
            while True:
                kind, value = event
                if kind == "text":
                    yield _sse(chunk(value, None), with_usage)
                elif kind == "error":
                    yield _sse(value.body(), False)  # the status is sent already; OpenAI's clients raise on this
                    break
                else:
                    _text, reason, n_prompt, n_new = value
                    yield _sse(chunk("", openai_finish_reason(reason)), with_usage)
                    if with_usage:
                        final = chunk("", None)
                        final["choices"] = []
                        final["usage"] = usage_dict(n_prompt, n_new)
                        yield _sse(final, False)
                    yield "data: [DONE]\n\n"
                    break
                event = await job.next_event(request, limits.disconnect_poll_s)
        except _ClientGone:
            pass
        finally:
            job.cancelled = True  # the client left (or the stream ended): stop generating for it

    return app


class _JobStream(StreamingResponse):
    """A streaming response that stops its job however the response ends (even if it never starts)."""

    def __init__(self, job: Job, content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def _sse(obj: dict[str, Any], with_usage: bool) -> str:
    if with_usage:
        obj.setdefault("usage", None)  # with include_usage, OpenAI sends usage: null on every chunk but the last
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def render_metrics(metrics: Metrics, scheduler: Scheduler, engine: InferenceEngine) -> str:
    """The /metrics page in Prometheus text format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP pagellm_{name} {help_text}")
        lines.append(f"# TYPE pagellm_{name} {kind}")
        for labels, value in samples:
            lines.append(f"pagellm_{name}{labels} {value:g}" if isinstance(value, float) else f"pagellm_{name}{labels} {value}")

    with metrics._lock:
        requests = sorted(metrics.requests.items())
        m = dict(vars(metrics))
    metric("requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
           [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m["prompt_tokens"])])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", m["generated_tokens"])])
    metric("prompt_tokens_per_second", "gauge", "Prompt tokens per second of prefill, since start.",
           [("", m["prompt_tokens"] / m["prefill_seconds"] if m["prefill_seconds"] else 0.0)])
    metric("decode_tokens_per_second", "gauge",
           "Tokens per second made by batched decode steps (all active requests together), since start.",
           [("", m["step_tokens"] / m["step_seconds"] if m["step_seconds"] else 0.0)])
    metric("decode_steps_total", "counter", "Batched decode steps run.", [("", m["steps"])])
    metric("decode_step_sequences_total", "counter",
           "Sequences decoded, summed over steps (divided by decode_steps_total: the mean batch).",
           [("", m["step_sequences"])])
    metric("decode_batch_max", "gauge", "Most sequences decoded together in one step.", [("", m["max_batch_seen"])])
    metric("engine_errors_total", "counter", "Requests failed by an engine error.", [("", m["engine_errors"])])
    metric("cancelled_total", "counter", "Requests whose client went away before the end.", [("", m["cancelled"])])
    metric("requests_queued", "gauge", "Requests waiting for a slot.", [("", scheduler.queued)])
    metric("requests_active", "gauge", "Sequences being decoded.", [("", scheduler.active)])
    pager = engine.weights.stats if engine.weights is not None else None
    if pager is not None:
        metric("pager_acquires_total", "counter", "Weight groups the forward pass asked for.", [("", pager.acquires)])
        metric("pager_hits_total", "counter", "Acquires served from RAM.", [("", pager.hits)])
        metric("pager_misses_total", "counter", "Acquires that waited for a read.", [("", pager.misses)])
        metric("pager_bytes_read_total", "counter", "Bytes read from the model file.",
               [("", pager.bytes_read + pager.row_bytes_read)])
        metric("pager_stall_seconds_total", "counter", "Seconds the forward pass waited on reads.",
               [("", float(pager.stall_seconds))])
        metric("pager_evictions_total", "counter", "Weight groups evicted to stay in budget.", [("", pager.evictions)])
        metric("pager_prefetches_total", "counter", "Prefetches issued.", [("", pager.prefetches_issued)])
        metric("resident_bytes", "gauge", "Bytes of weights held in RAM now.", [("", pager.resident_bytes)])
        metric("budget_bytes", "gauge", "The offload policy's RAM budget for weights (0: none).",
               [("", engine.weights.budget_bytes or 0)])
    metric("rss_bytes", "gauge", "Resident set size of the process.", [("", process_rss_bytes())])
    metric("peak_rss_bytes", "gauge", "Peak resident set size of the process.", [("", peak_rss_bytes())])
    return "\n".join(lines) + "\n"


def _version() -> str:
    from pagellm import __version__

    return __version__


# -- running ------------------------------------------------------------------------------------------------


def serve(model_path: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          engine_config: EngineConfig | None = None, **limits: Any) -> None:
    """Load the model and serve it until SIGINT/SIGTERM (which let in-flight requests finish).

    After SIGTERM it raises SystemExit(0) once in-flight requests are answered, so the process exits 0.

    ``engine_config`` sets context, threads and offload policy (its model path is replaced by
    ``model_path``). ``limits`` are ``ServerLimits`` fields (max_queue, max_batch, max_body_bytes, ...),
    plus ``model_name`` (default: the file name without .gguf) and ``log_level`` (default "info").
    """
    model_name = limits.pop("model_name", None) or Path(model_path).name.removesuffix(".gguf")
    log_level = limits.pop("log_level", "info")
    known = {f.name for f in fields(ServerLimits)}
    unknown = sorted(set(limits) - known)
    if unknown:
        raise TypeError(f"serve() got unknown limits {unknown}; known: {sorted(known)}")
    server_limits = ServerLimits(**limits)
    config = replace(engine_config, model_path=model_path) if engine_config else EngineConfig(model_path)
    engine = InferenceEngine(config).load_model()
    app = create_app(engine, model_name, api_key=api_key, limits=server_limits)
    uv_config = uvicorn_config(app, host, port, server_limits, log_level)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for its previous handler;
    # ours turns it into a clean exit (status 0, engine closed) instead of death by signal.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if in_main else None
    try:
        uvicorn.Server(uv_config).run()
    except KeyboardInterrupt:  # Ctrl-C: same graceful shutdown, no traceback
        pass
    finally:
        engine.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def uvicorn_config(app: FastAPI, host: str, port: int, limits: ServerLimits, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration carrying the limits that act below the application (connections, timeouts)."""
    protocol = type("H11WithHeaderTimeout", (_H11WithHeaderTimeout,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        http=protocol,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=limits.graceful_shutdown_s,
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers; a body is streamed, not buffered
        server_header=False,
    )


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers.

    uvicorn bounds the idle time between keep-alive requests but not a client that sends headers a
    byte at a time; without a deadline a few hundred such clients would hold every connection slot.
    """

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the header deadline as the connection opens."""
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        """Cancel the deadline once headers are complete; restart it when a keep-alive request begins."""
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()
        elif self._header_timer is None:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _exit_cleanly(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    """``python -m pagellm.server MODEL [--host H] [--port P] [--api-key KEY] ...``."""
    defaults = ServerLimits()
    parser = argparse.ArgumentParser(prog="python -m pagellm.server", description="OpenAI-compatible server for a GGUF model.")
    parser.add_argument("model", help="path of the GGUF model file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=os.environ.get("PAGELLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $PAGELLM_API_KEY; none: open)")
    parser.add_argument("--model-name", help="name clients see (default: the file name)")
    parser.add_argument("--ctx", type=int, help="context size in tokens")
    parser.add_argument("--threads", type=int, help="compute threads")
    parser.add_argument("--offload", default="none", help="offload policy, e.g. none, budget:4GiB, pinned:4GiB,last=4")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 429")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="sequences decoded together")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    try:
        policy = OffloadPolicy.parse(args.offload) if args.offload else NoOffload()
    except ValueError as error:
        parser.error(str(error))
    config = EngineConfig(args.model, context_size=args.ctx, n_threads=args.threads, offload_policy=policy)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, engine_config=config,
          model_name=args.model_name, log_level=args.log_level, max_queue=args.max_queue,
          max_batch=args.max_batch, max_body_bytes=args.max_body_bytes)


if __name__ == "__main__":
    main()
