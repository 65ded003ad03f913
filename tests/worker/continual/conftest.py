"""An in-process worker for the continual trainer's tests: tiny engine + loop + request records + runtime."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import VersionInfo
from alchemist_worker.api.request_records import RedisRequestRecords
from alchemist_worker.continual.control import ControlTimings
from alchemist_worker.continual.runtime import ContinualRuntime, RuntimeSettings
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.engine.config import EngineConfig, RecordingConfig
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.llm_engine import LLMEngine
from alchemist_worker.engine.sampling_params import SamplingParams
from alchemist_worker.engine.serving_engine import GenerationRequest, RequestOutput
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.evaluation.settings import EvaluationSettings
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.rollout.follower import FollowMode

KEYS = JobKeys("ns", "job")


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class InProcessWorker:
    def __init__(
        self,
        checkpoint: Path,
        redis_url: str,
        versions: Path,
        *,
        replica: str = "r0",
        follow: FollowMode = FollowMode.AUTO,
        claim_idle_ms: int = 60_000,
        evaluation: EvaluationSettings | None = None,
        **training: object,
    ) -> None:
        config = EngineConfig(
            model=checkpoint,
            dtype="float32",
            device="cpu",
            num_kv_blocks=64,
            recording=RecordingConfig(policy="full", rate=1.0),
        )
        recording = StoreRecording.from_config(
            config.recording, ModelConfig.from_pretrained(checkpoint), "cpu"
        )
        self.engine = LLMEngine.from_config(config, recording=recording)
        self.loop = EngineLoop(self.engine, idle_wait_s=0.01)
        self.store = JobStore.from_url(redis_url, KEYS.namespace, KEYS.job)
        self.records = RedisRequestRecords(self.store, replica=replica, model="tiny", ttl_s=600)
        self.engine.add_finished_observer(self.records)
        settings = {"lora_rank": 4, "learning_rate": 5e-3, "max_wait_s": 0.1, **training}
        self.runtime = ContinualRuntime(
            self.loop,
            self.engine,
            RuntimeSettings(
                redis_url,
                KEYS.namespace,
                KEYS.job,
                replica,
                versions,
                follow=follow,
                heartbeat_s=0.2,
                feedback_claim_idle_ms=claim_idle_ms,
                evaluation=evaluation or EvaluationSettings(),
            ),
            TrainerSettings(**settings),  # type: ignore[arg-type]
            model_path=checkpoint,
            timings=ControlTimings(
                poll_s=0.01,
                lease_s=0.2,
                follow_s=0.05,
                heartbeat_s=0.2,
                commit_retry_s=0.2,
                commit_retry_max_s=1.0,
                settings_s=0.05,
            ),
        )
        self.feedback = FeedbackClient(self.store.client, KEYS)
        self._n = 0

    def start(self) -> InProcessWorker:
        self.records.start()
        self.runtime.start()
        self.loop.start()
        return self

    def stop(self) -> None:
        self.runtime.stop()
        self.loop.stop()
        self.records.stop()

    def generate(self, prompt: list[int], max_tokens: int = 6) -> RequestOutput:
        """Serves one request and waits until its request record is in Redis."""
        self._n += 1
        request_id = f"cmpl-{self._n}"
        done = threading.Event()
        final: list[RequestOutput | BaseException] = []

        def sink(out: RequestOutput | BaseException) -> None:
            if isinstance(out, BaseException) or out.finished:
                final.append(out)
                done.set()

        self.loop.submit(
            GenerationRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)),
            sink,
        )
        assert done.wait(60), "request did not finish"
        result = final[0]
        if isinstance(result, BaseException):
            raise result
        wait_until(lambda: self.store.get_request(request_id) is not None, 10, "the request record")
        return result

    def accept_until(self, version: int, prompt: list[int]) -> VersionInfo:
        """Serves `prompt`, accepts the answer and waits for `version` (the one that trains it)."""
        out = self.generate(prompt)
        self.feedback.accept(out.request_id)
        self.wait_version(version)
        info = self.store.get_version(version)
        assert info is not None
        return info

    def wait_version(self, version: int, timeout: float = 60.0) -> None:
        wait_until(lambda: self.store.latest_version() >= version, timeout, f"version {version}")

    def wait_serving(self, version: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.engine.weight_version == version, timeout, f"serving version {version}")


@pytest.fixture
def make_worker(
    redis_url: str, tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> Iterator[Callable[..., InProcessWorker]]:
    started: list[InProcessWorker] = []

    def make(**kwargs: object) -> InProcessWorker:
        versions = kwargs.pop("versions", tmp_path / "versions")
        worker = InProcessWorker(tiny_checkpoints["llama"], redis_url, versions, **kwargs).start()  # type: ignore[arg-type]
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()
