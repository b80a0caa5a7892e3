"""The OpenAI-compatible HTTP app: completions, chat completions, models, health, metrics.

``stream: true`` answers with server-sent events (``data: {json}\\n\\n`` ... ``data: [DONE]``).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a malformed
or invalid request (bad JSON, failed validation, unknown model, prompt longer than the
context) is 400; a body over ``max_request_bytes`` is 413 (checked before it is parsed);
a full engine queue or ``max_concurrent_requests`` requests in flight is 429; a failure of
the server itself is 500 and a stopped engine 503, both with a fixed message (the detail
is logged, never sent). A client that goes away (streaming or not) cancels its request,
and the engine frees its KV blocks. Prompts are tokenised and chat templates rendered in
a worker thread, so a large prompt never blocks the event loop (``/health`` answers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from livethinking.engine.outputs import RequestOutput
from livethinking.model.prompt import encode_chat
from livethinking.server import protocol as P
from livethinking.server.body_limit import BodySizeLimit, BodyTooLarge
from livethinking.server.engine_thread import AsyncEngine, EngineDeadError, EngineStepError
from livethinking.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from livethinking.server.responses import (ENGINE_DEAD_MESSAGE, STEP_FAILED_MESSAGE,
                                           stream_events, whole_response)
from livethinking.server.streaming import EventStream, gather_or_cancel, merge_outputs

__all__ = ["APIError", "DEFAULT_MAX_REQUEST_BYTES", "build_app", "default_served_model_name"]

_log = logging.getLogger(__name__)

# 4 MiB: a full 128k-token context as JSON-escaped non-ASCII text (~6 bytes a character,
# ~4 characters a token: ~3 MiB) or as token ids (~7 bytes each: ~0.9 MiB) still fits;
# a body beyond it cannot be a prompt the engine accepts anyway.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


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


def _engine_dead() -> APIError:
    return APIError(503, ENGINE_DEAD_MESSAGE, "service_unavailable_error")


def _step_failed() -> APIError:
    return APIError(500, STEP_FAILED_MESSAGE, "server_error")


class _ClientGone(Exception):
    """The client disconnected before the answer was ready."""


@dataclass(slots=True)
class _ServerState:
    engine: AsyncEngine
    model_name: str
    max_concurrent_requests: int | None
    tokenizer_pool: concurrent.futures.ThreadPoolExecutor
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

    async def off_loop(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` in the tokenizer thread (one: the tokenizer is shared)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, lambda: fn(*args, **kwargs))


def default_served_model_name(model_path: str | Path) -> str:
    """The model id served when none is given: the checkpoint folder's name (never its
    absolute path, which would expose the server's file system)."""
    path = Path(model_path)
    return path.name or path.resolve().name or "model"


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


def _readable_loc(loc) -> list[str]:
    """A pydantic error location without ``body`` and union-member tags."""
    return [str(x) for x in loc if x != "body" and not (
        isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "none")))]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return f"the request body is not valid JSON: {detail.get('msg')}", None
    parts, param = [], None
    for e in errors:
        loc = _readable_loc(e.get("loc", ()))
        param = param or (loc[0] if loc else None)
        part = f"{'.'.join(loc) or 'body'}: {e.get('msg')}"
        if part not in parts:
            parts.append(part)
    return "invalid request: " + "; ".join(parts), param


def build_app(engine: AsyncEngine, model_name: str, *,
              max_concurrent_requests: int | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              enable_docs: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name``.

    Its lifespan starts the engine thread if it is not running yet (and then stops it at
    shutdown); an engine already running is left running. ``max_concurrent_requests``
    bounds the generation requests in flight (more are answered 429); request bodies
    over ``max_request_bytes`` are answered 413. ``/docs``, ``/redoc`` and
    ``/openapi.json`` exist only with ``enable_docs``.
    """
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) \
            or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be an int >= 1, got {max_request_bytes!r}")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="livethinking-tokenizer")
    state = _ServerState(engine, model_name, max_concurrent_requests, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owns = not engine.running
        if owns:
            engine.start()
        try:
            yield
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if owns:
                await run_in_threadpool(engine.shutdown)

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="livethinking", lifespan=lifespan, **docs)
    app.state.livethinking = state
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):
            return APIError(413, str(exc.detail), code="request_too_large").response()
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception):
        _log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error", "server_error").response()

    @app.get("/health")
    async def health():
        if not engine.running:
            raise _engine_dead()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": state.created,
                                            "owned_by": "livethinking"}]}

    @app.get("/metrics")
    async def metrics():
        stats = await engine.stats()
        return Response(state.metrics.render(stats, in_flight=state.in_flight),
                        media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        received = time.perf_counter()
        _check_model(body.model, model_name)
        params = _params(body, default_max_tokens=16)
        prompts = [await _prompt_ids(state, p) for p in P.completion_prompts(body)]
        return await _respond(state, request, "completion", body, prompts, params, received)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        received = time.perf_counter()
        _check_model(body.model, model_name)
        params = _params(body, default_max_tokens=engine.max_model_len)
        prompt = await _chat_prompt(state, body.messages)
        return await _respond(state, request, "chat", body, [prompt], params, received)

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


async def _prompt_ids(state: _ServerState, prompt: str | list[int]) -> str | list[int]:
    """A text prompt's token ids (as the engine would encode it), off the event loop."""
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, list) or tokenizer is None:
        return prompt  # without a tokenizer the engine refuses text with a clear 400
    try:
        return await state.off_loop(tokenizer.encode, prompt)
    except Exception as exc:
        raise APIError(400, f"cannot tokenize the prompt: {exc}", param="prompt") from None


async def _chat_prompt(state: _ServerState, messages: list[P.ChatMessage]) -> list[int]:
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use "
                            "/v1/completions with token ids", param="messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return await state.off_loop(encode_chat, tokenizer, conversation)
    except Exception as exc:  # a jinja error: the request's fault
        raise APIError(400, f"cannot format the messages: {exc}", param="messages") from None


class _Generation:
    """The engine requests of one HTTP request (one per prompt), their metric trackers
    and its in-flight slot; ``close()`` aborts what is unfinished and frees the slot."""

    def __init__(self, state: _ServerState, request_id: str, prompts: list, params,
                 received: float) -> None:
        state.acquire()
        self.state = state
        ids = [request_id] if len(prompts) == 1 else [
            f"{request_id}-{i}" for i in range(len(prompts))]
        self.streams = [state.engine.generate(i, p, params, arrival_time=received)
                        for i, p in zip(ids, prompts)]
        self.trackers = [state.metrics.track(received) for _ in prompts]
        self._closed = False

    async def firsts(self) -> list[RequestOutput]:
        """Every prompt's first output (admission errors propagate)."""
        firsts = await gather_or_cancel([anext(s) for s in self.streams])
        for tracker, first in zip(self.trackers, firsts):
            tracker.observe(first)
        return firsts

    async def lasts(self, firsts: list[RequestOutput]) -> list[RequestOutput]:
        """Every prompt's finished output."""
        async def collect(first, stream: AsyncIterator[RequestOutput], tracker):
            last = first
            async for output in stream:
                tracker.observe(output)
                last = output
            return last

        return await gather_or_cancel([collect(f, s, t) for f, s, t in
                                       zip(firsts, self.streams, self.trackers)])

    async def close(self) -> None:
        """Abort unfinished engine requests, record metrics, free the slot; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for stream in self.streams:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        finally:
            for tracker in self.trackers:
                tracker.close()
            self.state.release()


async def _respond(state: _ServerState, request: Request, kind: str, body, prompts: list,
                   params, received: float):
    """Admit the requests, wait for their first outputs, then answer whole or as a stream."""
    from livethinking.engine import EngineFullError  # the engine package's public error

    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    generation = _Generation(state, request_id, prompts, params, received)
    handed_over = False
    try:
        try:
            firsts = await _unless_disconnected(request, generation.firsts())
        except EngineFullError as exc:
            raise APIError(429, f"the engine queue is full: {exc}", "rate_limit_error",
                           code="rate_limit_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages" if kind == "chat" else "prompt") \
                from None
        except EngineDeadError:
            raise _engine_dead() from None
        except EngineStepError:
            raise _step_failed() from None
        except _ClientGone:
            return Response(status_code=499)
        created = int(time.time())
        n = params.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(state.engine.tokenizer, state.model_name, kind, request_id,
                                   created, firsts, merge_outputs(generation.streams),
                                   generation.trackers, include_usage, n)
            response = EventStream(events, generation.close,
                                   headers={"Cache-Control": "no-cache",
                                            "X-Accel-Buffering": "no"})
            handed_over = True
            return response
        try:
            lasts = await _unless_disconnected(request, generation.lasts(firsts))
        except _ClientGone:
            return Response(status_code=499)
        except EngineDeadError:
            raise _engine_dead() from None
        except EngineStepError:
            raise _step_failed() from None
        want_logprobs = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
        return whole_response(state.engine.tokenizer, state.model_name, kind, want_logprobs,
                              request_id, created, lasts, n)
    finally:
        if not handed_over:
            await generation.close()
