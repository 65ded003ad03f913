"""Schemathesis against the served OpenAPI document, in-process through the ASGI app: generated requests to
every operation get no server error, and every answer (status, content type, body, headers) is one the
document declares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from alchemist_protocol.local_redis import LocalRedis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.worker.api.conftest import RunningWorker
from tests.worker.api.secured_worker import worker_with_redis

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def conformance_worker(
    tiny_checkpoints: dict[str, Path], redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    env = {
        "ALCHEMIST_VERSIONS_DIR": str(tmp_path_factory.mktemp("versions")),
        "ALCHEMIST_FEEDBACK_RECORD_GRACE_SECONDS": "0.05",
    }
    with worker_with_redis(tiny_checkpoints["llama"], redis_server, "conformance", env) as running:
        yield running


@pytest.fixture(scope="module")
def served_document(conformance_worker: RunningWorker) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", conformance_worker.worker.server.config.app)


OPERATIONS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/score"),
    ("POST", "/v1/feedback"),
    ("GET", "/v1/versions"),
    ("POST", "/v1/versions/rollback"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


def test_every_operation_of_the_document_is_exercised(served_document: Any) -> None:
    listed = {(r.ok().method.upper(), r.ok().path) for r in served_document.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_server_answers_as_its_document_says(served_document: Any, method: str, path: str) -> None:
    operation = served_document[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=6,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def answers_as_declared(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    answers_as_declared()


def test_the_document_declares_the_errors_and_no_422(conformance_worker: RunningWorker) -> None:
    import httpx

    document = httpx.get(conformance_worker.base_url + "/openapi.json").json()
    operations = {(method, path): op for path, ops in document["paths"].items() for method, op in ops.items()}
    for op in operations.values():
        assert "422" not in op["responses"]
    assert set(operations["post", "/v1/feedback"]["responses"]) >= {
        "200",
        "202",
        "400",
        "404",
        "409",
        "413",
        "429",
    }
    assert set(operations["post", "/v1/score"]["responses"]) >= {"200", "400", "413", "429", "503"}
    assert set(operations["post", "/v1/chat/completions"]["responses"]) >= {"400", "404", "413", "503"}
    assert "securitySchemes" not in document["components"]  # no keys configured: nothing claimed
    error = operations["post", "/v1/completions"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
