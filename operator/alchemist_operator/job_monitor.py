"""The per-job loop: look at the StatefulSet and Redis, take one rollout decision, write the status.

Runs as a kopf daemon for as long as the job exists (and this operator is the active peer). It wakes up every
`monitor_interval_seconds`, or at once when the spec handler has reconciled. Redis being away is a condition in
the status, never a crash: the loop keeps going and picks up where the rollout state in Redis left it. A Redis
that comes back empty gets the rollout pointer remembered in the status (`rollout_memory`), never version 0.
Every `drift_check_seconds` it also puts back children that were deleted or edited by hand (`repair_drift`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from typing import Any

import kopf
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.live_settings import write_live_settings

from alchemist_operator.job_memo import JobMemo
from alchemist_operator.job_spec import JobSpec
from alchemist_operator.job_status import RedisView, StatusInputs, WorkloadView, compute_status, status_patch
from alchemist_operator.live_config import live_settings
from alchemist_operator.naming import JobRef
from alchemist_operator.pod_health import pod_problems
from alchemist_operator.reconcile import job_ref, repair_drift
from alchemist_operator.rollout import Phase, RolloutEvent, RolloutPolicy, read_gates, step
from alchemist_operator.rollout_memory import remembered_state, restored_state, rewind_reason
from alchemist_operator.rollout_store import (
    RedisSnapshot,
    read_snapshot,
    request_trainer_rollback,
    write_state,
)
from alchemist_operator.worker_env import uses_default_redis
from alchemist_operator.workload_health import model_fetch, unbound_claims, unschedulable_pods


async def redis_url_for(job: JobRef, spec: JobSpec, memo: JobMemo) -> str | None:
    ref = spec.feedback.redis_secret_ref
    if ref is not None:
        return await memo.cluster.secret_value(job.namespace, ref.name, ref.key)
    return spec.feedback.redis_url or memo.config.default_redis_url


async def redis_password_for(job: JobRef, spec: JobSpec, memo: JobMemo) -> str | None:
    """The job's Redis password from its Secret, or the default Redis's for a job that uses that Redis."""
    ref = spec.redis.password_secret
    if ref is not None:
        return await memo.cluster.secret_value(job.namespace, ref.name, ref.key)
    return memo.config.default_redis_password if uses_default_redis(spec) else None


def job_keys(job: JobRef, spec: JobSpec) -> JobKeys:
    return JobKeys(job.namespace, job.name, spec.feedback.stream)


def _store(memo: JobMemo, keys: JobKeys, url: str, password: str | None) -> JobStore:
    """A client per job, kept while its URL and password stay the same; a password in the URL wins."""
    identity = f"{url}\x00{password or ''}"
    if memo.store is None or memo.store_url != identity or memo.store.keys != keys:
        memo.close_store()
        timeout = memo.config.redis_timeout_seconds
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            password=password,
        )
        memo.store = JobStore(client, keys)
        memo.store_url = identity
    return memo.store


async def _workload(body: kopf.Body, job: JobRef, memo: JobMemo) -> WorkloadView | None:
    live = await memo.cluster.get("apps/v1", "StatefulSet", job.namespace, job.statefulset)
    if live is None:
        return None
    status = live.get("status") or {}
    pods = await memo.cluster.list_objects("v1", "Pod", job.namespace, job.selector())
    claims = await memo.cluster.list_objects("v1", "PersistentVolumeClaim", job.namespace, job.selector())
    now = datetime.datetime.now(datetime.UTC)
    failing = pod_problems(pods) + unschedulable_pods(pods)
    unbound = unbound_claims(claims, now)
    for reason, lines in (("WorkerFailing", failing), ("VolumeNotBound", unbound)):
        new = [line for line in lines if line not in memo.reported_failures]
        if new:
            kopf.event(body, type="Warning", reason=reason, message="; ".join(new))
    memo.reported_failures = failing + unbound
    return WorkloadView(
        replicas=int(status.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        failing=failing,
        unbound_claims=unbound,
        model_fetch=model_fetch(pods),
    )


def _post(body: kopf.Body, memo: JobMemo, events: tuple[Any, ...]) -> None:
    job = job_ref(body)
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        memo.metrics.count_event(job.namespace, job.name, event.reason)


def _guard_rewind(
    store: JobStore, snapshot: RedisSnapshot, previous: dict[str, Any]
) -> tuple[RedisSnapshot, RolloutEvent | None]:
    """Writes the remembered pointer back when Redis lost it: the snapshot to go on with, and the Warning."""
    remembered = remembered_state(previous)
    if remembered is None:
        return snapshot, None
    rollback = store.get_rollback() if snapshot.pointer_exists else None
    why = rewind_reason(
        snapshot.state, snapshot.pointer_exists, remembered, rollback.version if rollback else None
    )
    if why is None:
        return snapshot, None
    restored = restored_state(snapshot.state, remembered)
    write_state(store, restored)
    message = f"{why}; restored the pointer to version {restored.stable} instead of moving replicas back"
    event = RolloutEvent("Warning", "RedisStateLost", message)
    return dataclasses.replace(snapshot, state=restored, pointer_exists=True), event


async def _rollout(
    body: kopf.Body, job: JobRef, spec: JobSpec, memo: JobMemo, previous: dict[str, Any]
) -> RedisView:
    """Reads Redis, takes at most one rollout decision and writes it back; Redis errors become the view's error."""
    url = await redis_url_for(job, spec, memo)
    if url is None:
        return RedisView(reachable=False, error="the Redis URL Secret or its key does not exist")
    password = await redis_password_for(job, spec, memo)
    if spec.redis.password_secret is not None and password is None:
        return RedisView(reachable=False, error="the Redis password Secret or its key does not exist")
    store = _store(memo, job_keys(job, spec), url, password)
    try:
        snapshot = await asyncio.to_thread(read_snapshot, store, store.keys.feedback, time.time())
        snapshot, lost = await asyncio.to_thread(_guard_rewind, store, snapshot, previous)
        if lost is not None:
            _post(body, memo, (lost,))
        settings = live_settings(spec)
        if await asyncio.to_thread(write_live_settings, store.client, store.keys, settings):
            message = f"training settings for the running workers (no restart): {settings.training}"
            kopf.event(body, type="Normal", reason="LiveSettingsWritten", message=message)
        state = snapshot.state
        if not spec.suspend:  # a suspended job has no replicas to roll out to; its rollout waits
            policy = RolloutPolicy.from_spec(spec.rollout)
            result = step(state, policy, snapshot.observation)
            if result.state != state or not snapshot.pointer_exists:
                await asyncio.to_thread(write_state, store, result.state)
            if result.rollback_trainer_to is not None:
                reason = f"canary of version {state.candidate} rolled back by the operator"
                await asyncio.to_thread(request_trainer_rollback, store, result.rollback_trainer_to, reason)
            _post(body, memo, result.events)
            state = result.state
    except (redis.RedisError, OSError) as exc:
        return RedisView(reachable=False, error=f"Redis at {store.keys.prefix}*: {exc}")
    gate = None
    if state.phase is not Phase.IDLE:
        gate = read_gates(state, RolloutPolicy.from_spec(spec.rollout).gates, snapshot.observation)
    return RedisView(
        reachable=True,
        state=state,
        published=snapshot.observation.published,
        replica_versions=snapshot.replica_versions,
        feedback_lag=snapshot.feedback_lag,
        gate=gate,
        held=snapshot.observation.held,
        training_group=snapshot.training_group,
    )


async def monitor_once(body: kopf.Body, memo: JobMemo) -> dict[str, Any]:
    """One look and one decision; returns the status it wrote (or found already written)."""
    job = job_ref(body)
    if memo.outcome is None and body.get("status"):
        # Just started (or took over): keep the last status until this operator has reconciled the spec, rather
        # than flap every condition to Unknown.
        return dict(body["status"])
    if time.monotonic() - memo.last_drift_check >= memo.config.drift_check_seconds:
        memo.last_drift_check = time.monotonic()
        await repair_drift(body, memo)
    spec = memo.spec
    valid = memo.outcome is not None and memo.outcome.problem is None
    previous = memo.last_status if memo.last_status is not None else dict(body.get("status") or {})
    workload = await _workload(body, job, memo)
    redis_view = await _rollout(body, job, spec, memo, previous) if spec is not None and valid else None
    status = compute_status(
        StatusInputs(
            job=job,
            spec=spec,
            outcome=memo.outcome,
            workload=workload,
            redis=redis_view,
            feedback_stream=job_keys(job, spec).feedback
            if spec is not None
            else JobKeys(job.namespace, job.name).feedback,
            previous=previous,
            now=datetime.datetime.now(datetime.UTC),
            generation=body["metadata"].get("generation"),
        )
    )
    patch = status_patch(previous, status)
    if patch:
        await memo.cluster.patch_status(job.namespace, job.name, patch)
    memo.last_status = status
    memo.metrics.observe_status(job.namespace, job.name, status)
    return status


async def _sleep(memo: JobMemo, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until the interval passes, the spec handler wakes us, or kopf stops the daemon."""
    wakeup = asyncio.ensure_future(memo.wakeup.wait())
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({wakeup, stop}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (wakeup, stop):
            waiter.cancel()
        memo.wakeup.clear()


async def monitor_job(body: kopf.Body, memo: JobMemo, stopped: kopf.DaemonStopped, logger: Any) -> None:
    try:
        while not stopped and not memo.gone:
            try:
                await monitor_once(body, memo)
            except Exception as exc:  # the loop must outlive any one bad look (API hiccups, odd data)
                logger.warning(f"status and rollout check failed, retrying: {exc!r}")
            await _sleep(memo, stopped, memo.config.monitor_interval_seconds)
    finally:
        memo.close_store()
        job = job_ref(body)
        memo.metrics.forget(job.namespace, job.name)
