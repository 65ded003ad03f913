"""kopf's settings for this operator: where it keeps its bookkeeping, peering, and what it posts as Events."""

from __future__ import annotations

import logging

import kopf

from alchemist_operator.naming import GROUP
from alchemist_operator.operator_config import OperatorConfig


def build_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Annotations, not status: the status belongs to the job's monitor, and the CRD schema would prune kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Only explicit Events and warnings reach `kubectl describe`; routine logs stay in the log.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "alchemist-operator"
    # Without scanning, kopf watches only the namespaces it is given and needs no cluster-wide CRD access.
    settings.scanning.disabled = True
    # One active operator among the replicas: the one with the highest priority; the others stand by.
    settings.peering.name = config.peering_name
    settings.peering.standalone = config.standalone
    settings.peering.mandatory = not config.standalone
    settings.peering.priority = config.priority
    settings.peering.clusterwide = config.clusterwide
    settings.peering.stealth = True
    return settings
