"""The served OpenAPI document (`/openapi.json`), made to say what the server actually answers.

FastAPI's generated document declares a 422 validation error with its own schema for every route; this server
answers bad input with 400 and an OpenAI-style error body, and also 401, 404, 409, 413, 429 and 503 where they
apply. Here the generated document is rewritten: the 422s go, each operation declares the errors it can
answer with the shared `ErrorResponse` schema, streamed completions declare `text/event-stream`, `/metrics`
declares Prometheus text, and the key sets that are configured appear as bearer security schemes. Tests run
schemathesis against this document, so a route that answers something undeclared fails them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from alchemist_worker.api.auth import ADMIN, API, AccessKeys, audience
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An OpenAI-style error",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": NULLABLE_STRING,
                "code": NULLABLE_STRING,
            },
        }
    },
}
PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
}
DESCRIPTIONS = {
    400: "Invalid request (malformed JSON, a bad field, or over the context length)",
    401: "Missing or invalid bearer token",
    404: "Unknown model or response id",
    409: "The idempotency key was already used for different feedback",
    413: "Request body over ALCHEMIST_MAX_BODY_BYTES",
    429: "Too busy (tokenizer queue, scores in progress, or the feedback backlog); retry later",
    503: "Shutting down, engine failing, or Redis unreachable",
}
# The errors each route answers besides 400/413 (every route with a body) and 401 (guarded routes).
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/completions"): (404, 429, 503),
    ("post", "/v1/chat/completions"): (404, 429, 503),
    ("get", "/v1/models/{name}"): (404,),
    ("post", "/v1/feedback"): (404, 409, 429, 503),
    ("get", "/v1/versions"): (503,),
    ("post", "/v1/versions/rollback"): (503,),
    ("post", "/v1/score"): (429, 503),
}
STREAMING = ("/v1/completions", "/v1/chat/completions")
SCHEMES = {API: "apiKey", ADMIN: "adminKey"}


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _operation_errors(method: str, path: str, operation: dict[str, Any], guarded: bool) -> Iterable[int]:
    if "requestBody" in operation:
        yield from (400, 413)
    if guarded:
        yield 401
    yield from ROUTE_ERRORS.get((method, path), ())


def rewrite(document: dict[str, Any], keys: AccessKeys | None) -> dict[str, Any]:
    """The generated document with the server's real answers; pure (works on a copy's parts in place)."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for generated in ("HTTPValidationError", "ValidationError"):
        schemas.pop(generated, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    configured = {name for name in SCHEMES if keys is not None and keys.for_audience(name).configured}
    if configured:
        components["securitySchemes"] = {
            SCHEMES[name]: {"type": "http", "scheme": "bearer", "description": f"the {name} key set"}
            for name in sorted(configured)
        }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            who = audience(path)
            guarded = who in configured
            if guarded and who is not None:
                operation["security"] = [{SCHEMES[who]: []}]
            for status in _operation_errors(method, path, operation, guarded):
                responses[str(status)] = _error_response(status)
            _success_content(method, path, responses)
    return document


def _success_content(method: str, path: str, responses: dict[str, Any]) -> None:
    ok = responses.get("200")
    if path in STREAMING and ok is not None:
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"type": "string", "description": "server-sent events, ending with 'data: [DONE]'"}
        }
    elif path == "/metrics" and ok is not None:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif path in ("/healthz", "/readyz"):
        probe = {"content": {"application/json": {"schema": PROBE_SCHEMA}}}
        responses["200"] = {"description": "Healthy / ready", **probe}
        responses["503"] = {"description": "Unhealthy / not ready (the reason says why)", **probe}
    elif method == "post" and path == "/v1/feedback":
        responses["200"] = {
            "description": "A retry with a used idempotency key: the first submission's entry, nothing queued",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }


def install_openapi(app: FastAPI, keys: AccessKeys | None) -> None:
    """Serves the rewritten document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = rewrite(document, keys)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
