"""Writes every answered request's tokens, replica and weight version to Redis, with a TTL.

Feedback may reach any replica, hours later; with this record any of them can rebuild the training sample
(recomputing the prefill when the recording is gone or was never made). It observes finished requests on the
engine thread and hands them to a writer thread, so a slow or absent Redis never stalls an iteration: when
the queue is full or a write fails the record is dropped and counted. Aborted requests are not written (the
client never received an answer to give feedback on).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from alchemist_protocol.job_store import JobStore
from alchemist_protocol.schemas import RequestRecord
from alchemist_worker.engine.sequence import FinishReason
from alchemist_worker.engine.serving_engine import FinishedRequest

log = logging.getLogger(__name__)


class RedisRequestRecords:
    def __init__(
        self,
        store: JobStore,
        *,
        replica: str,
        model: str,
        ttl_s: int,
        max_pending: int = 10_000,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"the request record TTL must be at least 1 s, got {ttl_s}")
        self.store = store
        self.replica = replica
        self.model = model
        self.ttl_s = ttl_s
        self.on_failure = on_failure
        self._queue: queue.Queue[RequestRecord | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0

    def __call__(self, request: FinishedRequest) -> None:
        if request.finish_reason is FinishReason.ABORT:
            return
        record = RequestRecord(
            request_id=request.request_id,
            prompt_tokens=request.prompt_token_ids,
            response_tokens=request.output_token_ids,
            replica=self.replica,
            version=request.weight_version,
            model=self.model,
            recorded=request.recorded,
        )
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._failed(f"queue full, dropping the record of {request.request_id}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="request-records", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Writes what is queued (within `timeout`), then stops."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self.store.put_request(record, self.ttl_s)
                self.written += 1
            except Exception as exc:  # Redis down or unreachable: serving goes on without the record
                self._failed(f"cannot write the record of {record.request_id}: {exc}")

    def _failed(self, message: str) -> None:
        self.dropped += 1
        log.warning("request record: %s", message)
        if self.on_failure is not None:
            self.on_failure()
