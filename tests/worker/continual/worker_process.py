"""`alchemist-worker serve` as a real child process with the continual trainer, for kill -9 and restart tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from alchemist_protocol.local_redis import free_port


class WorkerProcess:
    def __init__(self, model: Path, redis_url: str, versions: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            **os.environ,
            "ALCHEMIST_MODEL": str(model),
            "ALCHEMIST_PORT": str(self.port),
            "ALCHEMIST_DTYPE": "float32",
            "ALCHEMIST_DEVICE": "cpu",
            "ALCHEMIST_KV_CACHE_MIB": "8",
            "ALCHEMIST_MAX_MODEL_LEN": "128",
            "ALCHEMIST_REDIS_URL": redis_url,
            "ALCHEMIST_NAMESPACE": "ns",
            "ALCHEMIST_JOB": "job",
            "ALCHEMIST_REPLICA": "r0",
            "ALCHEMIST_VERSIONS_DIR": str(versions),
            "ALCHEMIST_RECORD_POLICY": "full",
            "ALCHEMIST_RECORD_RATE": "1",
            "ALCHEMIST_HEARTBEAT_SECONDS": "0.3",
            "ALCHEMIST_TRAINER_LEASE_SECONDS": "1.5",
            "ALCHEMIST_TRAINING_LORA_RANK": "4",
            "ALCHEMIST_TRAINING_LEARNING_RATE": "0.005",
            "ALCHEMIST_TRAINING_MAX_WAIT_SECONDS": "0.05",
            "ALCHEMIST_TRAINING_KEEP_VERSIONS": "1000",
            "ALCHEMIST_LOG_LEVEL": "info",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "alchemist_worker.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not become ready; see {self.log}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a node failure or an OOM kill."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self) -> dict[str, object]:
        worker: dict[str, object] = httpx.get(self.base_url + "/v1/versions", timeout=10).json()["worker"]
        return worker
