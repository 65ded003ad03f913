"""`alchemist-worker serve` as a real process: settings from flags and environment, SmolLM2 end to end, SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from alchemist_protocol.local_redis import free_port
from alchemist_worker.api.serve_settings import OPTIONS, add_serve_arguments, resolve_settings


def parse(argv: list[str], env: dict[str, str]) -> object:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return resolve_settings(parser.parse_args(argv), env)


def test_flag_wins_over_environment_which_wins_over_default(tmp_path: Path) -> None:
    env = {"ALCHEMIST_MODEL": str(tmp_path), "ALCHEMIST_PORT": "9001", "ALCHEMIST_RECORD_POLICY": "selective"}
    settings = parse(["--port", "9002"], env)
    assert settings.model == tmp_path and settings.port == 9002  # type: ignore[attr-defined]
    assert settings.record_policy == "selective" and settings.host == "127.0.0.1"  # type: ignore[attr-defined]
    assert parse([], env).port == 9001  # type: ignore[attr-defined]


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ALCHEMIST_PORT"):
        parse([], {"ALCHEMIST_MODEL": str(tmp_path), "ALCHEMIST_PORT": "eighty"})
    with pytest.raises(ValueError, match="ALCHEMIST_RECORD_POLICY"):
        parse([], {"ALCHEMIST_MODEL": str(tmp_path), "ALCHEMIST_RECORD_POLICY": "everything"})
    with pytest.raises(ValueError, match="ALCHEMIST_MODEL"):
        parse([], {})


def test_every_option_has_a_distinct_flag_and_variable() -> None:
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS) == len({o.env for o in OPTIONS})


@pytest.fixture
def smollm_process() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    from alchemist_worker.bundled_model import ensure_small_model

    port = free_port()
    env = {**os.environ, "ALCHEMIST_MODEL": str(ensure_small_model()), "ALCHEMIST_KV_CACHE_MIB": "128"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "alchemist_worker.cli",
            "serve",
            "--port",
            str(port),
            "--max-model-len",
            "1024",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"serve exited early: {process.stdout.read().decode() if process.stdout else ''}"
            )
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("serve did not become ready")
        time.sleep(0.2)
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_smollm_answers_sensibly_and_sigterm_drains(
    smollm_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = smollm_process
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=question,  # type: ignore[arg-type]
        max_tokens=30,
        temperature=0,
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=question,  # type: ignore[arg-type]
        max_tokens=30,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content

    # SIGTERM while a streamed answer is in flight: it completes, then the process exits with status 0.
    pieces: list[str] = []
    finish: list[str | None] = []
    started = threading.Event()

    def consume() -> None:
        stream = client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt="Once upon a time",
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            started.set()
            pieces.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(url + "/readyz", timeout=2).status_code == 503
    reader.join(60)
    assert finish == ["length"] and len("".join(pieces)) > 20
    assert process.wait(30) == 0


def test_cli_rejects_unknown_engine_and_bad_settings(tiny_checkpoints: dict[str, Path]) -> None:
    from alchemist_worker.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(tiny_checkpoints["llama"]), "--engine", "tgi"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_checkpoints["llama"]), "--kv-cache-mib", "0.001"])


def test_the_feedback_stream_setting_comes_from_the_environment() -> None:
    import argparse

    from alchemist_worker.api.serve_settings import add_serve_arguments, resolve_settings

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", "/m"])
    assert resolve_settings(args, {}).feedback_stream == ""
    settings = resolve_settings(args, {"ALCHEMIST_FEEDBACK_STREAM": "shop:reactions"})
    assert settings.feedback_stream == "shop:reactions"


def test_record_dtype_reaches_the_recording_config(tmp_path: Path) -> None:
    env = {"ALCHEMIST_MODEL": str(tmp_path), "ALCHEMIST_RECORD_DTYPE": "bfloat16"}
    assert parse([], env).engine_config().recording.dtype == "bfloat16"  # type: ignore[attr-defined]
    assert parse([], {"ALCHEMIST_MODEL": str(tmp_path)}).record_dtype == "auto"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="ALCHEMIST_RECORD_DTYPE"):
        parse([], {**env, "ALCHEMIST_RECORD_DTYPE": "float8"})
