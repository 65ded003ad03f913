"""How this operator was installed: defaults for jobs, what to watch, and how often to look at Redis."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorConfig:
    worker_image: str = "alchemist/worker:0.1.0"
    default_redis_url: str | None = None  # used by jobs that name no Redis of their own
    # The default Redis's password: the operator connects with it and copies it into a Secret beside each job
    # that uses that Redis. Never printed (repr=False).
    default_redis_password: str | None = field(default=None, repr=False)
    monitor_interval_seconds: float = 10.0  # status and rollout decisions at least this often
    # Children (and the Secrets and volumes a job names) are compared with the spec at least this often, and
    # deleted or hand-edited ones are put back.
    drift_check_seconds: float = 30.0
    redis_timeout_seconds: float = 3.0
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    peering_name: str = "alchemist"
    standalone: bool = False
    priority: int = 0
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"

    def __post_init__(self) -> None:
        if self.monitor_interval_seconds <= 0:
            raise ValueError(f"monitor interval must be positive, got {self.monitor_interval_seconds}")
        if self.drift_check_seconds <= 0:
            raise ValueError(f"drift check interval must be positive, got {self.drift_check_seconds}")
        if not self.worker_image:
            raise ValueError("a worker image is required (--worker-image or ALCHEMIST_WORKER_IMAGE)")

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
