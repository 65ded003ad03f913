"""Bearer keys: one set for the OpenAI routes, another for feedback and admin; health and metrics stay open."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alchemist_protocol.local_redis import LocalRedis
from alchemist_worker.api import auth
from alchemist_worker.api.auth import KeySet, audience, bearer_token
from openai import OpenAI

from tests.worker.api.conftest import RunningWorker
from tests.worker.api.secured_worker import worker_with_redis

API_KEYS = ("api-key-one", "api-key-two")
ADMIN_KEY = "admin-key-from-a-mounted-secret"


@pytest.fixture(scope="module")
def secured(
    tiny_checkpoints: dict[str, Path], redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    tmp = tmp_path_factory.mktemp("auth")
    key_file = tmp / "admin-keys"
    key_file.write_text(f"# rotated monthly\n{ADMIN_KEY}\n")
    env = {
        "ALCHEMIST_API_KEYS": ",".join(API_KEYS),
        "ALCHEMIST_ADMIN_KEYS_FILE": str(key_file),
        "ALCHEMIST_VERSIONS_DIR": str(tmp / "versions"),
        "ALCHEMIST_FEEDBACK_RECORD_GRACE_SECONDS": "0.1",
    }
    with worker_with_redis(tiny_checkpoints["llama"], redis_server, "auth", env) as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


GUARDED = [
    ("get", "/v1/models", None),
    ("get", "/v1/models/tiny", None),
    ("post", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}),
    ("post", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ("post", "/v1/score", {"prompt": "a", "continuation": "b"}),
    ("post", "/v1/feedback", {"response_id": "cmpl-x", "label": "accept"}),
    ("get", "/v1/versions", None),
    ("post", "/v1/versions/rollback", {"version": 0}),
]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
def test_no_token_is_401_with_a_challenge(
    secured: RunningWorker, method: str, path: str, body: object
) -> None:
    r = httpx.request(method, secured.base_url + path, json=body)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="alchemist"'
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
def test_a_key_of_the_other_set_is_401(secured: RunningWorker, method: str, path: str, body: object) -> None:
    wrong = ADMIN_KEY if audience(path) == auth.API else API_KEYS[0]
    r = httpx.request(method, secured.base_url + path, json=body, headers=bearer(wrong))
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_the_right_keys_are_let_through(secured: RunningWorker) -> None:
    for key in API_KEYS:
        assert httpx.get(secured.base_url + "/v1/models", headers=bearer(key)).status_code == 200
    client = OpenAI(base_url=secured.base_url + "/v1", api_key=API_KEYS[1], max_retries=0)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content is not None
    admin = bearer(ADMIN_KEY)
    assert httpx.get(secured.base_url + "/v1/versions", headers=admin).status_code == 200
    r = httpx.post(
        secured.base_url + "/v1/feedback", json={"response_id": chat.id, "label": "accept"}, headers=admin
    )
    assert r.status_code == 202, r.text


def test_health_metrics_and_the_document_stay_open(secured: RunningWorker) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(secured.base_url + path).status_code in (200, 503), path  # 503: not ready yet
    assert httpx.get(secured.base_url + "/healthz").status_code == 200
    schemes = httpx.get(secured.base_url + "/openapi.json").json()["components"]["securitySchemes"]
    assert set(schemes) == {"apiKey", "adminKey"}


def test_keys_never_reach_the_logs(secured: RunningWorker, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for key in (API_KEYS[0], ADMIN_KEY, "a-wrong-key"):
            httpx.get(secured.base_url + "/v1/models", headers=bearer(key))
            httpx.get(secured.base_url + "/v1/versions", headers=bearer(key))
    for key in (*API_KEYS, ADMIN_KEY, "a-wrong-key"):
        assert key not in caplog.text


def test_a_rotated_key_file_takes_effect_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("old-key\n")
    keys = KeySet.from_env("ALCHEMIST_ADMIN_KEYS", {"ALCHEMIST_ADMIN_KEYS_FILE": str(path)})
    assert keys.accepts("old-key") and not keys.accepts("new-key")
    path.write_text("new-key\n")
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert keys.accepts("new-key") and not keys.accepts("old-key")
    path.unlink()  # a Secret being remounted: the last keys stay
    assert keys.accepts("new-key")


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_an_unreadable_or_empty_key_file_stops_the_start(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="ALCHEMIST_API_KEYS_FILE"):
        KeySet.from_env("ALCHEMIST_API_KEYS", {"ALCHEMIST_API_KEYS_FILE": str(path)})


def test_parsing_of_keys_and_headers() -> None:
    assert auth.parse_keys("a, b\n# c\n\nd\n") == ["a", "b", "d"]
    assert bearer_token(b"Bearer  tok ") == "tok" and bearer_token(b"bearer tok") == "tok"
    assert bearer_token(b"Basic dXNlcg==") is None and bearer_token(b"Bearer") is None
    assert audience("/v1/models/tiny") == auth.API and audience("/v1/versions/rollback") == auth.ADMIN
    assert audience("/v1/modelsX") is None and audience("/healthz") is None and audience("/metrics") is None
    unset = KeySet.from_env("ALCHEMIST_API_KEYS", {})
    assert not unset.configured and not unset.accepts("")
