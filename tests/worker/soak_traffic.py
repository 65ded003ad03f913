"""Traffic for the worker's soak test: valid, hostile, feedback through the API and raw stream entries.

Each source is a function run on its own thread with its own seeded `random.Random`, its own httpx client, and
a shared `Ledger` that counts every answer by route and status. Sources are rate-limited by small sleeps, so a
soak of any length sends a bounded number of requests per second (loopback only).
"""

from __future__ import annotations

import json
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from alchemist_protocol.keys import JobKeys

PROMPTS = [
    "The quick brown fox",
    "Online continual learning keeps",
    "Redis streams queue feedback;",
    "def add(a, b):",
    "Kubernetes operators reconcile",
    "user: hello! assistant:",
]
OVERSIZED_BYTES = 96 * 1024  # the soak's worker refuses bodies over 64 KiB
# Routes whose answer needs Redis: while it is unreachable they answer 503 (documented in the OpenAPI document,
# and the application retries), and /readyz reports the stalled duties.
REDIS_BACKED_ROUTES = ("/readyz", "/v1/feedback", "/v1/versions")
OUTAGE_MARGIN_S = 5.0


@dataclass
class Served:
    response_id: str
    finished_at: float  # time.monotonic() when the answer was complete


@dataclass
class Ledger:
    """What every source saw. Thread-safe; `redis_outages` are (start, end) monotonic times (end 0: still down)."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx and in-stream errors, described
    transport_errors: Counter[str] = field(default_factory=Counter)  # route -> connection failures
    wrong_answers: list[str] = field(default_factory=list)  # an answer that breaks its own contract
    served: list[Served] = field(default_factory=list)
    api_feedback: dict[str, str] = field(default_factory=dict)  # idempotency key -> label, once accepted
    raw_entries: dict[str, str] = field(default_factory=dict)  # entry id -> "trained" or "dead"
    redis_outages: list[tuple[float, float]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # a source that died, with its traceback
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, route: str, response: httpx.Response, sent_at: float | None = None) -> None:
        """Counts the answer; a 5xx is a server error unless it is a documented 503 of a route that needs
        Redis, for a request sent during a Redis outage (or just after: the worker reconnects)."""
        allowed = (
            response.status_code == 503
            and route.split(" ")[0] in REDIS_BACKED_ROUTES
            and sent_at is not None
            and self.in_redis_outage(sent_at, margin=OUTAGE_MARGIN_S)
        )
        with self.lock:
            self.statuses[(route, response.status_code)] += 1
            if response.status_code >= 500 and not allowed:
                self.server_errors.append(f"{route} {response.status_code}: {response.text[:300]}")

    def in_redis_outage(self, at: float, margin: float = 0.0) -> bool:
        """Whether `at` falls in a Redis outage (widened by `margin` seconds each side); an open one counts."""
        with self.lock:
            windows = list(self.redis_outages)
        return any(start - margin <= at <= (end if end else float("inf")) + margin for start, end in windows)

    def wrong(self, what: str) -> None:
        with self.lock:
            self.wrong_answers.append(what)

    def guarded(self, source: Callable[..., None], *args: Any) -> Callable[[], None]:
        """`source(*args)` for a thread: an exception is kept (the test fails on it) instead of lost."""

        def run() -> None:
            try:
                source(*args)
            except Exception:
                with self.lock:
                    self.crashes.append(f"{source.__name__}: {traceback.format_exc()}")

        return run

    def summary(self) -> dict[str, int]:
        with self.lock:
            return {f"{route} {status}": n for (route, status), n in sorted(self.statuses.items())}


def _post(http: httpx.Client, ledger: Ledger, route: str, **kwargs: Any) -> httpx.Response | None:
    try:
        response = http.post(route, **kwargs)
    except httpx.TransportError as exc:
        with ledger.lock:
            ledger.transport_errors[f"{route} {type(exc).__name__}"] += 1
        return None
    ledger.record(route, response)
    return response


def valid_traffic(
    http: httpx.Client, model: str, rng: random.Random, stop: threading.Event, ledger: Ledger
) -> None:
    """Completions and chat completions, a third streamed, a third with logprobs; each answer is checked."""
    while not stop.is_set():
        chat, stream, logprobs = rng.random() < 0.5, rng.random() < 0.33, rng.random() < 0.33
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(2, 10), "seed": rng.randrange(1000)}
        body["temperature"] = rng.choice([0.0, 0.7, 1.0])
        prompt = rng.choice(PROMPTS)
        if chat:
            route = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt}]
            if logprobs:
                body |= {"logprobs": True, "top_logprobs": 2}
        else:
            route = "/v1/completions"
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = 2
        roll = rng.random()
        if roll < 0.05:  # a client that leaves after the first chunk: the engine aborts it, frees its blocks
            _abandon_stream(http, route, {**body, "max_tokens": 40}, ledger)
        elif roll < 0.1:
            _score(http, prompt, ledger)
        elif stream:
            _stream(http, route, body, ledger)
        else:
            response = _post(http, ledger, route, json=body)
            if response is not None and response.status_code == 200:
                choice = response.json()["choices"][0]
                if logprobs and not choice["logprobs"]:
                    ledger.wrong(f"{route}: logprobs asked for, none returned")
                with ledger.lock:
                    ledger.served.append(Served(response.json()["id"], time.monotonic()))
            elif response is not None:
                ledger.wrong(
                    f"{route} answered a valid request with {response.status_code}: {response.text[:200]}"
                )
        time.sleep(rng.uniform(0.05, 0.25))


def _abandon_stream(http: httpx.Client, route: str, body: dict[str, Any], ledger: Ledger) -> None:
    try:
        with http.stream("POST", route, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
            ledger.record(route + " (abandoned stream)", response)
            next(response.iter_lines(), None)
    except httpx.TransportError as exc:
        with ledger.lock:
            ledger.transport_errors[f"{route} abandoned stream {type(exc).__name__}"] += 1


def _score(http: httpx.Client, prompt: str, ledger: Ledger) -> None:
    response = _post(http, ledger, "/v1/score", json={"prompt": prompt, "continuation": " and the end."})
    if response is None:
        return
    if response.status_code != 200 or not response.json()["logprob"] < 0:
        ledger.wrong(f"/v1/score answered {response.status_code}: {response.text[:200]}")


def _stream(http: httpx.Client, route: str, body: dict[str, Any], ledger: Ledger) -> None:
    events: list[dict[str, Any]] = []
    done = False
    try:
        with http.stream("POST", route, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                ledger.record(route + " (stream)", response)
                return ledger.wrong(f"{route} stream answered {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    except httpx.TransportError as exc:
        with ledger.lock:
            ledger.transport_errors[f"{route} stream {type(exc).__name__}"] += 1
        return
    with ledger.lock:
        ledger.statuses[(route + " (stream)", 200)] += 1
    errors = [e for e in events if "error" in e]
    if errors:  # headers were sent with 200: a failure shows inside the stream
        with ledger.lock:
            ledger.server_errors.append(f"{route} in-stream error: {errors[0]}")
        return
    if not done or not events or events[-1]["choices"][0]["finish_reason"] is None:
        return ledger.wrong(f"{route} stream ended without a finish reason and [DONE]")
    if body.get("logprobs") and not any(e["choices"][0].get("logprobs") for e in events):
        ledger.wrong(f"{route} stream: logprobs asked for, none returned")
    with ledger.lock:
        ledger.served.append(Served(events[0]["id"], time.monotonic()))


@dataclass(frozen=True)
class Hostile:
    route: str
    body: Any  # bytes, or a dict sent as JSON
    chunked: bool = False  # sent without a length, in two pieces

    def kwargs(self) -> dict[str, Any]:
        if isinstance(self.body, dict):
            return {"json": self.body}
        content = iter([self.body[:40_000], self.body[40_000:]]) if self.chunked else self.body
        return {"content": content, "headers": {"content-type": "application/json"}}

    @property
    def oversized(self) -> bool:
        return isinstance(self.body, bytes) and len(self.body) > OVERSIZED_BYTES


def _with_escape(body: dict[str, Any], escape: str) -> bytes:
    """`body` as JSON with each "@" replaced by `escape`, verbatim: JSON escapes (a lone surrogate) that no
    JSON encoder writes from a Python string."""
    return json.dumps(body).replace("@", escape).encode()


def hostile_requests(model: str) -> list[Hostile]:
    """Requests that must each be refused with a 4xx."""
    surrogate_prompt = _with_escape({"model": model, "prompt": "a @ b", "max_tokens": 2}, "\\ud800")
    chat = {"model": model, "messages": [{"role": "user", "content": "@"}], "max_tokens": 2}
    surrogate_chat = _with_escape(chat, "\\udfff")
    surrogate_stop = _with_escape({"model": model, "prompt": "hi", "stop": ["@"], "max_tokens": 2}, "\\ud83d")
    big = b'{"model": "%s", "prompt": "' % model.encode() + b"a" * OVERSIZED_BYTES + b'"}'
    completion = {"model": model, "prompt": "hi", "max_tokens": 2}
    return [
        Hostile("/v1/completions", b'{"model": "x", "prompt": '),
        Hostile("/v1/chat/completions", b"\xff\xfe not json"),
        Hostile("/v1/completions", {**completion, "seed": 2**64}),
        Hostile("/v1/completions", {**completion, "top_k": 10**12, "top_p": 0.5}),
        Hostile("/v1/completions", {**completion, "temperature": -1}),
        Hostile("/v1/completions", {**completion, "max_tokens": 10**9}),
        Hostile("/v1/chat/completions", {"model": "no-such-model", "messages": [], "max_tokens": 2}),
        Hostile("/v1/completions", surrogate_prompt),
        Hostile("/v1/chat/completions", surrogate_chat),
        Hostile("/v1/completions", surrogate_stop),
        Hostile("/v1/completions", big),
        Hostile("/v1/completions", big, chunked=True),
        Hostile("/v1/feedback", {"response_id": "cmpl-never-served", "label": "positive"}),
        Hostile("/v1/feedback", {"response_id": "cmpl-x", "label": "maybe"}),
        Hostile("/v1/feedback", {"response_id": "cmpl-x", "label": "correction"}),
        Hostile("/v1/feedback", b"[1, 2"),
    ]


def hostile_traffic(
    http: httpx.Client, model: str, rng: random.Random, stop: threading.Event, ledger: Ledger
) -> None:
    requests = hostile_requests(model)
    while not stop.is_set():
        hostile = rng.choice(requests)
        route = hostile.route
        sent_at = time.monotonic()
        try:
            response = http.post(route, **hostile.kwargs())
        except httpx.TransportError as exc:
            # The server may answer 413 and close while an oversized body is still being sent.
            what = "oversized body cut off" if hostile.oversized else type(exc).__name__
            with ledger.lock:
                ledger.transport_errors[f"{route} hostile: {what}"] += 1
            continue
        # An unknown id's feedback is a 404 only once Redis can say so; while it is down, a 503.
        outage = route == "/v1/feedback" and ledger.in_redis_outage(sent_at, margin=OUTAGE_MARGIN_S)
        ledger.record(route + " (hostile)", response, sent_at)
        if not 400 <= response.status_code < 500 and not (outage and response.status_code == 503):
            ledger.wrong(f"hostile {route} {str(hostile.body)[:120]} got {response.status_code}")
        time.sleep(rng.uniform(0.05, 0.2))


def api_feedback(http: httpx.Client, rng: random.Random, stop: threading.Event, ledger: Ledger) -> None:
    """Positive, negative and correction feedback on served ids, each under an idempotency key; a 503 (Redis
    down) or 429 is retried later under the same key, as an application would, so none is given up."""
    retry: list[tuple[str, dict[str, Any]]] = []
    accepted: dict[str, dict[str, Any]] = {}
    n = 0
    while not stop.is_set():
        roll = rng.random()
        if retry and roll < 0.5:
            key, body = retry.pop(0)
        elif accepted and roll > 0.9:  # a retry of an accepted one: 200 and the same entry, or a conflict
            key = rng.choice(sorted(accepted))
            _repeat(http, key, accepted[key], conflicting=roll > 0.97, ledger=ledger)
            continue
        else:
            with ledger.lock:  # responses finished during a Redis outage have no record: skip them
                served = list(ledger.served[-50:])
            # A request record is written just after the answer; one near an outage may have been dropped.
            candidates = [s for s in served if not ledger.in_redis_outage(s.finished_at, margin=1.0)]
            if not candidates:
                time.sleep(0.1)
                continue
            target = rng.choice(candidates)
            label = rng.choice(["positive", "negative", "correction"])
            key = f"soak-{n}"
            n += 1
            body = {"response_id": target.response_id, "label": label, "idempotency_key": key}
            if label == "correction":
                body["correction"] = rng.choice(["Paris.", "It reconciles resources.", "42"])
        sent_at = time.monotonic()
        try:
            response = http.post("/v1/feedback", json=body)
        except httpx.TransportError:
            retry.append((key, body))
            continue
        ledger.record("/v1/feedback", response, sent_at)
        if response.status_code in (200, 202):
            accepted[key] = body
            with ledger.lock:
                ledger.api_feedback[key] = body["label"]
        elif response.status_code in (429, 503):
            retry.append((key, body))
        else:
            ledger.wrong(f"feedback {body} got {response.status_code}: {response.text[:200]}")
        time.sleep(rng.uniform(0.1, 0.3))


def _repeat(http: httpx.Client, key: str, body: dict[str, Any], conflicting: bool, ledger: Ledger) -> None:
    """The same feedback again under its key (200, `duplicate`), or other feedback under it (409)."""
    if conflicting:
        body = {
            **body,
            "label": "negative" if body["label"] != "negative" else "positive",
            "correction": None,
        }
    sent_at = time.monotonic()
    try:
        response = http.post("/v1/feedback", json=body)
    except httpx.TransportError as exc:
        with ledger.lock:
            ledger.transport_errors[f"/v1/feedback repeat {type(exc).__name__}"] += 1
        return
    outage = ledger.in_redis_outage(sent_at, margin=OUTAGE_MARGIN_S) and response.status_code == 503
    ledger.record("/v1/feedback (repeat)", response, sent_at)
    expected = 409 if conflicting else 200
    if response.status_code != expected and not outage:
        ledger.wrong(
            f"feedback repeated under {key} got {response.status_code}, not {expected}: {response.text}"
        )
    elif not conflicting and not outage and response.json().get("duplicate") is not True:
        ledger.wrong(f"feedback repeated under {key} was queued again: {response.text}")
    time.sleep(0.1)


def raw_entries(
    raw: redis.Redis, keys: JobKeys, rng: random.Random, stop: threading.Event, ledger: Ledger
) -> None:
    """Entries an application might XADD itself: valid ones for served ids (trained), and ones that must be
    dead-lettered: not UTF-8, a field missing, an unknown request id, a bad label."""
    while not stop.is_set():
        with ledger.lock:
            recent = list(ledger.served[-50:])
        # Only answers whose request record is surely written: a second old, and not near a Redis outage (the
        # consumer reads an entry at once and, unlike POST /v1/feedback, does not wait for the record).
        now = time.monotonic()
        served = [
            s.response_id
            for s in recent
            if s.finished_at < now - 1.0 and not ledger.in_redis_outage(s.finished_at, margin=1.0)
        ]
        kind = rng.choice(["valid", "valid", "not_utf8", "not_utf8_name", "missing", "unknown", "label"])
        if kind == "valid" and not served:
            kind = "missing"
        fields: dict[bytes, bytes] = {
            "valid": {b"request_id": rng.choice(served or ["?"]).encode(), b"label": b"positive"},
            "not_utf8": {b"request_id": b"cmpl-\xff\xfe", b"label": b"positive"},
            "not_utf8_name": {b"request_id\xc3": b"cmpl-1", b"label": b"negative"},
            "missing": {b"label": b"positive"},
            "unknown": {b"request_id": b"cmpl-unknown-%d" % rng.randrange(10**6), b"label": b"positive"},
            "label": {b"request_id": b"cmpl-1", b"label": b"meh \xe2\x9c\x93"},
        }[kind]
        try:
            entry_id = raw.xadd(keys.feedback, fields)
        except redis.RedisError:
            time.sleep(0.2)  # Redis is down: an application would retry later; nothing was written
            continue
        with ledger.lock:
            ledger.raw_entries[entry_id.decode()] = "trained" if kind == "valid" else "dead"
        time.sleep(rng.uniform(0.2, 0.5))


def monitor(http: httpx.Client, rng: random.Random, stop: threading.Event, ledger: Ledger) -> None:
    """Health, readiness, metrics, versions and models: 5xx nowhere, except a Redis-backed route's 503 during a
    Redis outage."""
    routes = ["/healthz", "/readyz", "/metrics", "/v1/versions", "/v1/models", "/v1/models/nope"]
    while not stop.is_set():
        route = rng.choice(routes)
        sent_at = time.monotonic()
        try:
            response = http.get(route)
        except httpx.TransportError as exc:
            with ledger.lock:
                ledger.transport_errors[f"{route} {type(exc).__name__}"] += 1
            continue
        ledger.record(route, response, sent_at)
        time.sleep(rng.uniform(0.1, 0.4))
