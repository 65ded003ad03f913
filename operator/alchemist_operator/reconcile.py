"""Turns a job's spec into its children, idempotently: the same spec applied twice changes nothing.

Called by the create, update and resume handlers (`reconcile_job`) and, every `drift_check_seconds`, by the job's
monitor (`repair_drift`), which recreates deleted children and puts hand-edited fields back. An invalid spec leaves
the children as they were, records the problem for the status (a False `Valid` condition) and posts a Warning
Event. What keeps a valid spec from working (a Secret or model volume that does not exist, a request the API
server refuses with 403, any other failed request) becomes a False `Reconciled` condition with its reason and a
Warning Event, posted through kopf's event API once per new problem; the monitor retries at its next check.
"""

from __future__ import annotations

from typing import Any

import kopf

from alchemist_operator.children import IMMUTABLE_SPEC_FIELDS, desired_children
from alchemist_operator.cluster_api import ApiError
from alchemist_operator.drift import drift
from alchemist_operator.job_memo import JobMemo
from alchemist_operator.job_spec import InvalidSpec, JobSpec
from alchemist_operator.job_status import Blocker, ReconcileOutcome
from alchemist_operator.naming import JobRef
from alchemist_operator.preflight import find_blockers
from alchemist_operator.spec_checks import validate_job

# HTTP statuses with which the API server refuses a manifest itself: the spec must change, retrying won't help.
REJECTED = (400, 422)
# Spec fields the drift check leaves alone although Kubernetes lets them change: a claim's size may only grow, and
# one grown by hand must not be "repaired" back down (the server would refuse it).
DRIFT_IGNORED: dict[str, tuple[str, ...]] = {"PersistentVolumeClaim": ("resources",)}


def job_ref(body: kopf.Body) -> JobRef:
    meta = body["metadata"]
    return JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""))


def _invalid(body: kopf.Body, memo: JobMemo, generation: int | None, problem: str) -> None:
    memo.outcome = ReconcileOutcome(generation, problem)
    memo.posted_blockers = frozenset()
    kopf.event(body, type="Warning", reason="InvalidSpec", message=problem)
    memo.wake()


def _record(body: kopf.Body, memo: JobMemo, outcome: ReconcileOutcome) -> None:
    """Keeps the outcome for the status; a Warning Event for each blocker not already reported."""
    memo.outcome = outcome
    current = frozenset(outcome.blockers)
    for blocker in outcome.blockers:
        if blocker not in memo.posted_blockers:
            kopf.event(body, type="Warning", reason=blocker.reason, message=blocker.message)
    memo.posted_blockers = current


def _refusal(exc: ApiError, kind: str, name: str) -> Blocker:
    if exc.status == 403:
        return Blocker(
            "Forbidden",
            f"the API server refused to write the {kind} {name} (HTTP 403): {exc.message}; check the operator's "
            "RBAC and any admission webhook or policy",
        )
    return Blocker("ApplyFailed", f"could not write the {kind} {name} (HTTP {exc.status}): {exc.message}")


async def _converge(
    body: kopf.Body, job: JobRef, spec: JobSpec, memo: JobMemo, generation: int | None, *, repair_only: bool
) -> list[str]:
    """Applies the children (all of them, or with `repair_only` those deleted or changed by hand) and records
    the outcome; returns what it applied. Call with `memo.lock` held."""
    blockers = await find_blockers(job, spec, memo.cluster)
    applied: list[str] = []
    for manifest in desired_children(job, spec, memo.config):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        immutable = IMMUTABLE_SPEC_FIELDS.get(kind, ())
        repaired = ""
        try:
            if repair_only:
                live = await memo.cluster.get(manifest["apiVersion"], kind, job.namespace, name)
                if live is None:
                    repaired = f"the {kind} {name} was deleted; recreated it"
                elif changed := drift(manifest, live, immutable + DRIFT_IGNORED.get(kind, ())):
                    repaired = (
                        f"the {kind} {name} was changed by hand ({', '.join(changed[:5])}); restored it"
                    )
                else:
                    continue
            result = await memo.cluster.apply(manifest, immutable=immutable)
        except ApiError as exc:
            if exc.status in REJECTED and not repair_only:
                _invalid(body, memo, generation, f"the API server rejected the {kind}: {exc}")
                return applied
            if (
                exc.status in REJECTED
            ):  # the spec was accepted before: what the live object became is the problem
                blockers.append(Blocker("RepairRejected", f"could not put back the {kind} {name}: {exc}"))
                break
            blockers.append(_refusal(exc, kind, name))
            break  # later children depend on earlier ones (the pods on the ConfigMap and Secrets)
        if repaired:
            kopf.event(body, type="Warning", reason="DriftRepaired", message=repaired)
        if result.kept_fields:
            kopf.event(
                body,
                type="Warning",
                reason="ImmutableFieldsKept",
                message=(
                    f"the {kind}'s {', '.join(result.kept_fields)} cannot change in place and keep their old "
                    f"values; recreate the {kind} {name} to change them"
                ),
            )
        applied.append(f"{kind} {name}")
    _record(body, memo, ReconcileOutcome(generation, None, tuple(blockers)))
    return applied


async def reconcile_job(body: kopf.Body, memo: JobMemo, logger: Any) -> None:
    job = job_ref(body)
    generation = body["metadata"].get("generation")
    try:
        spec = validate_job(job.name, dict(body.get("spec") or {}), memo.config)
    except InvalidSpec as exc:
        logger.warning(f"invalid spec, children left as they were: {exc}")
        _invalid(body, memo, generation, str(exc))
        return
    async with memo.lock:
        applied = await _converge(body, job, spec, memo, generation, repair_only=False)
        outcome = memo.outcome
        if outcome is not None and outcome.problem is None:
            memo.spec = spec  # set with the outcome (no await between): the monitor sees both or neither
    if outcome is not None and outcome.problem is None and not outcome.blockers:
        replicas = 0 if spec.suspend else spec.replicas
        kopf.event(
            body,
            type="Normal",
            reason="Reconciled",
            message=f"{replicas} replicas; applied {', '.join(applied)}",
        )


async def repair_drift(body: kopf.Body, memo: JobMemo) -> None:
    """Puts back deleted or hand-edited children of the last valid spec; after a failed reconcile, applies every
    child again. Does nothing while the spec is invalid (its children are left as they were)."""
    async with memo.lock:
        outcome, spec = memo.outcome, memo.spec
        if outcome is None or outcome.problem is not None or spec is None:
            return
        await _converge(body, job_ref(body), spec, memo, outcome.generation, repair_only=not outcome.blockers)
