"""Worker processes of one data-parallel job on this machine: each its own rendezvous port, one Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from alchemist_protocol.local_redis import free_port

from tests.worker.continual.worker_process import WorkerProcess

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
