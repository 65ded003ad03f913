"""Worker processes of one data-parallel job on this machine: each its own rendezvous port, one Redis; what the
tests do to them through their API (serve, give feedback) and what they read back (group status, holdings)."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import httpx
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import FEEDBACK_GROUP, JobKeys
from alchemist_protocol.local_redis import free_port

from tests.worker.continual.conftest import wait_until
from tests.worker.continual.worker_process import WorkerProcess

KEYS = JobKeys("ns", "job")
PROMPTS = ["hello there", "def add(a, b):", "the quick brown fox", "once upon a time", "print(1)", "a b c d"]

# Short timeouts so a dead member costs seconds; the claim idle time must exceed round timeout + member TTL.
GROUP_ENV = {
    "ALCHEMIST_DATA_PARALLEL": "1",
    "ALCHEMIST_DP_ADDRESS": "127.0.0.1",
    "ALCHEMIST_DP_ROUND_TIMEOUT_SECONDS": "4",
    "ALCHEMIST_DP_MEMBER_TTL_SECONDS": "1.5",
    "ALCHEMIST_DP_POLL_SECONDS": "0.05",
    "ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS": "6000",
    "ALCHEMIST_TRAINER_LEASE_SECONDS": "1.5",
    "GLOO_SOCKET_IFNAME": "lo",
}

# The training settings of the tests that compare versions with one trainer. A round starts once the oldest
# sample waited 1.5 s (fewer than 8 wait): each batch of feedback a test gives is then one round. SGD: Adam
# divides by the gradient's magnitude, so fp32 noise in gradients near zero becomes whole learning-rate steps;
# SGD keeps the comparison with one trainer as tight as fp32 allows.
ROUND_PER_BATCH_SGD = {
    "ALCHEMIST_TRAINING_MIN_BATCH_SIZE": "8",
    "ALCHEMIST_TRAINING_MAX_WAIT_SECONDS": "1.5",
    "ALCHEMIST_TRAINING_OPTIMIZER": "sgd",
    "ALCHEMIST_TRAINING_LEARNING_RATE": "0.05",
}


def group_worker(
    model: Path, redis_url: str, versions: Path, logs: Path, replica: str, **env: str
) -> WorkerProcess:
    return WorkerProcess(
        model,
        redis_url,
        versions,
        logs / f"{replica}.log",
        ALCHEMIST_REPLICA=replica,
        ALCHEMIST_DP_PORT=str(free_port()),
        **{**GROUP_ENV, **env},
    )


def group_status(worker: WorkerProcess) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(worker.base_url + "/v1/versions", timeout=10).json()["worker"]
    return dict(status.get("data_parallel") or {})


def of_rank(workers: list[WorkerProcess], rank: int) -> WorkerProcess:
    """The member of the current generation with this rank (0: the leader)."""
    return next(w for w in workers if group_status(w).get("rank") == rank)


def start_all(workers: list[WorkerProcess]) -> None:
    """Starts the processes together (their model loads overlap), then waits for each."""
    threads = [threading.Thread(target=w.start) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        assert worker.process is not None and worker.process.poll() is None


def wait_members(world: int, among: list[WorkerProcess], timeout: float = 60) -> None:
    wait_until(
        lambda: all(group_status(w).get("world_size") == world for w in among), timeout, f"{world} members"
    )


def serve(worker: WorkerProcess, model: str, n: int) -> str:
    body = {"model": model, "prompt": PROMPTS[n % len(PROMPTS)] + f" {n}", "max_tokens": 4 + n % 3}
    response = httpx.post(worker.base_url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def accept(worker: WorkerProcess, response_id: str) -> None:
    body = {"response_id": response_id, "label": "accept", "idempotency_key": f"fb-{response_id}"}
    response = httpx.post(worker.base_url + "/v1/feedback", json=body, timeout=30)
    assert response.status_code == 202, response.text


def wait_record(store: JobStore, response_id: str) -> None:
    wait_until(lambda: store.get_request(response_id) is not None, 10, "the request record")


class FeedbackSender:
    """Requests served by chosen members, each accepted through one member's API (routing to the member that
    served it is the group's job); remembers every feedback id sent."""

    def __init__(self, store: JobStore, model: str) -> None:
        self.store = store
        self.model = model
        self.sent: set[str] = set()
        self._counter = itertools.count()

    def on(self, servers: list[WorkerProcess], via: WorkerProcess) -> set[str]:
        served = [serve(w, self.model, next(self._counter)) for w in servers]
        for response_id in served:
            wait_record(self.store, response_id)
            accept(via, response_id)
        ids = {f"fb-{rid}" for rid in served}
        self.sent.update(ids)
        return ids


def wait_serving(workers: list[WorkerProcess], version: int) -> None:
    wait_until(
        lambda: all(w.status()["serving_version"] == version for w in workers), 30, f"serving {version}"
    )


def held_by(client: redis.Redis, worker: WorkerProcess) -> int:
    """Feedback entries pending under the worker's consumer name."""
    consumers = client.xinfo_consumers(KEYS.feedback, FEEDBACK_GROUP)
    name = worker.env["ALCHEMIST_REPLICA"]
    return sum(int(c["pending"]) for c in consumers if c["name"] in (name, name.encode()))


def pending_entries(client: redis.Redis) -> int:
    """Feedback entries not acknowledged yet, whoever holds them."""
    return int(client.xpending(KEYS.feedback, FEEDBACK_GROUP)["pending"])
