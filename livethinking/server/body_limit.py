"""A request-body size limit, enforced before the body is parsed.

`BodySizeLimit` wraps an ASGI app: a ``Content-Length`` above the limit is answered 413
at once, without reading the body; a body sent without one (chunked) is counted as it
arrives and refused with a 413 as soon as it passes the limit, so at most one chunk
beyond the limit is ever held. Errors use OpenAI's shape.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from livethinking.server.protocol import error_body

__all__ = ["BodySizeLimit", "BodyTooLarge"]


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. An HTTPException,
    so FastAPI's body reader re-raises it (it turns other errors into a 400) and the
    app's HTTP-error handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes "
                              f"(--max-request-bytes)")


def _too_large_body(limit: int) -> bytes:
    return json.dumps(error_body(BodyTooLarge(limit).detail, code="request_too_large")).encode()


class BodySizeLimit:
    """ASGI middleware: HTTP request bodies of more than ``max_bytes`` bytes get a 413."""

    def __init__(self, app, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # the server (h11) refuses a malformed length itself
            if too_large:
                await self._refuse(send)
                return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, send) -> None:
        body = _too_large_body(self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
