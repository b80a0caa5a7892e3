"""Server-sent events and the async plumbing of a request that fans out to several engine
requests (a batch of prompts): first outputs, merged outputs, all-or-nothing gathers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse

from livethinking.engine.outputs import RequestOutput

__all__ = ["EventStream", "gather_or_cancel", "merge_outputs", "sse"]


def sse(payload: dict | str) -> str:
    """One SSE event, ``data: {json}\\n\\n``; NaN/Infinity are refused (invalid JSON)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, allow_nan=False)
    return f"data: {text}\n\n"


class EventStream(StreamingResponse):
    """SSE response that always watches for the client going away and, however the
    response ends (even before its body started), closes its body iterator and then
    awaits ``on_close`` (which aborts the engine requests and frees the in-flight slot)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

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
            with anyio.CancelScope(shield=True):
                try:
                    await self.body_iterator.aclose()
                finally:
                    await self._on_close()


async def gather_or_cancel(awaitables: list[Awaitable]) -> list:
    """The results of all ``awaitables``, run concurrently; the first failure (or a
    cancellation of the caller) cancels and awaits the rest before it propagates."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge_outputs(streams: list[AsyncIterator[RequestOutput]]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(stream index, output)`` from all streams as they come; an error in one stream
    propagates (the others are cancelled when the merge is closed)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((i, output))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
