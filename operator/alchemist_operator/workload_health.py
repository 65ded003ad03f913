"""What keeps a job's pods from running, beyond a crashing container (pod_health.py): pods the scheduler cannot
place, claims that do not bind, and models still being fetched. One line per pod or claim, for the job's
conditions and Events.

Pure: the monitor lists the job's pods and claims and passes them in.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alchemist_operator.model_source import MODEL_FETCH_CONTAINER

# A claim may be Pending for a while on its way to binding (a provisioner at work); past this it is reported.
CLAIM_PENDING_GRACE_S = 60.0


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


def _age_s(obj: Mapping[str, Any], now: datetime.datetime) -> float | None:
    created = (obj.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return None
    when = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    return (now - when).total_seconds()


def unschedulable_pods(pods: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """'<pod>: Unschedulable: <the scheduler's words>' for each pod the scheduler could not place."""
    lines = []
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                lines.append(f"{_name(pod)}: Unschedulable: {condition.get('message') or 'no node fits'}")
    return tuple(sorted(lines))


def unbound_claims(claims: Iterable[Mapping[str, Any]], now: datetime.datetime) -> tuple[str, ...]:
    """Claims of the job Pending past the grace period, with what they ask for and what usually fixes it."""
    lines = []
    for claim in claims:
        if (claim.get("status") or {}).get("phase") != "Pending":
            continue
        age = _age_s(claim, now)
        if age is not None and age < CLAIM_PENDING_GRACE_S:
            continue
        spec = claim.get("spec") or {}
        modes = ",".join(spec.get("accessModes") or []) or "?"
        storage_class = spec.get("storageClassName") or "the default StorageClass"
        hint = ""
        if "ReadWriteMany" in modes:
            hint = (
                "; most classes cannot bind ReadWriteMany: use spec.versions.storage PerReplica (the default) "
                "or S3, or a class that supports it"
            )
        created = (claim.get("metadata") or {}).get("creationTimestamp")
        elapsed = f" since {created}" if created else ""  # a fixed time, so the line stays the same each look
        lines.append(
            f"claim {_name(claim)} ({modes}, {storage_class}) is Pending{elapsed}: no volume was bound to it; "
            f"check that the StorageClass exists and can provision{hint}"
        )
    return tuple(sorted(lines))


@dataclass(frozen=True)
class ModelFetch:
    fetching: tuple[str, ...] = ()  # '<pod>: fetching the model since <time>'
    failed: tuple[str, ...] = ()  # '<pod>: exit code 1: <the fetcher's last lines>'


def model_fetch(pods: Iterable[Mapping[str, Any]]) -> ModelFetch:
    """Pods whose model-fetch init container is running, or has failed (its termination message says why)."""
    fetching, failed = [], []
    for pod in pods:
        for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if status.get("name") != MODEL_FETCH_CONTAINER:
                continue
            state = status.get("state") or {}
            last = (status.get("lastState") or {}).get("terminated") or {}
            running = state.get("running")
            terminated = state.get("terminated") or {}
            if running is not None:
                started = running.get("startedAt")
                since = f" since {started}" if started else ""
                retry = f" (attempt {int(status.get('restartCount') or 0) + 1})" if last else ""
                fetching.append(f"{_name(pod)}: fetching the model{since}{retry}")
            elif (terminated and terminated.get("exitCode", 0) != 0) or (state.get("waiting") and last):
                end = terminated or last
                message = " ".join(str(end.get("message") or "").split())[-300:]
                failed.append(
                    f"{_name(pod)}: model fetch exit code {end.get('exitCode')}: {message}".rstrip(": ")
                )
    return ModelFetch(tuple(sorted(fetching)), tuple(sorted(failed)))
