"""Tokenization and chat templating off the event loop, in a small bounded pool of threads.

Encoding a prompt of a few megabytes takes seconds; on the event loop it froze every route, `/healthz`
included. Here it runs on `threads` worker threads. At most `max_waiting` jobs are queued or running at once;
beyond that a request gets 429 at once rather than a place in an ever longer queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from alchemist_worker.api.errors import APIError

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, threads: int = 2, max_waiting: int = 64) -> None:
        if threads < 1 or max_waiting < threads:
            raise ValueError(f"need threads >= 1 and max_waiting >= threads, got {threads} and {max_waiting}")
        self.threads = threads
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tokenizer")
        self.waiting = 0  # touched on the event loop only

    async def run(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on a pool thread; its exceptions (APIError included) are raised here."""
        if self.waiting >= self.max_waiting:
            raise APIError(
                429,
                f"{self.waiting} requests are being tokenized (limit {self.max_waiting}); retry shortly",
                type="rate_limit_error",
                code="tokenizer_busy",
            )
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
