"""`alchemist status`: one screen on a job, from the Kubernetes API and Redis, as rich tables.

Each table is built by a function of the two views alone, so the report is testable without a terminal. Where a
view is missing (no cluster access, Redis unreachable) its tables say so and the others are still shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from alchemist_cli.kube_view import KubeView
from alchemist_cli.redis_view import RedisView


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def rate(positive: int, total: int) -> str:
    return f"{positive}/{total} ({positive / total:.0%})" if total else "0"


def version_roles(view: RedisView) -> dict[int, list[str]]:
    """What each version is to the rollout: stable, canary, rejected, held by the evaluation gate, rollback target."""
    roles: dict[int, list[str]] = {}
    pointer, progress = view.pointer, view.progress
    if pointer is not None:
        roles.setdefault(pointer.stable_version, []).append("stable")
        if pointer.canary_version is not None:
            roles.setdefault(pointer.canary_version, []).append("canary")
    for version in progress.rejected_versions:
        roles.setdefault(version, []).append("rejected")
    for info in view.versions:
        if getattr(info, "held", False):
            roles.setdefault(info.version, []).append("held")
    if view.rollback is not None:
        roles.setdefault(view.rollback.version, []).append("rollback target")
    return roles


def _evaluation(info: Any) -> str:
    reading = getattr(info, "evaluation", None)
    if reading is None:
        return ""
    scores = reading.scores
    shown = [reading.decision.value]
    if scores.perplexity is not None:
        shown.append(f"ppl {scores.perplexity:.2f}")
    if scores.reference_nll is not None:
        shown.append(f"nll {scores.reference_nll:.3f}")
    return " ".join(shown)


def versions_table(view: RedisView) -> Table:
    table = Table(title=f"Versions ({len(view.published)} published, newest first)", title_justify="left")
    for column in ("version", "parent", "role", "samples", "loss", "reused", "recomputed", "feedback"):
        table.add_column(column, justify="right" if column not in ("role",) else "left")
    table.add_column("evaluation")
    table.add_column("age", justify="right")
    table.add_column("trained by")
    roles = version_roles(view)
    for info in view.versions:
        counts = view.feedback.get(info.version, {})
        training = info.training or {}
        table.add_row(
            str(info.version),
            str(info.parent),
            ", ".join(roles.get(info.version, [])),
            str(info.samples),
            "" if info.loss is None else f"{info.loss:.4f}",
            str(training.get("reused", "")),
            str(training.get("recomputed", "")),
            rate(counts.get("positive", 0), sum(counts.values())),
            _evaluation(info),
            ago(view.now - info.created_at),
            info.trained_by,
        )
    base = view.feedback.get(0, {})
    if len(view.versions) == len(view.published):  # the whole lineage is shown: its root too
        table.add_row("0", "", ", ".join(roles.get(0, [])) or "base model", "", "", "", "",
                      rate(base.get("positive", 0), sum(base.values())), "", "", "")  # fmt: skip
    return table


def gate_readings(status: Mapping[str, Any], view: RedisView | None) -> list[str]:
    """The canary gate's readings: as the operator wrote them in the status, else counted from Redis."""
    block = status.get("rollout") or {}
    if "canaryFeedback" in block:
        lines = []
        for side in ("canary", "stable"):
            acceptance = block.get(f"{side}Acceptance")
            shown = "n/a" if acceptance is None else f"{acceptance:.1%}"
            lines.append(
                f"{side}: {shown} accepted of {block.get(f'{side}Feedback', 0)} since the canary began"
            )
        return lines
    if view is None or view.pointer is None or view.pointer.canary_version is None:
        return []
    lines = []
    for side, version, baseline in (
        ("canary", view.pointer.canary_version, view.progress.canary_baseline),
        ("stable", view.pointer.stable_version, view.progress.stable_baseline),
    ):
        counts = view.feedback.get(version, {})
        positive = max(0, counts.get("positive", 0) - baseline.positive)
        total = max(0, sum(counts.values()) - baseline.total)
        lines.append(f"{side} v{version}: {rate(positive, total)} accepted since the canary began")
    return lines


def rollout_table(kube: KubeView, view: RedisView | None) -> Table:
    table = Table(title="Rollout", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    status, spec = kube.status, kube.spec
    block = status.get("rollout") or {}
    strategy = block.get("strategy") or (spec.get("rollout") or {}).get("strategy")
    if strategy:
        table.add_row("strategy", str(strategy))
    if view is not None and view.pointer is not None:
        pointer, progress = view.pointer, view.progress
        table.add_row("phase", progress.phase)
        table.add_row("stable version", str(pointer.stable_version))
        if pointer.canary_version is not None:
            table.add_row(
                "canary", f"version {pointer.canary_version} on {', '.join(pointer.canary_replicas)}"
            )
            if progress.started_at is not None:
                table.add_row("canary started", ago(view.now - progress.started_at) + " ago")
        if progress.rejected_versions:
            table.add_row("rejected", ", ".join(map(str, progress.rejected_versions)))
        if progress.message:
            table.add_row("last decision", progress.message)
    elif view is not None:
        table.add_row("phase", "no operator manages the pointer: replicas follow the newest version")
    elif block:
        table.add_row("phase", f"{block.get('phase')} (from the job's status; Redis not read)")
        table.add_row("stable version", str(block.get("stableVersion")))
    if "targetVersion" in status:
        table.add_row("target version", str(status["targetVersion"]))
    for line in gate_readings(status, view):
        table.add_row("gate", line)
    if view is not None and view.rollback is not None:
        request = view.rollback
        table.add_row(
            "rollback request",
            f"to version {request.version} (honoured until a version above {request.superseded_up_to} is "
            f"published){': ' + request.reason if request.reason else ''}",
        )
    return table


def feedback_table(view: RedisView) -> Table:
    table = Table(title="Feedback", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("in the stream", str(view.stream_length))
    lag = f"{view.lag.entries} entries not yet trained"
    if view.lag.entries:
        lag += f", oldest {ago(view.lag.seconds)}"
    table.add_row("lag", lag)
    table.add_row("dead letters", str(view.dead.total))
    for reason, count in view.dead.by_reason[:8]:
        table.add_row(f"  x{count}", reason)
    for letter in view.dead.latest[:3]:
        table.add_row("  latest", f"{letter.entry_id} {letter.request_id or '-'}: {letter.reason}")
    return table


def replicas_table(kube: KubeView, view: RedisView | None) -> Table:
    table = Table(title="Replicas", title_justify="left")
    group = view.group if view is not None else None
    if view is not None and (group is not None or view.trainer):
        caption = f"trainer lease: {view.trainer or 'nobody'}"
        if group is not None:
            caption += f"; training group generation {group.generation}, {group.world_size} members"
        table.caption, table.caption_justify = caption, "left"
    for column in ("replica", "serves", "wanted", "ready", "heartbeat", "lag", "pod", "restarts", "problem"):
        table.add_column(column)
    if group is not None:
        table.add_column("rank")
    states = {r.replica: r for r in (view.replicas if view is not None else ())}
    pods = {p.name: p for p in kube.pods}
    reported = kube.status.get("replicaVersions") or {}
    for name in sorted({*states, *pods, *reported}):
        state, pod = states.get(name), pods.get(name)
        wanted = ""
        if view is not None and view.pointer is not None:
            wanted = str(view.pointer.version_for(name))
        serves = str(state.loaded_version) if state else str(reported.get(name, "-"))
        behind = bool(wanted) and serves != wanted
        rank = [] if group is None else [str(group.rank_of(name)) if name in group.members else ""]
        table.add_row(
            name,
            Text(serves, style="bold red" if behind else ""),
            wanted,
            "" if state is None else ("yes" if state.ready else "no"),
            "" if state is None or view is None else ago(view.now - state.heartbeat_at) + " ago",
            "" if state is None else str(state.feedback_lag),
            "" if pod is None else f"{pod.phase}{'' if pod.ready else ' (not ready)'}",
            "" if pod is None else str(pod.restarts),
            state.commit_error if state else ("no heartbeat" if pod else ""),
            *rank,
        )
    return table


def conditions_table(kube: KubeView) -> Table:
    table = Table(title="Conditions", title_justify="left")
    for column in ("type", "status", "reason", "message"):
        table.add_column(column)
    for condition in kube.status.get("conditions") or ():
        ok = condition.get("status") == "True"
        if condition.get("type") == "RolloutProgressing":
            ok = True  # True or False, both are normal
        table.add_row(
            condition.get("type", ""),
            Text(str(condition.get("status", "")), style="" if ok else "yellow"),
            condition.get("reason", ""),
            condition.get("message", ""),
        )
    return table


def headline(namespace: str, name: str, kube: KubeView, view: RedisView | None) -> Text:
    status = kube.status
    line = Text(f"{namespace}/{name}", style="bold")
    if kube.job is not None:
        line.append(
            f"  phase {status.get('phase', 'Unknown')}, {status.get('readyReplicas', 0)}/"
            f"{kube.spec.get('replicas', status.get('replicas', 0))} replicas ready"
        )
    if view is not None and view.published:
        line.append(f", newest version {view.published[-1]}")
    return line


def status_report(
    namespace: str, name: str, kube: KubeView, view: RedisView | None, redis_error: str = ""
) -> RenderableType:
    parts: list[RenderableType] = [headline(namespace, name, kube, view)]
    if kube.error:
        parts.append(Text(f"Kubernetes: {kube.error}", style="yellow"))
    if redis_error:
        parts.append(Text(f"Redis: {redis_error}", style="yellow"))
    if kube.job is not None:
        parts.append(conditions_table(kube))
    if view is not None:
        parts.append(versions_table(view))
    parts.append(rollout_table(kube, view))
    if view is not None:
        parts.append(feedback_table(view))
    elif "feedbackLag" in kube.status:
        parts.append(Text(f"feedback lag (from the job's status): {kube.status['feedbackLag']} entries"))
    parts.append(replicas_table(kube, view))
    return Group(*parts)
