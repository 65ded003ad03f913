"""The asyncio face of the engine loop: one async iterator of outputs per request, aborted when abandoned.

If the consumer stops iterating before the request finished (the client disconnected and the response task
was cancelled, or the handler failed), the request is aborted in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput


class AsyncEngine:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Yields each iteration's output for `request` until the finished one; raises what the engine raised."""
        event_loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            # RuntimeError: the event loop is closed, nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                event_loop.call_soon_threadsafe(queue.put_nowait, item)

        self.loop.submit(request, sink)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.loop.abort(request.request_id)
