"""Turns a job's spec into its children, idempotently: the same spec applied twice changes nothing.

Called by the create, update and resume handlers. An invalid spec leaves the children as they were, records the
problem for the status (a False `Valid` condition) and posts a Warning Event; the operator carries on.
"""

from __future__ import annotations

from typing import Any

import kopf

from alchemist_operator.children import IMMUTABLE_SPEC_FIELDS, desired_children
from alchemist_operator.cluster_api import ApiError
from alchemist_operator.job_memo import JobMemo
from alchemist_operator.job_spec import InvalidSpec
from alchemist_operator.job_status import ReconcileOutcome
from alchemist_operator.naming import JobRef
from alchemist_operator.spec_checks import validate_job

# HTTP statuses with which the API server refuses a manifest itself: the spec must change, retrying won't help.
REJECTED = (400, 422)


def job_ref(body: kopf.Body) -> JobRef:
    meta = body["metadata"]
    return JobRef(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""))


def _invalid(body: kopf.Body, memo: JobMemo, generation: int | None, problem: str) -> None:
    memo.outcome = ReconcileOutcome(generation, problem)
    kopf.event(body, type="Warning", reason="InvalidSpec", message=problem)
    memo.wake()


async def reconcile_job(body: kopf.Body, memo: JobMemo, logger: Any) -> None:
    job = job_ref(body)
    generation = body["metadata"].get("generation")
    try:
        spec = validate_job(job.name, dict(body.get("spec") or {}), memo.config)
    except InvalidSpec as exc:
        logger.warning(f"invalid spec, children left as they were: {exc}")
        _invalid(body, memo, generation, str(exc))
        return
    applied: list[str] = []
    for manifest in desired_children(job, spec, memo.config):
        kind = manifest["kind"]
        immutable = IMMUTABLE_SPEC_FIELDS.get(kind, ())
        try:
            result = await memo.cluster.apply(manifest, immutable=immutable)
        except ApiError as exc:
            if exc.status in REJECTED:
                _invalid(body, memo, generation, f"the API server rejected the {kind}: {exc}")
                return
            raise kopf.TemporaryError(f"could not apply the {kind}: {exc}", delay=10) from exc
        if result.kept_fields:
            kopf.event(
                body,
                type="Warning",
                reason="ImmutableFieldsKept",
                message=(
                    f"the {kind}'s {', '.join(result.kept_fields)} cannot change in place and keep their old "
                    f"values; recreate the {kind} {manifest['metadata']['name']} to change them"
                ),
            )
        applied.append(f"{kind} {manifest['metadata']['name']}")
    memo.spec = spec
    memo.outcome = ReconcileOutcome(generation, None)
    replicas = 0 if spec.suspend else spec.replicas
    kopf.event(
        body, type="Normal", reason="Reconciled", message=f"{replicas} replicas; applied {', '.join(applied)}"
    )
    memo.wake()
