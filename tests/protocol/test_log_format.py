import io
import json
import logging

import pytest
from alchemist_protocol.log_format import (
    JsonFormatter,
    configure_logging,
    log_context,
    log_format_from_env,
    request_id_var,
)


def _capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("alchemist.test.json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_one_json_object_per_line_with_the_ids_of_the_context() -> None:
    logger, stream = _capture()
    logger.info("before")
    with log_context(request_id="req-1", response_id="chatcmpl-9"):
        logger.warning("inside %s", "the request", extra={"status": 200})
    logger.info("after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    assert "request_id" not in lines[0] and "request_id" not in lines[2]
    inside = lines[1]
    assert inside["message"] == "inside the request" and inside["level"] == "WARNING"
    assert inside["request_id"] == "req-1" and inside["response_id"] == "chatcmpl-9"
    assert inside["status"] == 200 and inside["logger"] == "alchemist.test.json"
    assert request_id_var.get() is None


def test_exceptions_and_newlines_stay_inside_one_line() -> None:
    logger, stream = _capture()
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("failed:\n%s", "details")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "failed:\ndetails"
    assert "RuntimeError: boom" in entry["exception"]


def test_log_format_from_env() -> None:
    assert log_format_from_env({}) == "text"
    assert log_format_from_env({"ALCHEMIST_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ValueError, match="ALCHEMIST_LOG_FORMAT='yaml'"):
        log_format_from_env({"ALCHEMIST_LOG_FORMAT": "yaml"})


def test_configure_logging_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging("json", "warning")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
        with pytest.raises(ValueError, match="must be one of"):
            configure_logging("xml")
    finally:
        root.handlers = saved
        root.setLevel(level)
