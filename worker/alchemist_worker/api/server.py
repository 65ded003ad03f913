"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, health and metrics.

Requests reach the engine only through `AsyncEngine` (over the `ServingEngine` interface). A client that goes
away cancels its request: streaming responses are cancelled by the server when the connection closes, and
non-streaming ones watch for the disconnect while they wait. Either way the engine aborts the request and
frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from alchemist_protocol.log_format import response_id_var
from alchemist_worker.api.async_engine import AsyncEngine
from alchemist_worker.api.auth import AccessKeys, BearerAuth
from alchemist_worker.api.body_limit import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from alchemist_worker.api.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    model_not_found,
    unavailable,
)
from alchemist_worker.api.generation_request import build_generation_request, new_response_id
from alchemist_worker.api.metrics import ServingMetrics
from alchemist_worker.api.openai_responses import ResponseMeta, full_response, stream_chunk, usage_chunk
from alchemist_worker.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from alchemist_worker.api.openapi_document import install_openapi
from alchemist_worker.api.request_log import RequestLog
from alchemist_worker.api.tokenizer_pool import TokenizerPool
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.sequence import TokenLogprob
from alchemist_worker.engine.serving_engine import EngineStepFailed, RequestFailed, RequestOutput
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

DISCONNECT_POLL_S = 0.1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while its request was being served."""


@dataclass
class ServerState:
    loop: EngineLoop
    metrics: ServingMetrics
    draining: bool = False
    # More reasons not to be ready (the continual trainer's control loop): each returns a reason or None.
    readiness_checks: list[Callable[[], str | None]] = field(default_factory=list)
    tokenizer_pool: TokenizerPool = field(default_factory=TokenizerPool)

    @property
    def engine(self) -> Any:
        return self.loop.engine


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`; cancels it (which aborts the engine request) and raises ClientGone if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


def engine_error(exc: Exception) -> APIError:
    """The HTTP answer to an engine failure: 503 when retrying may work, 500 when this request broke."""
    if isinstance(exc, EngineStepFailed):
        return unavailable(str(exc))
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), type="server_error", code="generation_failed")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(
    state: ServerState, *, keys: AccessKeys | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """`keys`: bearer keys of the guarded routes (None: all open); `max_body_bytes`: larger bodies get 413."""
    app = FastAPI(title="Alchemist worker", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)  # added last runs first: auth, then size
    if keys is not None:
        app.add_middleware(BearerAuth, keys=keys)
    app.add_middleware(RequestLog)  # outermost: refused requests get an id and an access line too
    install_openapi(app, keys)
    app.state.server = state
    client = AsyncEngine(state.loop)

    def model_card() -> dict[str, Any]:
        return {
            "id": state.engine.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "alchemist",
            "max_model_len": state.engine.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != state.engine.model_name:
            raise model_not_found(name, state.engine.model_name)
        return model_card()

    @app.get("/healthz")
    async def healthz() -> Response:
        problem = state.loop.health_problem()  # a dead loop or an engine failing every iteration
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok"}, status_code=200)

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if (problem := state.loop.health_problem()) is not None:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        reasons = [reason for check in state.readiness_checks if (reason := check())]
        if reasons:
            return JSONResponse({"status": "not ready", "reason": "; ".join(reasons)}, status_code=503)
        return JSONResponse({"status": "ready"}, status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(body, request, chat=True)

    async def generate(
        body: CompletionRequest | ChatCompletionRequest, request: Request, chat: bool
    ) -> Response:
        engine = state.engine
        if state.draining:
            raise unavailable("the server is shutting down and admits no new requests")
        if body.model != engine.model_name:
            raise model_not_found(body.model, engine.model_name)
        meta = ResponseMeta(new_response_id("chatcmpl" if chat else "cmpl"), engine.model_name, chat)
        response_id_var.set(meta.id)  # RequestLog resets it when the request ends
        gen_request = await state.tokenizer_pool.run(  # megabytes of prompt take seconds: not on the loop
            lambda: build_generation_request(
                body,
                engine.tokenizer,
                vocab_size=engine.tokenizer.vocab_size,
                max_model_len=engine.max_model_len,
                response_id=meta.id,
            )
        )
        want_logprobs = gen_request.params.logprobs is not None
        state.metrics.request_arrived(meta.id, gen_request.arrival_time)
        outputs = client.generate(gen_request)
        try:
            first = await _unless_disconnected(request, anext(outputs))
        except ValueError as exc:  # the engine refused it (e.g. longer than its cache can ever hold)
            state.metrics.request_dropped(meta.id)
            raise bad_request(str(exc)) from exc
        except (EngineStepFailed, RequestFailed) as exc:
            state.metrics.request_dropped(meta.id)
            raise engine_error(exc) from exc
        except ClientGone:
            state.metrics.request_dropped(meta.id)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(meta, first, outputs, include_usage, want_logprobs)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            text, last, logprobs = await _unless_disconnected(request, collect(first, outputs))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except (EngineStepFailed, RequestFailed) as exc:
            raise engine_error(exc) from exc
        return JSONResponse(
            full_response(meta, text, last, logprobs if want_logprobs else None, engine.tokenizer)
        )

    async def collect(
        first: RequestOutput, outputs: AsyncIterator[RequestOutput]
    ) -> tuple[str, RequestOutput, list[TokenLogprob]]:
        pieces, logprobs, last = [first.new_text], list(first.new_logprobs), first
        if not first.finished:
            async for out in outputs:
                pieces.append(out.new_text)
                logprobs.extend(out.new_logprobs)
                last = out
        return "".join(pieces), last, logprobs

    async def stream_events(
        meta: ResponseMeta,
        first: RequestOutput,
        outputs: AsyncGenerator[RequestOutput, None],
        include_usage: bool,
        want_logprobs: bool,
    ) -> AsyncIterator[str]:
        offset = 0
        last = first
        try:
            out: RequestOutput | None = first
            while out is not None:
                is_first = out is first
                if is_first or out.finished or out.new_text or out.new_token_ids:
                    yield _sse(
                        stream_chunk(
                            meta,
                            out,
                            first=is_first,
                            logprobs=out.new_logprobs if want_logprobs else None,
                            text_offset=offset,
                            tokenizer=state.engine.tokenizer,
                        )
                    )
                offset += len(out.new_text)
                last = out
                out = None if out.finished else await anext(outputs, None)
            if include_usage:
                yield _sse(usage_chunk(meta, last))
        except Exception as exc:  # headers are sent: report the failure inside the stream
            yield _sse(engine_error(exc).body())
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    return app
