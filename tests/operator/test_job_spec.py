"""The typed spec against the CRD's schema: same fields, same defaults, same enums; and clear errors."""

from __future__ import annotations

import copy
import enum
import types
import typing
from typing import Any

import pytest
from alchemist_operator.job_spec import InvalidSpec, JobSpec, SpecModel, parse_job_spec
from alchemist_operator.quantities import parse_quantity, quantity_bytes
from pydantic import BaseModel


def spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server does: fill absent properties that have a default, then descend into objects."""
    if schema.get("type") == "object" and isinstance(value, dict):
        out = dict(value)
        for name, prop in schema.get("properties", {}).items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_schema_defaults(prop, out[name])
        return out
    if schema.get("type") == "array" and isinstance(value, list) and "items" in schema:
        return [apply_schema_defaults(schema["items"], item) for item in value]
    return value


def drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        cleaned = {k: drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in (None, [], {})}
    if isinstance(value, list):
        return [drop_empty(v) for v in value]
    return value


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The SpecModel inside an annotation like `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, SpecModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, list):
        for arg in typing.get_args(annotation):
            found = model_of(arg)
            if found is not None:
                return found
    return None


def enum_of(annotation: Any) -> type[enum.Enum] | None:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    for arg in typing.get_args(annotation):
        found = enum_of(arg)
        if found is not None:
            return found
    return None


def walk(schema: dict[str, Any], model: type[BaseModel], path: str, problems: list[str]) -> None:
    props = schema.get("properties", {})
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for missing in sorted(set(props) - set(fields)):
        problems.append(f"{path}.{missing}: in the CRD, not in {model.__name__}")
    for missing in sorted(set(fields) - set(props)):
        problems.append(f"{path}.{missing}: in {model.__name__}, not in the CRD")
    required = set(schema.get("required", []))
    for name in sorted(set(props) & set(fields)):
        prop, field = props[name], fields[name]
        if field.is_required() != (name in required):
            problems.append(f"{path}.{name}: required in one and not the other")
        enum_type = enum_of(field.annotation)
        if enum_type is not None and sorted(prop.get("enum", [])) != sorted(e.value for e in enum_type):
            problems.append(f"{path}.{name}: enum {prop.get('enum')} vs {[e.value for e in enum_type]}")
        nested = model_of(field.annotation)
        if nested is not None:
            walk(prop.get("items", prop), nested, f"{path}.{name}", problems)


def test_crd_and_model_have_the_same_fields_enums_and_required(crd: dict[str, Any]) -> None:
    problems: list[str] = []
    walk(spec_schema(crd), JobSpec, "spec", problems)
    assert problems == []


@pytest.mark.parametrize(
    "raw",
    [
        {"model": {"path": "/m"}},
        {"model": {"path": "/m"}, "training": {"lora": {"rank": 8}}, "rollout": {"canary": {}}},
        {"model": {"path": "w", "source": "Volume", "claimName": "c"}, "resources": {"gpus": 0}},
    ],
)
def test_crd_defaults_equal_model_defaults(crd: dict[str, Any], raw: dict[str, Any]) -> None:
    defaulted_by_server = drop_empty(apply_schema_defaults(spec_schema(crd), raw))
    defaulted_by_model = drop_empty(parse_job_spec(raw).model_dump(by_alias=True, mode="json"))
    assert defaulted_by_server == defaulted_by_model


def test_errors_name_every_bad_field() -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_job_spec({"model": {"path": "/m"}, "replicas": -1, "resources": {"memory": "8Q"}, "colour": 1})
    message = str(err.value)
    assert "spec.replicas" in message
    assert "spec.resources.memory" in message and "'8Q' is not a quantity" in message
    assert "spec.colour" in message
    with pytest.raises(InvalidSpec, match=r"spec\.model: Field required"):
        parse_job_spec({})


def test_quantities() -> None:
    assert quantity_bytes("8Gi") == 8 * 2**30
    assert quantity_bytes("1.5k") == 1500
    assert quantity_bytes(7) == 7
    assert quantity_bytes("1m") == 1  # rounded up to a whole byte
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert quantity_bytes("3Ki") == 3072
    for bad in ("8Q", "Gi", "-1", "1.2.3"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("training", "beta"), 0),
        (("training", "beta"), float("nan")),
        (("training", "klWeight"), -1),
        (("training", "klWeight"), float("nan")),
        (("training", "desirableWeight"), -0.5),
        (("training", "undesirableWeight"), float("nan")),
        (("training", "objective"), "rlhf"),
        (("recording", "dtype"), "float8"),
        (("recording", "dtype"), b"\xff"),
        (("lifecycle", "drainSeconds"), -1),
        (("lifecycle", "drainSeconds"), 10**12),
        (("lifecycle", "preStopSeconds"), 121),
        (("evaluation", "maxPerplexityIncrease"), float("nan")),
        (("evaluation", "maxExactMatchDrop"), 2),
    ],
)
def test_hostile_values_in_the_newer_fields_name_the_field(path: tuple[str, str], value: Any) -> None:
    """Negative, NaN, huge, unknown and undecodable values are refused with the field's path, never accepted."""
    raw: dict[str, Any] = {"model": {"path": "/m"}, path[0]: {path[1]: value}}
    if path[0] == "evaluation":
        raw["evaluation"]["path"] = "/eval.jsonl"
    with pytest.raises(InvalidSpec, match=rf"spec\.{path[0]}\.{path[1]}"):
        parse_job_spec(raw)
