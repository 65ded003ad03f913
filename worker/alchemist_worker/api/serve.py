"""`alchemist-worker serve`: builds the engine, its loop, the recording hooks and the HTTP server, and runs them.

Graceful shutdown. On the first SIGTERM (or SIGINT) the server stops admitting: /readyz turns 503 so the
Service stops routing here, and new generation requests get 503. In-flight requests keep running until they
finish or `shutdown_timeout_s` passes; then the rest are aborted (their clients get what was generated, with
finish_reason "abort"). Then uvicorn closes the listener, lets open responses flush, and the process exits
with status 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from alchemist_protocol.log_format import configure_logging
from alchemist_worker.api.auth import AccessKeys
from alchemist_worker.api.metrics import ServingMetrics
from alchemist_worker.api.request_records import RedisRequestRecords
from alchemist_worker.api.serve_settings import ServeSettings
from alchemist_worker.api.server import ServerState, build_app
from alchemist_worker.api.tokenizer_pool import TokenizerPool
from alchemist_worker.continual.runtime import ContinualRuntime, RuntimeSettings
from alchemist_worker.continual.settings import Method, TrainerSettings
from alchemist_worker.engine.engine_loop import EngineLoop
from alchemist_worker.engine.llm_engine import LLMEngine, resolve_device
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0  # after the engine drained: time for open responses to finish sending


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the engine before the listener closes."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._aborted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is not None:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        log.info("draining: no new requests; %d in flight", self.state.loop.num_in_flight)
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self.state.loop.num_in_flight == 0:
                log.info("drained; shutting down")
                self.should_exit = True
            elif time.monotonic() > self._drain_deadline and not self._aborted:
                log.warning("shutdown deadline passed; aborting %d requests", self.state.loop.num_in_flight)
                self.state.loop.abort_all()
                self._aborted = True
        return await super().on_tick(counter)


@dataclass
class Worker:
    """Everything `serve` runs, built but not started (tests start it in a thread)."""

    settings: ServeSettings
    engine: Any  # a ServingEngine that can also train (LLMEngine or VllmEngine)
    loop: EngineLoop
    state: ServerState
    server: DrainingServer
    records: RedisRequestRecords | None
    runtime: ContinualRuntime | None = None  # the continual trainer, when Redis is configured

    def run(self) -> None:
        """Blocks until shut down; stops the engine loop and flushes request records on the way out."""
        if self.runtime is not None:
            self.runtime.start()
        self.loop.start()
        if self.records is not None:
            self.records.start()
        try:
            self.server.run()
        finally:
            if self.runtime is not None:
                self.runtime.stop()
            self.loop.stop()
            self.state.tokenizer_pool.shutdown()
            if self.records is not None:
                self.records.stop()


def build_engine(settings: ServeSettings, training: TrainerSettings | None) -> Any:
    """The serving engine `settings.engine` names; vLLM gets adapter buffers when the trainer uses LoRA."""
    config = settings.engine_config()
    recording = None
    if config.recording.enabled:
        device = str(resolve_device(config.device))
        model_config = ModelConfig.from_pretrained(config.model)
        recording = StoreRecording.from_config(config.recording, model_config, device)
    if settings.engine == "native":
        return LLMEngine.from_config(config, recording=recording, weight_version=settings.weight_version)
    from alchemist_worker.vllm_backend.engine import VllmEngine  # raises a usage error without vLLM

    adapter = None
    if training is not None and training.method is Method.LORA:
        adapter = {"rank": training.lora_rank, "target_modules": list(training.lora_target_modules)}
    return VllmEngine(
        config,
        recording=recording,
        weight_version=settings.weight_version,
        adapter=adapter,
        compile=settings.vllm_compile,
        own_model_class=settings.vllm_model_class == "alchemist",
        share_weights=settings.vllm_share_weights or training is not None,  # the trainer computes on them
    )


def build_worker(settings: ServeSettings) -> Worker:
    # The trainer's settings come first: a vLLM engine sizes its adapter buffers from them.
    training = TrainerSettings.from_env() if settings.redis_url else None
    engine = build_engine(settings, training)
    config = settings.engine_config()
    loop = EngineLoop(engine)
    metrics = ServingMetrics(loop)
    loop.add_step_observer(metrics.observe_step)
    records = None
    if settings.redis_url:
        from alchemist_protocol.job_store import JobStore

        records = RedisRequestRecords(
            JobStore.from_url(
                settings.redis_url, settings.namespace, settings.job, settings.feedback_stream or None
            ),
            replica=settings.replica,
            model=engine.model_name,
            ttl_s=settings.request_ttl_s,
            on_failure=metrics.redis_write_failures.inc,
        )
        engine.add_finished_observer(records)
    state = ServerState(loop, metrics, tokenizer_pool=TokenizerPool(settings.tokenizer_threads))
    app = build_app(state, keys=AccessKeys.from_env(), max_body_bytes=settings.max_body_bytes)
    runtime = None
    if settings.redis_url and getattr(engine, "served", True) is None:
        raise ValueError("the stock vLLM model class serves only: drop ALCHEMIST_REDIS_URL or use alchemist")
    if settings.redis_url:  # feedback, training, versions and rollout all go through Redis
        runtime = ContinualRuntime(
            loop,
            engine,
            RuntimeSettings.from_env(
                redis_url=settings.redis_url,
                namespace=settings.namespace,
                job=settings.job,
                feedback_stream=settings.feedback_stream or None,
                replica=settings.replica,
                request_ttl_s=settings.request_ttl_s,  # trained feedback ids must be remembered longer
            ),
            training or TrainerSettings.from_env(),
            model_path=config.model,
            registry=metrics.registry,
        )
        for router in runtime.routers(offload=state.tokenizer_pool.run):
            app.include_router(router)
        state.readiness_checks.append(runtime.readiness_problem)
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(FLUSH_TIMEOUT_S),
        access_log=settings.log_level == "debug",
        # JSON lines: uvicorn's loggers go through the root handler instead of its own text handlers.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    return Worker(
        settings,
        engine,
        loop,
        state,
        DrainingServer(uv_config, state, settings.shutdown_timeout_s),
        records,
        runtime,
    )


def serve(settings: ServeSettings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    worker = build_worker(settings)
    log.info(
        "serving %s with the %s engine on %s:%d (KV cache %d blocks, recording %s)",
        worker.engine.model_name,
        settings.engine,
        settings.host,
        settings.port,
        worker.engine.stats().kv_blocks_total,
        settings.record_policy,
    )
    worker.run()
    return 0
