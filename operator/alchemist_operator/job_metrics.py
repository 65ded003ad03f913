"""Prometheus metrics of each job as the operator sees it: versions, rollout phase and decisions, lag.

The workers export what happens inside a pod; only the operator knows the job as a whole: which version is
stable, whether a canary runs, which replicas do not serve what the rollout pointer asks, and the rollout
decisions it took (a `CanaryRolledBack` is counted here, so an alert can fire on it). Gauges are set from the
status the monitor just computed, so they say exactly what `kubectl get clj` says. Only the active operator
replica has jobs; a standby one exports no job series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

PHASES = ("Idle", "Canary", "Held")
# Not "job": Prometheus gives every scraped series a `job` label of its own (the scrape job).
_JOB = ("namespace", "job_name")


def replicas_not_following(status: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Replicas whose loaded version differs from the one the rollout asks of them: name -> (loaded, wanted)."""
    rollout = status.get("rollout")
    loaded = status.get("replicaVersions")
    if not isinstance(rollout, Mapping) or not isinstance(loaded, Mapping):
        return {}
    stable = rollout.get("stableVersion", 0)
    canary = rollout.get("canaryVersion")
    canaries = set(rollout.get("canaryReplicas") or ())
    wanted = {name: canary if canary is not None and name in canaries else stable for name in loaded}
    return {name: (loaded[name], wanted[name]) for name in sorted(loaded) if loaded[name] != wanted[name]}


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stable_version = Gauge(
            "alchemist_job_stable_version", "Version every non-canary replica must serve", _JOB, registry=r
        )
        self.target_version = Gauge(
            "alchemist_job_target_version", "Version the rollout is moving to", _JOB, registry=r
        )
        self.canary_version = Gauge(
            "alchemist_job_canary_version", "Version on the canary replicas (0: no canary)", _JOB, registry=r
        )
        self.rollout_phase = Gauge(
            "alchemist_job_rollout_phase",
            "1 for the job's current rollout phase (Idle, Canary, Held), 0 for the others",
            [*_JOB, "phase"],
            registry=r,
        )
        self.replicas_not_following = Gauge(
            "alchemist_job_replicas_not_following",
            "Live replicas that have not loaded the version the rollout pointer asks of them",
            _JOB,
            registry=r,
        )
        self.ready_replicas = Gauge("alchemist_job_ready_replicas", "Ready worker pods", _JOB, registry=r)
        self.feedback_lag = Gauge(
            "alchemist_job_feedback_lag_entries",
            "Feedback entries the trainers have not acknowledged yet",
            _JOB,
            registry=r,
        )
        self.redis_reachable = Gauge(
            "alchemist_job_redis_reachable",
            "1 when the operator could read the job's Redis",
            _JOB,
            registry=r,
        )
        self.rollout_events = Counter(
            "alchemist_job_rollout_events",
            "Rollout decisions by reason (VersionRolledOut, CanaryStarted, CanaryPromoted, CanaryRolledBack, "
            "CanaryHeld, CanaryAborted, RedisStateLost)",
            [*_JOB, "reason"],
            registry=r,
        )

    def observe_status(self, namespace: str, job: str, status: Mapping[str, Any]) -> None:
        """Sets every gauge from the job's status; keeps the last value of what the status no longer shows."""
        labels = (namespace, job)
        self.ready_replicas.labels(*labels).set(int(status.get("readyReplicas") or 0))
        feedback = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
        if "FeedbackConnected" in feedback:
            self.redis_reachable.labels(*labels).set(1 if feedback["FeedbackConnected"] == "True" else 0)
        rollout = status.get("rollout")
        if not isinstance(rollout, Mapping):
            return
        self.stable_version.labels(*labels).set(int(rollout.get("stableVersion", 0)))
        self.target_version.labels(*labels).set(
            int(status.get("targetVersion", rollout.get("stableVersion", 0)))
        )
        self.canary_version.labels(*labels).set(int(rollout.get("canaryVersion") or 0))
        phase = rollout.get("phase", "Idle")
        for name in PHASES:
            self.rollout_phase.labels(*labels, name).set(1 if name == phase else 0)
        self.replicas_not_following.labels(*labels).set(len(replicas_not_following(status)))
        if "feedbackLag" in status:
            self.feedback_lag.labels(*labels).set(int(status["feedbackLag"]))

    def count_event(self, namespace: str, job: str, reason: str) -> None:
        self.rollout_events.labels(namespace, job, reason).inc()

    def forget(self, namespace: str, job: str) -> None:
        """Drops a deleted job's series (or a job another operator replica now watches)."""
        for metric in (
            self.stable_version,
            self.target_version,
            self.canary_version,
            self.replicas_not_following,
            self.ready_replicas,
            self.feedback_lag,
            self.redis_reachable,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(namespace, job)
        for family, extra in ((self.rollout_phase, PHASES), (self.rollout_events, None)):
            names = extra if extra is not None else self._reasons(namespace, job)
            for name in names:
                with contextlib.suppress(KeyError):
                    family.remove(namespace, job, name)

    def _reasons(self, namespace: str, job: str) -> list[str]:
        return [
            sample.labels["reason"]
            for metric in self.rollout_events.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
            and sample.labels.get("namespace") == namespace
            and sample.labels.get("job_name") == job
        ]
