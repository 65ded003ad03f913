"""Whether a live child still has what the operator gave it: the fields the operator owns, nothing else.

Pure. The API server adds fields of its own (defaults, status, other managers' fields) and rewrites quantities
in canonical form ("0.5" becomes "500m"), so a child has drifted only when a field the operator sets is missing
or has another value. Fields Kubernetes refuses to change after creation are left out: putting them back would
need the child recreated, which the spec handler reports instead.
"""

from __future__ import annotations

from typing import Any

from alchemist_operator.quantities import parse_quantity


def _same_scalar(desired: Any, live: Any) -> bool:
    if desired == live or str(desired) == str(live):
        return True
    if isinstance(desired, bool) or isinstance(live, bool):
        return False
    if isinstance(desired, (str, int)) and isinstance(live, (str, int)):
        try:
            return parse_quantity(desired) == parse_quantity(live)
        except ValueError:
            return False
    return False


def differences(desired: Any, live: Any, path: str = "") -> list[str]:
    """The paths (like `spec.replicas`) where `live` lacks or changed what `desired` sets."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            child = f"{path}.{key}" if path else key
            if key not in live:
                out.append(child)
            else:
                out += differences(value, live[key], child)
        return out
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return [path]
        out = []
        for index, (d, x) in enumerate(zip(desired, live, strict=True)):
            out += differences(d, x, f"{path}[{index}]")
        return out
    return [] if _same_scalar(desired, live) else [path]


def drift(desired: dict[str, Any], live: dict[str, Any], immutable: tuple[str, ...] = ()) -> list[str]:
    """What was changed by hand in the fields the operator owns: labels, owner references, data and spec."""
    owned: dict[str, Any] = {
        key: value for key, value in desired.items() if key not in ("apiVersion", "kind", "metadata")
    }
    if isinstance(owned.get("spec"), dict):
        owned["spec"] = {k: v for k, v in owned["spec"].items() if k not in immutable}
    meta = desired.get("metadata") or {}
    owned_meta = {k: meta[k] for k in ("labels", "ownerReferences") if k in meta}
    found = differences(owned, live)
    found += [f"metadata.{p}" for p in differences(owned_meta, live.get("metadata") or {})]
    return found
