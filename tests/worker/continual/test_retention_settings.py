"""The retention and health settings of the worker: read from ALCHEMIST_* variables, checked at start."""

from pathlib import Path

import pytest
from alchemist_worker.continual.runtime import RuntimeSettings

GIVEN = {"redis_url": "redis://x:6379/0", "namespace": "ns", "job": "job", "replica": "r0"}


def test_retention_variables_are_read() -> None:
    env = {
        "ALCHEMIST_VERSIONS_DIR": "/tmp/v",
        "ALCHEMIST_FEEDBACK_STREAM_MAX_LEN": "5000",
        "ALCHEMIST_FEEDBACK_DEAD_LETTER_MAX_LEN": "50",
        "ALCHEMIST_FEEDBACK_DEAD_LETTER_FIELD_BYTES": "256",
        "ALCHEMIST_FEEDBACK_TRAINED_HORIZON_SECONDS": "7200",
        "ALCHEMIST_CONTROL_STALL_SECONDS": "15",
    }
    s = RuntimeSettings.from_env(env, **GIVEN, request_ttl_s=3600)
    assert (s.versions_dir, s.feedback_stream_max_len, s.dead_letter_max_len) == (Path("/tmp/v"), 5000, 50)
    assert (s.dead_letter_field_bytes, s.trained_horizon_s, s.control_stall_s) == (256, 7200.0, 15.0)


def test_the_trained_horizon_must_outlive_the_request_records() -> None:
    env = {"ALCHEMIST_VERSIONS_DIR": "/tmp/v", "ALCHEMIST_FEEDBACK_TRAINED_HORIZON_SECONDS": "3600"}
    with pytest.raises(ValueError, match="must exceed the request-record TTL"):
        RuntimeSettings.from_env(env, **GIVEN, request_ttl_s=86_400)
    with pytest.raises(ValueError, match="ALCHEMIST_CONTROL_STALL_SECONDS"):
        RuntimeSettings.from_env(
            {"ALCHEMIST_CONTROL_STALL_SECONDS": "0", "ALCHEMIST_VERSIONS_DIR": "/v"}, **GIVEN
        )
    assert RuntimeSettings.from_env({"ALCHEMIST_VERSIONS_DIR": "/v"}, **GIVEN, request_ttl_s=86_400)
