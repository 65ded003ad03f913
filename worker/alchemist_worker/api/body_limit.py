"""A request body size limit (ALCHEMIST_MAX_BODY_BYTES), enforced before anything parses the body.

An ASGI middleware: a declared Content-Length over the limit is answered 413 without reading a byte; a body
sent without a length (chunked) is read up to the limit and answered 413 as soon as it passes it, and
otherwise handed to the app as it came. The answer is an OpenAI-style error, and the connection is closed
(the rest of the body is never read).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a full context of text is tens of kilobytes


def error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


async def send_error(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"ALCHEMIST_MAX_BODY_BYTES must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> bytes:
        return error_body(
            f"the request body is {size}, more than this server's limit of {self.max_bytes} bytes "
            "(ALCHEMIST_MAX_BODY_BYTES); send a shorter prompt",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                body = error_body(
                    "the Content-Length header is not a byte count", code="invalid_content_length"
                )
                await send_error(send, 400, body, [(b"connection", b"close")])
                return
            if length > self.max_bytes:
                await send_error(send, 413, self._too_large(f"{length} bytes"), [(b"connection", b"close")])
                return
            await self.app(scope, receive, send)  # the server holds the body to the declared length
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        await self._buffered(scope, receive, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No declared length: reads up to the limit, then replays what was read to the app."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app sees the disconnect
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await send_error(
                    send, 413, self._too_large(f"over {self.max_bytes} bytes"), [(b"connection", b"close")]
                )
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
