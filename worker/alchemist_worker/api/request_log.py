"""Request ids for every API call, and one access line per OpenAI-API call.

An ASGI middleware. The id is the caller's `X-Request-ID` when it sends a usable one (a gateway's trace id), a
fresh one otherwise; it is echoed in the response's `X-Request-ID` header and set in the logging context
(`alchemist_protocol.log_format`) for as long as the request runs, so every line logged on its behalf carries
it. The generation routes add the response id that feedback will name. Probes and /metrics log nothing.
"""

from __future__ import annotations

import logging
import time
import uuid

from alchemist_protocol.log_format import log_context, response_id_var
from alchemist_worker.api.body_limit import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("alchemist_worker.access")

MAX_REQUEST_ID = 128
_QUIET_PREFIXES = ("/healthz", "/readyz", "/metrics")


def usable_request_id(raw: bytes | None) -> str | None:
    """The caller's id when it is short printable ASCII without spaces (it lands in logs and headers)."""
    if not raw or len(raw) > MAX_REQUEST_ID:
        return None
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if value.isprintable() and " " not in value else None


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = usable_request_id(headers.get(b"x-request-id")) or f"req-{uuid.uuid4().hex}"
        status = 500
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        path = str(scope.get("path", ""))
        with log_context(request_id=request_id):
            token = response_id_var.set(None)  # set by the route that makes a response id
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if not path.startswith(_QUIET_PREFIXES):
                    log.info(
                        "%s %s %d",
                        scope.get("method", ""),
                        path,
                        status,
                        extra={"status": status, "duration_ms": round((time.monotonic() - start) * 1000, 1)},
                    )
                response_id_var.reset(token)
