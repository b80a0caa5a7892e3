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

import concurrent.futures
import contextlib
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from livethinking.model.prompt import encode_chat
from livethinking.server import protocol as P
from livethinking.server.auth import APIKeyAuth
from livethinking.server.body_limit import BodySizeLimit, BodyTooLarge
from livethinking.server.engine_thread import AsyncEngine
from livethinking.server.generation import (APIError, ClientGone, ServerState, engine_dead,
                                            first_outputs, last_outputs, open_generation,
                                            prompt_ids)
from livethinking.server.metrics import CONTENT_TYPE_LATEST
from livethinking.server.responses import stream_events, whole_response
from livethinking.server.rl_api import WeightVersionHeader, add_rl_routes
from livethinking.server.streaming import EventStream, merge_outputs

__all__ = ["APIError", "DEFAULT_MAX_REQUEST_BYTES", "build_app", "default_served_model_name"]

_log = logging.getLogger(__name__)

# 4 MiB: a full 128k-token context as JSON-escaped non-ASCII text (~6 bytes a character,
# ~4 characters a token: ~3 MiB) or as token ids (~7 bytes each: ~0.9 MiB) still fits;
# a body beyond it cannot be a prompt the engine accepts anyway.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def default_served_model_name(model_path: str | Path) -> str:
    """The model id served when none is given: the checkpoint folder's name (never its
    absolute path, which would expose the server's file system)."""
    path = Path(model_path)
    return path.name or path.resolve().name or "model"


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
              enable_docs: bool = False, enable_weight_updates: bool = False,
              api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name``: the OpenAI API and
    SGLang's RL API (:mod:`.rl_api`; its weight-update endpoints only with
    ``enable_weight_updates``).

    Its lifespan starts the engine thread if it is not running yet (and then stops it at
    shutdown); an engine already running is left running. ``max_concurrent_requests``
    bounds the generation requests in flight (more are answered 429); request bodies
    over ``max_request_bytes`` are answered 413. ``/docs``, ``/redoc`` and
    ``/openapi.json`` exist only with ``enable_docs``. With ``api_key`` every endpoint
    wants ``Authorization: Bearer <api_key>`` (else 401).
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be None or a non-empty string")
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) \
            or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be an int >= 1, got {max_request_bytes!r}")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="livethinking-tokenizer")
    state = ServerState(engine, model_name, max_concurrent_requests, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owns = not engine.running
        if owns:
            engine.start()
        try:
            yield
        finally:
            weight_sync.close()
            pool.shutdown(wait=False, cancel_futures=True)
            if owns:
                await run_in_threadpool(engine.shutdown)

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="livethinking", lifespan=lifespan, **docs)
    app.state.livethinking = state
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(WeightVersionHeader, state=state)
    if api_key is not None:  # the outermost layer: nothing runs for a request without it
        app.add_middleware(APIKeyAuth, api_key=api_key)
    weight_sync = add_rl_routes(app, state, enable_weight_updates=enable_weight_updates)

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
            raise engine_dead()
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
        prompts = [await prompt_ids(state, p) for p in P.completion_prompts(body)]
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


async def _chat_prompt(state: ServerState, messages: list[P.ChatMessage]) -> list[int]:
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use "
                            "/v1/completions with token ids", param="messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return await state.off_loop(encode_chat, tokenizer, conversation)
    except Exception as exc:  # a jinja error: the request's fault
        raise APIError(400, f"cannot format the messages: {exc}", param="messages") from None


async def _respond(state: ServerState, request: Request, kind: str, body, prompts: list,
                   params, received: float):
    """Admit the requests, wait for their first outputs, then answer whole or as a stream."""
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        generation = await open_generation(state, request, request_id, prompts, params,
                                           received)
    except ClientGone:
        return Response(status_code=499)
    handed_over = False
    try:
        try:
            firsts = await first_outputs(request, generation,
                                         "messages" if kind == "chat" else "prompt")
        except ClientGone:
            return Response(status_code=499)
        created = int(time.time())
        n = params.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(state.engine.tokenizer, state.model_name, kind, request_id,
                                   created, firsts, merge_outputs(generation.streams),
                                   generation.trackers, include_usage, n,
                                   return_token_ids=_wants_token_ids(body))
            response = EventStream(events, generation.close,
                                   headers={"Cache-Control": "no-cache",
                                            "X-Accel-Buffering": "no"})
            handed_over = True
            return response
        try:
            lasts = await last_outputs(request, generation, firsts)
        except ClientGone:
            return Response(status_code=499)
        want_logprobs = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
        return whole_response(state.engine.tokenizer, state.model_name, kind, want_logprobs,
                              request_id, created, lasts, n,
                              return_token_ids=_wants_token_ids(body))
    finally:
        if not handed_over:
            await generation.close()


def _wants_token_ids(body) -> bool:
    return bool(getattr(body, "return_token_ids", False))  # completions only
