"""Every kopf handler of the operator, each a thin typed wrapper around a reconcile or monitor function."""

from __future__ import annotations

from typing import Any

import kopf

from alchemist_operator.job_memo import JobMemo
from alchemist_operator.job_monitor import monitor_job
from alchemist_operator.naming import GROUP, PLURAL, VERSION
from alchemist_operator.reconcile import reconcile_job

registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The in-cluster service account, else the kubeconfig: the same credentials the ClusterApi uses."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
async def spec_changed(body: kopf.Body, memo: JobMemo, logger: Any, **_: Any) -> None:
    """Creation, any spec change (scaling and suspending included), and every job found at start-up."""
    await reconcile_job(body, memo, logger)


@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=5.0)
async def monitor(body: kopf.Body, memo: JobMemo, stopped: kopf.DaemonStopped, logger: Any, **_: Any) -> None:
    """Status, replica versions and the rollout of published versions, for as long as the job exists."""
    await monitor_job(body, memo, stopped, logger)
