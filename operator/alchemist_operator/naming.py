"""Names and labels of everything the operator creates for a job, derived from the job's name alone."""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "alchemist.dev"
VERSION = "v1alpha1"
PLURAL = "continuallearningjobs"
KIND = "ContinualLearningJob"
API_VERSION = f"{GROUP}/{VERSION}"

MANAGER = "alchemist-operator"
WORKER_CONTAINER = "worker"
VERSIONS_DIR = "/var/lib/alchemist/versions"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"

# The StatefulSet controller labels each pod with `<name>-<10-char hash>`, and label values stop at 63 characters.
MAX_JOB_NAME = 52
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class JobRef:
    """Identity of a ContinualLearningJob: enough to name its children and to own them."""

    namespace: str
    name: str
    uid: str

    @property
    def statefulset(self) -> str:
        return self.name

    @property
    def client_service(self) -> str:
        return self.name

    @property
    def headless_service(self) -> str:
        return f"{self.name}-headless"

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    @property
    def disruption_budget(self) -> str:
        return self.name

    @property
    def versions_claim(self) -> str:
        return f"{self.name}-versions"

    @property
    def redis_secret(self) -> str:
        """The Secret with the operator's default Redis password, for the pods (they read Secrets of their own
        namespace only)."""
        return f"{self.name}-default-redis"

    def selector_labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "alchemist-worker",
            "app.kubernetes.io/instance": self.name,
            f"{GROUP}/job": self.name,
        }

    def labels(self) -> dict[str, str]:
        return {
            **self.selector_labels(),
            "app.kubernetes.io/component": "worker",
            "app.kubernetes.io/part-of": "alchemist",
            "app.kubernetes.io/managed-by": MANAGER,
        }

    def selector(self) -> str:
        """The label selector as a string, as the scale subresource reports it."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector_labels().items()))

    def owner_reference(self) -> dict[str, object]:
        """Makes the job the controller of a child: deleting the job deletes the child."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str) -> dict[str, object]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(),
            "ownerReferences": [self.owner_reference()],
        }


def job_name_problem(name: str) -> str | None:
    """Why the job's name cannot name its children (pods, Services), or None when it can."""
    if not _DNS_LABEL.match(name):
        return (
            f"name {name!r} must be a DNS label (lowercase letters, digits and '-', starting with a letter), "
            "because it names the job's Services"
        )
    if len(name) > MAX_JOB_NAME:
        return f"name {name!r} is {len(name)} characters long; at most {MAX_JOB_NAME} fit the pods' labels"
    return None
