"""The one narrow interface through which the HTTP API, the recording hooks and the trainer use an engine.

Anything that implements `ServingEngine` can serve: the native engine (`LLMEngine`) today, a vLLM-backed one
later. The interface is synchronous and single-threaded by design: one owner thread calls `step()` in a loop
(see `engine_loop.py`), and the runtime that composes serving with training runs its training slices between
two `step()` calls, when no forward pass is in flight.

Weight switches (for the trainer authors). `request_weight_switch(switch)` only queues the switch. The engine
applies it between iterations, never during one, and only once every in-flight request has finished: while a
switch is pending, new requests wait in the queue (they are not rejected), requests already started keep
decoding on the weights they started with, and when the last one finishes the engine calls `switch.apply()`,
sets `weight_version`, and admits the waiting requests on the new weights. So each response, and the
recording made at its prefill, belongs to exactly one version, which is what the request record in Redis and
the trainer's staleness check assume. The price is a pause in admission as long as the longest running
request's remaining decode (bounded by max_tokens); `EngineStats.switch_pending_s` shows it. Double-buffered
adapters make `apply()` a pointer swap, so the switch itself costs nothing. If that pause proves too long,
per-sequence adapter slots (both versions live in one batch) can replace it behind the same method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.sequence import FinishReason, TokenLogprob


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the API hands it over: already tokenized, with validated sampling parameters.

    `request_id` is the response id the API returns to the client; records and the Redis request record are
    keyed by it. `record`: None samples by the configured rate, True asks for recording (opt-in), False forbids
    it (opt-out).
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    record: bool | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class RequestFailed(RuntimeError):
    """This request's own computation failed (the others in its batch went on); sending it again would fail
    again, so it is not retriable. The API answers it with a 500 that names the cause."""


class EngineStepFailed(RuntimeError):
    """An iteration failed and no request in it could be blamed: the engine itself may be broken. Retriable
    (here once the engine recovers, or on another replica); the API answers it with a 503."""


@dataclass
class RequestOutput:
    """What one iteration produced for one request: only the new part (deltas), plus totals.

    `error` is set on the last output of a request that failed (finished, reason abort): the engine loop hands
    the error, not the output, to the request's caller.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    weight_version: int | None
    recorded: bool
    error: Exception | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """A request's full token history once it is done; what recomputation needs later."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    weight_version: int
    recorded: bool
    finish_reason: FinishReason


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prompt_tokens_total: int
    generated_tokens_total: int
    weight_version: int
    switch_pending_s: float
    recorded_requests_total: int
    recorded_bytes_by_tier: dict[str, int]
    records_evicted_total: int


@dataclass(frozen=True)
class WeightSwitch:
    """A new set of weights (or adapter) to switch to. `apply` runs on the engine's thread between iterations."""

    version: int
    apply: Callable[[], None]


class FinishedRequestObserver(Protocol):
    """Called on the engine's thread for every request that ends (finished or aborted); must not block."""

    def __call__(self, request: FinishedRequest) -> None: ...


class PromptTokenizer(Protocol):
    """What the API needs from a tokenizer: the engine decodes, the API encodes and applies the chat template."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


@runtime_checkable
class ServingEngine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) in tokens."""
        ...

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    def add_request(self, request: GenerationRequest) -> None:
        """Queues a request. Raises ValueError for one that can never run (too long for the model or cache)."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancels a request; its blocks are freed now and `step()` reports it finished with reason abort."""
        ...

    def step(self) -> list[RequestOutput]:
        """Runs one iteration (a prefill batch or a decode step) and returns what changed.

        A failure that belongs to some requests fails only those (outputs with `error` set); `step` raises only
        when the iteration as a whole could not run, and the loop then fails every request in flight."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def add_finished_observer(self, observer: FinishedRequestObserver) -> None:
        """The recording hook: e.g. writes every finished request's tokens, replica and version to Redis."""
        ...

    def request_weight_switch(self, switch: WeightSwitch) -> None:
        """Queues a weight switch, applied between iterations once in-flight requests finish (see above)."""
        ...
