"""Why worker pods fail, read from their container statuses: one line per failing pod, for the job's status.

Pure. A worker that exits on start (a model path that does not exist, a setting it refuses) leaves its last log
lines as the termination message (the container uses `FallbackToLogsOnError`); a pod that cannot start at all
says why in its waiting reason (a missing Secret or ConfigMap key, an image that cannot be pulled).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Waiting reasons that will not resolve by waiting a little longer.
FAILING_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "RunContainerError",
    }
)
MESSAGE_LIMIT = 300  # characters of a termination message kept; the end says the most


def _last_lines(text: str) -> str:
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= MESSAGE_LIMIT else "..." + text[-MESSAGE_LIMIT:]


def container_problem(status: Mapping[str, Any]) -> str | None:
    """Why the container fails, or None; a ready container is fine whatever happened to it before."""
    if status.get("ready"):
        return None
    state = status.get("state") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
    reason = waiting.get("reason")
    if reason not in FAILING_WAITING_REASONS and not (terminated and terminated.get("exitCode", 0) != 0):
        return None
    parts = [reason or terminated.get("reason") or "Error"]
    if waiting.get("message"):
        parts.append(_last_lines(str(waiting["message"])))
    if terminated.get("exitCode") not in (None, 0):
        detail = f"exit code {terminated['exitCode']}"
        if terminated.get("reason") == "OOMKilled":
            detail += " (OOMKilled: the container used more than its memory limit, spec.resources.memory)"
        if terminated.get("message"):
            detail += f": {_last_lines(str(terminated['message']))}"
        parts.append(detail)
    return ", ".join(parts)


def pod_problems(pods: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """'<pod>: <why>' for every pod with a container that crashes or cannot start, sorted by pod name."""
    problems: list[str] = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        for container in statuses:
            problem = container_problem(container)
            if problem is not None:
                problems.append(f"{name}: {problem}")
                break
    return tuple(sorted(problems))
