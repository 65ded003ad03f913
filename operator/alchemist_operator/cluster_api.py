"""The operator's one door to the Kubernetes API for the objects it owns.

Small on purpose: apply a manifest, read or list objects, patch a job's status, read a Secret's keys. Idempotence lives
here: applying an object that is already there updates it (server-side apply, so fields the operator stops setting
are removed), a 404 on apply means "create it", a 409 on create means someone created it meanwhile (apply again),
and a 404 on read or status patch means the object is gone, which is not an error for a reconciler.

The `kubernetes` client is synchronous; every call runs in a worker thread so the operator's loop never blocks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import kubernetes

from alchemist_operator.naming import API_VERSION, MANAGER, PLURAL

# The kinds the operator touches: (apiVersion, kind) -> plural.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("v1", "Pod"): "pods",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    (API_VERSION, "ContinualLearningJob"): PLURAL,
}


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path} failed with HTTP {status}: {message}")
        self.status = status
        self.message = message  # the server's own words, the same whichever request it refused


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}"
    return path if name is None else f"{path}/{name}"


def is_subset(desired: Any, live: Any) -> bool:
    """Whether `live` has every field of `desired` with the same value (the server adds defaults of its own)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and is_subset(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired == live) or str(desired) == str(live)


@dataclass(frozen=True)
class ApplyResult:
    object: dict[str, Any]
    created: bool
    kept_fields: tuple[str, ...] = ()  # immutable spec fields whose desired value differs from the live one


class ClusterApi:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        field_manager: str = MANAGER,
        request_timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        """`request_timeout`: (connect, read) seconds. Without it a connection the API server accepted but
        never answers holds a handler's thread forever; with it the call fails and the handler retries."""
        self.api_client = api_client
        self.field_manager = field_manager
        self.request_timeout = request_timeout

    @classmethod
    def from_environment(cls) -> ClusterApi:
        """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self.api_client.close()

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        http_method, url, http_headers, http_body, _ = serialized
        try:
            response = self.api_client.call_api(
                http_method,
                url,
                header_params=http_headers,
                body=http_body,
                _request_timeout=self.request_timeout,
            )
            response.read()
        except kubernetes.client.ApiException as exc:
            raise ApiError(exc.status or 0, method, path, str(exc.reason)) from None
        text = response.data.decode() if isinstance(response.data, bytes) else str(response.data or "")
        if not 200 <= response.status < 300:
            message = text
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(text).get("message", text)
            raise ApiError(response.status, method, path, message)
        return json.loads(text) if text else {}

    # Synchronous operations (run in a thread by the async wrappers below).
    def _get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _apply(self, manifest: dict[str, Any], immutable: tuple[str, ...]) -> ApplyResult:
        meta = manifest["metadata"]
        api_version, kind, namespace, name = (
            manifest["apiVersion"],
            manifest["kind"],
            meta["namespace"],
            meta["name"],
        )
        kept: list[str] = []
        if immutable:
            live = self._get(api_version, kind, namespace, name)
            if live is not None:
                manifest = json.loads(json.dumps(manifest))
                for field in immutable:
                    desired_value = manifest["spec"].get(field)
                    live_value = live.get("spec", {}).get(field)
                    if desired_value is not None and not is_subset(desired_value, live_value):
                        kept.append(field)
                    if live_value is None:
                        manifest["spec"].pop(field, None)
                    else:
                        manifest["spec"][field] = live_value
        query = [("fieldManager", self.field_manager), ("force", "true")]
        for _attempt in range(3):
            try:
                applied = self._request(
                    "PATCH",
                    resource_path(api_version, kind, namespace, name),
                    body=json.dumps(manifest),  # JSON is YAML: server-side apply takes it as is
                    query=query,
                    content_type="application/apply-patch+yaml",
                )
                return ApplyResult(applied, created=False, kept_fields=tuple(kept))
            except ApiError as exc:
                if exc.status != 404:
                    raise
            try:
                created = self._request(
                    "POST",
                    resource_path(api_version, kind, namespace),
                    body=manifest,
                    query=[("fieldManager", self.field_manager)],
                )
                return ApplyResult(created, created=True, kept_fields=tuple(kept))
            except ApiError as exc:
                if exc.status != 409:  # 409: created by someone else in between; apply over it
                    raise
        raise ApiError(409, "APPLY", resource_path(api_version, kind, namespace, name), "kept conflicting")

    def _list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        listing = self._request(
            "GET", resource_path(api_version, kind, namespace), query=[("labelSelector", selector)]
        )
        return list(listing.get("items") or [])

    def _patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        path = resource_path(API_VERSION, "ContinualLearningJob", namespace, name) + "/status"
        try:
            self._request("PATCH", path, body={"status": patch}, content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = self._get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        raw = (secret.get("data") or {}).get(key)
        if raw is not None:
            return base64.b64decode(raw).decode()
        plain = (secret.get("stringData") or {}).get(key)
        return str(plain) if plain is not None else None

    def _secret_keys(self, namespace: str, name: str) -> frozenset[str] | None:
        secret = self._get("v1", "Secret", namespace, name)
        if secret is None:
            return None
        return frozenset((secret.get("data") or {}).keys()) | frozenset(
            (secret.get("stringData") or {}).keys()
        )

    # The async API.
    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        return await asyncio.to_thread(self._get, api_version, kind, namespace, name)

    async def apply(self, manifest: dict[str, Any], immutable: tuple[str, ...] = ()) -> ApplyResult:
        """Creates or updates the object so that it has the manifest's fields.

        `immutable`: spec fields the server refuses to change; they keep their live values, and the result lists
        those the manifest wanted changed.
        """
        return await asyncio.to_thread(self._apply, manifest, immutable)

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patches a job's status; False when the job is gone."""
        return await asyncio.to_thread(self._patch_status, namespace, name, patch)

    async def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        return await asyncio.to_thread(self._secret_value, namespace, name, key)

    async def secret_keys(self, namespace: str, name: str) -> frozenset[str] | None:
        """The Secret's key names (never its values), or None when it does not exist."""
        return await asyncio.to_thread(self._secret_keys, namespace, name)

    async def list_objects(
        self, api_version: str, kind: str, namespace: str, selector: str
    ) -> list[dict[str, Any]]:
        """The objects of a kind in a namespace that match a label selector."""
        return await asyncio.to_thread(self._list, api_version, kind, namespace, selector)
