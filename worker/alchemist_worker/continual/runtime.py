"""The continual trainer composed with a serving engine in one process: build, start, stop, routes.

    runtime = ContinualRuntime.build(loop, engine, RuntimeSettings(...), TrainerSettings(...))
    runtime.start()          # before or after the engine loop starts
    app.include_router(...)  # for router in runtime.routers()

The engine knows nothing of training; this module only wires: the trainer and its slices run in the engine
loop's between-iterations hook (engine_side.py), Redis and the disk are handled by the control thread
(control.py). With `training.enabled` false the replica still follows the rollout pointer, loads versions and
beats its heartbeat: it serves, and another replica trains.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.redis_connection import connect
from alchemist_protocol.schemas import Feedback, RequestRecord
from alchemist_protocol.training_group import TrainingGroupStore
from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from alchemist_worker.activations.store import ActivationStore, StoreConfig
from alchemist_worker.cache_dir import cache_root
from alchemist_worker.continual.co_scheduler import CoScheduler
from alchemist_worker.continual.control import ControlTimings, TrainingControl
from alchemist_worker.continual.duties import ControlDuties
from alchemist_worker.continual.engine_side import EngineSide
from alchemist_worker.continual.lease import TrainerLease
from alchemist_worker.continual.metrics import TrainingMetrics
from alchemist_worker.continual.router import Offload, continual_router
from alchemist_worker.continual.scoring import ScoreQueue, continuation_logprob
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer
from alchemist_worker.distributed.control import DataParallelControl
from alchemist_worker.distributed.settings import DataParallelSettings
from alchemist_worker.distributed.trainer import DataParallelTrainer
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.evaluation.candidate import CandidateEvaluation
from alchemist_worker.evaluation.gate_metrics import GateMetrics
from alchemist_worker.evaluation.settings import EvaluationSettings
from alchemist_worker.feedback.consumer import ConsumerSettings, FeedbackConsumer
from alchemist_worker.feedback.router import feedback_router
from alchemist_worker.feedback.samples import SampleResolver
from alchemist_worker.rollout.follower import FollowMode, RolloutFollower
from alchemist_worker.rollout.heartbeat import Heartbeat
from alchemist_worker.training.objectives import trains_rejections
from alchemist_worker.versions.directory import VersionDirectory
from alchemist_worker.versions.publisher import VersionPublisher
from alchemist_worker.versions.storage import version_storage


@dataclass(frozen=True)
class RuntimeSettings:
    redis_url: str
    namespace: str
    job: str
    replica: str
    versions_dir: Path
    feedback_stream: str | None = None  # None: the job's default stream key
    follow: FollowMode = FollowMode.AUTO
    heartbeat_s: float = 5.0
    lease_ttl_s: float = 15.0
    feedback_max_held: int = 1024
    feedback_claim_idle_ms: int = 60_000
    feedback_max_backlog: int = 0  # POST /v1/feedback answers 429 beyond this backlog; 0: unbounded
    feedback_record_grace_s: float = 2.0  # POST /v1/feedback waits this long for a request record, then 404
    feedback_stream_max_len: int = 1_000_000  # acknowledged entries beyond it are deleted; 0: no bound
    dead_letter_max_len: int = 10_000  # the dead-letter stream keeps about this many entries
    dead_letter_field_bytes: int = 4096  # each original field of a dead letter is cut to this
    trained_horizon_s: float = 7 * 86_400  # how long trained feedback ids are remembered (idempotency)
    request_ttl_s: float | None = None  # the request records' TTL, when known: the horizon must outlive it
    control_stall_s: float = 60.0  # /readyz answers 503 when a control duty has not succeeded for this long
    data_parallel: DataParallelSettings | None = None  # every replica trains in one group (distributed/)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)  # the gate before rollout

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ValueError("the continual trainer needs Redis: set ALCHEMIST_REDIS_URL (or --redis-url)")
        if self.heartbeat_s <= 0 or self.lease_ttl_s <= 0:
            raise ValueError("heartbeat and lease intervals must be positive")
        if self.request_ttl_s is not None and self.trained_horizon_s <= self.request_ttl_s:
            # Within the records' TTL a duplicate could still resolve and train; beyond it, it cannot.
            raise ValueError(
                f"ALCHEMIST_FEEDBACK_TRAINED_HORIZON_SECONDS ({self.trained_horizon_s:g}) must exceed the "
                f"request-record TTL ({self.request_ttl_s:g} s), or a retried feedback could train twice"
            )
        if self.control_stall_s <= 0:
            raise ValueError("ALCHEMIST_CONTROL_STALL_SECONDS must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> RuntimeSettings:
        """`given` (redis_url, namespace, job, replica from the serve settings) plus these variables."""
        env = os.environ if environ is None else environ
        table: dict[str, tuple[str, Any]] = {
            "versions_dir": ("ALCHEMIST_VERSIONS_DIR", Path),
            "follow": ("ALCHEMIST_ROLLOUT_FOLLOW", FollowMode),
            "heartbeat_s": ("ALCHEMIST_HEARTBEAT_SECONDS", float),
            "lease_ttl_s": ("ALCHEMIST_TRAINER_LEASE_SECONDS", float),
            "feedback_max_held": ("ALCHEMIST_FEEDBACK_MAX_HELD", int),
            "feedback_claim_idle_ms": ("ALCHEMIST_FEEDBACK_CLAIM_IDLE_MS", int),
            "feedback_max_backlog": ("ALCHEMIST_FEEDBACK_MAX_BACKLOG", int),
            "feedback_record_grace_s": ("ALCHEMIST_FEEDBACK_RECORD_GRACE_SECONDS", float),
            "feedback_stream_max_len": ("ALCHEMIST_FEEDBACK_STREAM_MAX_LEN", int),
            "dead_letter_max_len": ("ALCHEMIST_FEEDBACK_DEAD_LETTER_MAX_LEN", int),
            "dead_letter_field_bytes": ("ALCHEMIST_FEEDBACK_DEAD_LETTER_FIELD_BYTES", int),
            "trained_horizon_s": ("ALCHEMIST_FEEDBACK_TRAINED_HORIZON_SECONDS", float),
            "control_stall_s": ("ALCHEMIST_CONTROL_STALL_SECONDS", float),
        }
        values = dict(given)
        for name, (var, parse) in table.items():
            raw = env.get(var, "")
            if raw and name not in values:
                try:
                    values[name] = parse(raw)
                except ValueError as exc:
                    raise ValueError(f"{var}={raw!r}: {exc}") from None
        if "evaluation" not in values:
            values["evaluation"] = EvaluationSettings.from_env(env)
        if "data_parallel" not in values:
            values["data_parallel"] = DataParallelSettings.from_env(env)
        if "versions_dir" not in values:  # persistent, and one directory per job (a job's one lineage)
            values["versions_dir"] = cache_root() / "versions" / values["namespace"] / values["job"]
        return cls(**values)


class ContinualRuntime:
    def __init__(
        self,
        loop: EngineLoop,
        engine: Any,
        settings: RuntimeSettings,
        training: TrainerSettings,
        *,
        model_path: Path,
        registry: CollectorRegistry | None = None,
        timings: ControlTimings | None = None,
    ) -> None:
        self.loop = loop
        self.engine = engine
        self.settings = settings
        self.training = training
        model = engine.training_model
        recording_store = engine.activation_store
        if recording_store is None:  # recording off: every sample is recomputed
            recording_store = ActivationStore(StoreConfig(device=str(engine.device)))
        self.activations: ActivationStore = recording_store
        # An engine that serves from its own tensors (vLLM) gets versions published into them; the trainer's
        # fully fine-tuned weights are then a copy of their own, never the tensors being served.
        self.weights = TrainableWeights(
            model,
            training,
            base_model=str(model_path),
            separate_training_copy=getattr(engine, "served", None) is not None,
        )
        self.weights.use_serving()  # serve the base model (or what the follower loads) until told otherwise
        dp = settings.data_parallel
        trainer_class = ContinualTrainer if dp is None else DataParallelTrainer
        self.trainer = trainer_class(model, self.weights, self.activations, training, settings.replica)
        self.co_scheduler = CoScheduler(training)
        self.metrics = TrainingMetrics(registry)
        self.redis = connect(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)  # rediss: TLS
        keys = JobKeys(settings.namespace, settings.job, settings.feedback_stream or None)
        self.store = JobStore(self.redis, keys)
        tokenizer = engine.tokenizer
        inner = getattr(tokenizer, "inner", None)
        self._encode_text = (
            (lambda text: inner.encode(text, add_special_tokens=False))
            if inner is not None
            else tokenizer.encode
        )
        eos_ids = sorted(tokenizer.eos_token_ids)
        self._end_token = getattr(inner, "eos_token_id", None) if inner is not None else None
        if self._end_token is None and eos_ids:
            self._end_token = eos_ids[0]
        self.consumer = FeedbackConsumer(
            self.redis,
            keys,
            ConsumerSettings(
                consumer=settings.replica,
                max_held=settings.feedback_max_held,
                claim_idle_ms=settings.feedback_claim_idle_ms,
                stream_max_len=settings.feedback_stream_max_len,
                dead_letter_max_len=settings.dead_letter_max_len,
                dead_letter_field_bytes=settings.dead_letter_field_bytes,
                trained_horizon_s=settings.trained_horizon_s,
            ),
            stream_client=self.store.stream_client,  # entries are read as bytes (redis_connection)
        )
        # The most tokens one sample may have: what the model attends over, and what a step may hold.
        self.max_sample_tokens = min(engine.max_model_len, training.batch_tokens)
        self.resolver = resolver = SampleResolver(
            self.store,
            self._encode_text,
            eos_ids,
            max_tokens=self.max_sample_tokens,
            end_token=self._end_token,
            train_rejections=trains_rejections(training.objective),
        )
        self.directory = VersionDirectory(settings.versions_dir)
        self.version_storage = version_storage(self.directory, self.store, settings.replica)
        # A set that cannot be read stops the worker here, with the file and line: without it every version
        # would roll out unjudged.
        self.gate_metrics = GateMetrics(self.metrics.registry)
        self.trainer.evaluation = CandidateEvaluation.load(
            settings.evaluation,
            self._encode_text,
            tokenizer.apply_chat_template,
            engine.max_model_len,
            self.gate_metrics,
        )
        self.engine_side = EngineSide(loop, self.trainer, self.co_scheduler, on_step_done=lambda done: None)
        control_class: Any = TrainingControl
        if dp is not None:
            group = TrainingGroupStore(self.redis, keys)
            control_class = partial(DataParallelControl, data_parallel=dp, group=group)
        self.control = control_class(
            store=self.store,
            consumer=self.consumer,
            resolver=resolver,
            directory=self.directory,
            publisher=VersionPublisher(
                self.directory,
                self.store,
                settings.replica,
                training.keep_versions,
                uploader=self.version_storage.uploader,
            ),
            lease=TrainerLease(self.redis, keys, settings.replica, settings.lease_ttl_s),
            follower=RolloutFollower(
                self.store, settings.replica, settings.follow, self.version_storage.available
            ),
            heartbeat=Heartbeat(self.store, settings.replica, settings.heartbeat_s),
            engine_side=self.engine_side,
            trainer=self.trainer,
            weights=self.weights,
            settings=training,
            metrics=self.metrics,
            model_config=model_path / "config.json" if (model_path / "config.json").is_file() else None,
            timings=timings
            or ControlTimings(heartbeat_s=settings.heartbeat_s, lease_s=settings.lease_ttl_s / 3),
            duties=ControlDuties(self.metrics.registry, stall_s=settings.control_stall_s),
        )
        self.scores = ScoreQueue(
            loop,
            yield_at_modules=list(model.layers),
            device=torch.device(str(engine.device)),
            slice_s=training.slice_ms / 1000.0,
            idle_slice_s=training.idle_slice_ms / 1000.0,
        )
        self.engine_side.on_step_done = self.control.on_step_done
        self.engine_side.on_slice = self.metrics.slice_seconds.observe
        self.engine_side.on_yield = self.metrics.yields.inc
        self.metrics.version.labels(role="serving").set(engine.weight_version)
        self._attached = False

    def start(self) -> None:
        if not self._attached:
            self.engine_side.attach()
            self.scores.attach()
            self._attached = True
        self.control.start()

    def stop(self) -> None:
        self.control.stop()
        self.store.close()

    def readiness_problem(self) -> str | None:
        """Why this replica should not receive traffic (a control duty failing or stuck), or None; /readyz."""
        return self.control.duties.problem()

    # Scoring: in slices between engine iterations (scoring.py).
    def score(self, prompt: list[int], continuation: list[int]) -> tuple[float, int]:
        """Summed log-probability of `continuation` after `prompt` under the served weights, and their version."""
        return self.submit_score(prompt, continuation).result(timeout=120)

    def submit_score(self, prompt: list[int], continuation: list[int]) -> Future[tuple[float, int]]:
        """Queues a score (raises ScoreQueueFull when too many wait); a version switch midway restarts it."""

        def work() -> tuple[float, int]:
            while True:
                version = int(self.engine.weight_version)
                logprob, _ = self._score(prompt, continuation)
                if self.engine.weight_version == version:
                    return logprob, version

        return self.scores.submit(work)

    def _score(self, prompt: list[int], continuation: list[int]) -> tuple[float, int]:
        logprob = continuation_logprob(self.engine.training_model, self.engine.device, prompt, continuation)
        return logprob, int(self.engine.weight_version)

    def continuation_tokens(self, text: str) -> list[int]:
        """How a correction becomes training tokens: the text, then the end-of-turn token."""
        tokens = list(self._encode_text(text))
        if self._end_token is not None:
            tokens.append(self._end_token)
        return tokens

    def sample_tokens(self, record: RequestRecord, feedback: Feedback) -> int:
        """How many tokens the feedback's training sample will have (what the resolver will build)."""
        return len(record.prompt_tokens) + len(self.resolver.response_tokens(record, feedback.correction))

    def routers(self, offload: Offload | None = None) -> list[APIRouter]:
        """`offload` runs tokenization off the event loop (the server's bounded tokenizer pool)."""
        client = FeedbackClient(
            self.redis, self.store.keys, idempotency_ttl_s=self.settings.trained_horizon_s
        )
        tokenizer = self.engine.tokenizer
        files = self.version_storage.router
        return [
            *([files] if files is not None else []),
            feedback_router(
                client,
                self.store,
                max_backlog=self.settings.feedback_max_backlog,
                backlog=lambda: self.consumer.lag().entries,
                record_grace_s=self.settings.feedback_record_grace_s,
                sample_tokens=self.sample_tokens,
                max_sample_tokens=self.max_sample_tokens,
                offload=offload,
            ),
            continual_router(
                self.store,
                self.control.status,
                self.submit_score,
                encode_prompt=tokenizer.encode,
                encode_chat=tokenizer.apply_chat_template,
                encode_continuation=self.continuation_tokens,
                max_model_len=self.engine.max_model_len,
                offload=offload,
            ),
        ]
