"""What every generating endpoint shares: the server's state, OpenAI-shaped errors, the
engine requests of one HTTP request, and cancellation when the client goes away.

A generation first passes the `GenerationGate` (it waits while generation is paused and
holds a reader slot until it is closed, so a weight update waits for it), then takes an
in-flight slot (``max_concurrent_requests``: else 429).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from livethinking.engine.outputs import RequestOutput
from livethinking.server import protocol as P
from livethinking.server.engine_thread import AsyncEngine, EngineDeadError, EngineStepError
from livethinking.server.generation_gate import GenerationGate
from livethinking.server.metrics import ServerMetrics
from livethinking.server.responses import ENGINE_DEAD_MESSAGE, STEP_FAILED_MESSAGE
from livethinking.server.streaming import gather_or_cancel

__all__ = ["APIError", "ClientGone", "Generation", "ServerState", "engine_dead",
           "first_outputs", "last_outputs", "open_generation", "prompt_ids", "step_failed",
           "unless_disconnected"]


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


def engine_dead() -> APIError:
    return APIError(503, ENGINE_DEAD_MESSAGE, "service_unavailable_error")


def step_failed() -> APIError:
    return APIError(500, STEP_FAILED_MESSAGE, "server_error")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    model_name: str
    max_concurrent_requests: int | None
    tokenizer_pool: concurrent.futures.ThreadPoolExecutor
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # touched on the event loop only
    gate: GenerationGate = field(default_factory=GenerationGate)
    weight_version: str = "default"  # SGLang's default label; set by weight updates

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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable):
    """Await ``awaitable`` unless the client disconnects first (then cancel it and raise
    `ClientGone`)."""
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
        raise ClientGone()
    return task.result()


async def prompt_ids(state: ServerState, prompt: str | list[int]) -> str | list[int]:
    """A text prompt's token ids (as the engine would encode it), off the event loop."""
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, list) or tokenizer is None:
        return prompt  # without a tokenizer the engine refuses text with a clear 400
    try:
        return await state.off_loop(tokenizer.encode, prompt)
    except Exception as exc:
        raise APIError(400, f"cannot tokenize the prompt: {exc}", param="prompt") from None


class Generation:
    """The engine requests of one HTTP request (one per prompt), their metric trackers
    and its in-flight slot; ``close()`` aborts what is unfinished and frees the slot."""

    def __init__(self, state: ServerState, request_id: str, prompts: list, params,
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
            await self.state.gate.leave()


async def open_generation(state: ServerState, request: Request, request_id: str,
                          prompts: list, params, received: float) -> Generation:
    """Pass the gate (waiting while paused or while a weight update runs; `ClientGone`
    if the client leaves meanwhile), then admit the prompts; ``close()`` the result to
    give everything back."""
    if not state.gate.try_enter():  # held back: wait, unless the client leaves meanwhile
        await unless_disconnected(request, state.gate.enter())
    try:
        return Generation(state, request_id, prompts, params, received)
    except BaseException:
        await state.gate.leave()
        raise


async def first_outputs(request: Request, generation: Generation, param: str):
    """Every prompt's first output; the engine's refusals as `APIError` (429 queue full,
    400 naming ``param``, 503 / 500), `ClientGone` when the client leaves."""
    from livethinking.engine import EngineFullError  # the engine package's public error

    try:
        return await unless_disconnected(request, generation.firsts())
    except EngineFullError as exc:
        raise APIError(429, f"the engine queue is full: {exc}", "rate_limit_error",
                       code="rate_limit_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None
    except EngineDeadError:
        raise engine_dead() from None
    except EngineStepError:
        raise step_failed() from None


async def last_outputs(request: Request, generation: Generation, firsts):
    """Every prompt's finished output (503 / 500 `APIError`; `ClientGone`)."""
    try:
        return await unless_disconnected(request, generation.lasts(firsts))
    except EngineDeadError:
        raise engine_dead() from None
    except EngineStepError:
        raise step_failed() from None
