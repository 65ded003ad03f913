"""Every kopf handler of the operator, each a thin typed wrapper around a reconcile or monitor function.

No finalizer. kopf puts one on every object a daemon watches, so that no daemon outlives its object; but then a
job cannot be deleted while the operator is down (or uninstalled): `kubectl delete` hangs until someone edits the
finalizer away. The job's children need none (their owner references let Kubernetes delete them), and the
monitor ends by itself when the watch reports the job deleted (`job_deleted`), so the daemon is registered
without it. kopf removes the finalizer an older operator left on a job the first time it sees the job.
"""

from __future__ import annotations

import dataclasses
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


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
def job_deleted(type: str | None, memo: JobMemo, **_: Any) -> None:
    """Ends the job's monitor once the job is gone (the watch's DELETED event)."""
    if type == "DELETED":
        memo.gone = True
        memo.wake()


def _without_finalizers(spawning: Any) -> None:
    """Daemons registered so far need no finalizer (see the module's docstring). kopf offers no argument for
    this, so the registered handlers are replaced by copies that say so."""
    spawning._handlers = [dataclasses.replace(h, requires_finalizer=False) for h in spawning._handlers]


_without_finalizers(registry._spawning)
