"""``--api-key``: every endpoint wants ``Authorization: Bearer <key>`` (vLLM's header).

`APIKeyAuth` wraps an ASGI app: an HTTP request without the right key is answered 401 in
OpenAI's error shape (with ``WWW-Authenticate: Bearer``) before anything reads its body
or reaches the engine; the key is compared in constant time. Every path is guarded,
``/health`` and ``/metrics`` included: a weight push is a remote code path into the
model, and what a server runs is nobody else's business.
"""

from __future__ import annotations

import hmac
import json

from livethinking.server.protocol import error_body

__all__ = ["APIKeyAuth"]


class APIKeyAuth:
    """ASGI middleware: HTTP requests must carry ``Authorization: Bearer <api_key>``."""

    def __init__(self, app, api_key: str) -> None:
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await self._refuse(send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send) -> None:
        body = json.dumps(error_body("a valid API key is required: send the header "
                                     "'Authorization: Bearer <key>' (the server's --api-key)",
                                     "authentication_error", code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
