"""The OpenAI-compatible HTTP app: completions, chat completions, models, health, metrics.

``stream: true`` answers with server-sent events (``data: {json}\\n\\n`` ... ``data: [DONE]``).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a malformed
or invalid request (bad JSON, failed validation, unknown model, prompt longer than the
context) is 400; a full engine queue or ``max_concurrent_requests`` requests in flight is
429. A client that goes away (streaming or not) cancels its request, and the engine
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from livethinking.engine.outputs import RequestOutput
from livethinking.server import protocol as P
from livethinking.server.engine_thread import AsyncEngine, EngineDeadError
from livethinking.server.metrics import CONTENT_TYPE_LATEST, RequestTracker, ServerMetrics

__all__ = ["APIError", "build_app"]


class APIError(Exception):
    """An error answered in OpenAI's format with the given HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> JSONResponse:
        """The error as an OpenAI-shaped JSON response."""
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


@dataclass(slots=True)
class _ServerState:
    engine: AsyncEngine
    model_name: str
    max_concurrent_requests: int | None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # touched on the event loop only

    def acquire(self) -> None:
        """Take an in-flight slot or raise a 429 `APIError`."""
        limit = self.max_concurrent_requests
        if limit is not None and self.in_flight >= limit:
            raise APIError(429, f"too many requests in flight (limit {limit}); retry later",
                           "rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += 1

    def release(self) -> None:
        """Give an in-flight slot back."""
        self.in_flight -= 1


class _EventStream(StreamingResponse):
    """SSE response that always watches for the client going away and, however the
    stream ends, closes its body iterator (whose cleanup aborts the request)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable`` unless the client disconnects first (then cancel it and raise
    `_ClientGone`)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise _ClientGone()
    return task.result()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return f"the request body is not valid JSON: {detail.get('msg')}", None
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), param


def build_app(engine: AsyncEngine, model_name: str, *,
              max_concurrent_requests: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name``.

    Its lifespan starts the engine thread if it is not running yet (and then stops it at
    shutdown); an engine already running is left running. ``max_concurrent_requests``
    bounds the generation requests in flight (more are answered 429).
    """
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    state = _ServerState(engine, model_name, max_concurrent_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owns = not engine.running
        if owns:
            engine.start()
        try:
            yield
        finally:
            if owns:
                await run_in_threadpool(engine.shutdown)

    app = FastAPI(title="livethinking", lifespan=lifespan)
    app.state.livethinking = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type_).response()

    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "the engine is not running", "service_unavailable_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": state.created,
                                            "owned_by": "livethinking"}]}

    @app.get("/metrics")
    async def metrics():
        stats = await engine.stats()
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        received = time.perf_counter()
        _check_model(body.model, model_name)
        params = _params(body, default_max_tokens=16)
        return await _respond(state, request, "completion", body, body.prompt, params, received)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        received = time.perf_counter()
        _check_model(body.model, model_name)
        params = _params(body, default_max_tokens=engine.max_model_len)
        prompt = _chat_prompt(engine.tokenizer, body.messages)
        return await _respond(state, request, "chat", body, prompt, params, received)

    return app


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(400, f"the model `{requested}` does not exist; this server serves "
                            f"`{served}`", param="model", code="model_not_found")


def _params(body, default_max_tokens: int):
    try:
        return P.sampling_params(body, default_max_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def _chat_prompt(tokenizer, messages: list[P.ChatMessage]) -> list[int]:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use "
                            "/v1/completions with token ids", param="messages")
    try:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # a jinja error or a bad content part: the request's fault
        raise APIError(400, f"cannot format the messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


async def _respond(state: _ServerState, request: Request, kind: str, body, prompt, params,
                   received: float):
    """Admit the request, wait for its first output, then answer whole or as a stream."""
    from livethinking.engine import EngineFullError  # the engine package's public error

    state.acquire()
    handed_over = False
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    stream = state.engine.generate(request_id, prompt, params, arrival_time=received)
    tracker = state.metrics.track(received)
    try:
        try:
            first = await _unless_disconnected(request, anext(stream))
        except EngineFullError as exc:
            raise APIError(429, f"the engine queue is full: {exc}", "rate_limit_error",
                           code="rate_limit_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if kind == "chat" else "prompt") \
                from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "service_unavailable_error") from None
        except _ClientGone:
            return Response(status_code=499)
        tracker.observe(first)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(state, kind, request_id, created, first, stream, tracker,
                                    include_usage, params.n)
            handed_over = True
            return _EventStream(events, headers={"Cache-Control": "no-cache",
                                                 "X-Accel-Buffering": "no"})
        try:
            last = await _unless_disconnected(request, _collect(first, stream, tracker))
        except _ClientGone:
            return Response(status_code=499)
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "service_unavailable_error") from None
        return _whole_response(state, kind, body, request_id, created, last)
    finally:
        if not handed_over:
            await stream.aclose()
            tracker.close()
            state.release()


async def _collect(first: RequestOutput, stream: AsyncIterator[RequestOutput],
                   tracker: RequestTracker) -> RequestOutput:
    last = first
    async for output in stream:
        tracker.observe(output)
        last = output
    return last


def _whole_response(state: _ServerState, kind: str, body, request_id: str, created: int,
                    last: RequestOutput) -> dict:
    tokenizer = state.engine.tokenizer
    choices = []
    for c in sorted(last.outputs, key=lambda c: c.index):
        if kind == "chat":
            lp = P.chat_logprobs(tokenizer, c.token_ids, c.logprobs) if body.logprobs else None
            choices.append(P.chat_choice(c.index, c.text, c.finish_reason, lp))
        else:
            lp = (P.completion_logprobs(tokenizer, c.token_ids, c.logprobs)
                  if body.logprobs is not None else None)
            choices.append(P.completion_choice(c.index, c.text, c.finish_reason, lp))
    use = P.usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))
    build = P.chat_response if kind == "chat" else P.completion_response
    return build(request_id, created, state.model_name, choices, use)


async def _stream_events(state: _ServerState, kind: str, request_id: str, created: int,
                         first: RequestOutput, stream: AsyncIterator[RequestOutput],
                         tracker: RequestTracker, include_usage: bool,
                         n: int) -> AsyncIterator[str]:
    """The SSE events of one request; closing it early aborts the request."""
    tokenizer, model = state.engine.tokenizer, state.model_name
    text_offsets = [0] * n  # completions' text_offset per choice
    deltas = P.DeltaTracker(n)
    chat = kind == "chat"

    def chunk(output: RequestOutput, want_logprobs: bool) -> str | None:
        choices = []
        for d in deltas.deltas(output):
            if not d.text and d.finish_reason is None and not want_logprobs:
                continue  # tokens that do not complete a character yet
            if chat:
                lp = (P.chat_logprobs(tokenizer, d.token_ids, d.logprobs)
                      if want_logprobs else None)
                delta = {"content": d.text} if d.text or not d.finish_reason else {}
                choices.append({"index": d.index, "delta": delta, "logprobs": lp,
                                "finish_reason": d.finish_reason})
            else:
                lp = None
                if want_logprobs:
                    lp = P.completion_logprobs(tokenizer, d.token_ids, d.logprobs,
                                               text_offsets[d.index])
                    text_offsets[d.index] += len(d.text)
                choices.append(P.completion_choice(d.index, d.text, d.finish_reason, lp))
        if not choices:
            return None
        build = P.chat_chunk if chat else P.completion_response
        return _sse(build(request_id, created, model, choices, None))

    want_logprobs = any(c.logprobs is not None for c in first.outputs)
    last = first
    try:
        async with contextlib.aclosing(stream):
            if chat:
                yield _sse(P.chat_chunk(request_id, created, model, [
                    {"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None} for i in range(n)]))
            if (event := chunk(first, want_logprobs)) is not None:
                yield event
            async for output in stream:
                tracker.observe(output)
                last = output
                if (event := chunk(output, want_logprobs)) is not None:
                    yield event
        if include_usage:
            use = P.usage(len(last.prompt_token_ids),
                          sum(len(c.token_ids) for c in last.outputs))
            build = P.chat_chunk if chat else P.completion_response
            yield _sse(build(request_id, created, model, [], use))
        yield _sse("[DONE]")
    except EngineDeadError as exc:
        yield _sse(P.error_body(str(exc), "service_unavailable_error"))
        yield _sse("[DONE]")
    finally:
        tracker.close()
        state.release()
