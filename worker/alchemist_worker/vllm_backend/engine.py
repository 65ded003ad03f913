"""`VllmEngine`: vLLM's engine, in this process, behind the `ServingEngine` interface, recording at prefill.

vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with async scheduling off, so a returned `step()`
means nothing is in flight: the boundary where training slices and weight switches run. It serves our model
class (model.py), records prefills into the same activation store as the native engine (step_recording.py),
and gives the trainer a native `Transformer` made of views of its weights (weight_views.py).

What the engine keeps for itself, so both engines behave the same through the API: prompts arrive as token ids,
vLLM only samples (`ignore_eos`, no detokenization); end-of-sequence, stop ids and stop strings, streaming text
and finish reasons are decided here exactly as in the native engine, and a request we stop is aborted in vLLM.

Weight switches follow the native contract (serving_engine.py): requests that arrive while a switch is pending
wait here, in-flight ones finish on their version, then the switch is applied with nothing in flight and the
adapter buffers (or, under full fine-tuning, the served weights) are overwritten in place. Every request carries
a prefix-cache salt naming its version, so cached KV of one version is never read under another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alchemist_worker.activations.policy import parse_policy
from alchemist_worker.activations.records import SequenceRecord
from alchemist_worker.activations.store import ActivationStore
from alchemist_worker.cache_dir import cache_root
from alchemist_worker.engine.config import EngineConfig, EngineConfigError
from alchemist_worker.engine.detokenizer import IncrementalDetokenizer
from alchemist_worker.engine.generation_rules import check_prompt, notify_finished, stop_reason
from alchemist_worker.engine.llm_engine import DEFAULT_MAX_MODEL_LEN, resolve_device, resolve_dtype
from alchemist_worker.engine.recording import RecordingStats, RecordSampler
from alchemist_worker.engine.sequence import FinishReason, TokenLogprob
from alchemist_worker.engine.serving_engine import (
    EngineStats,
    FinishedRequest,
    FinishedRequestObserver,
    GenerationRequest,
    RequestOutput,
    WeightSwitch,
)
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.vllm_backend.runner_hooks import (
    check_runner,
    check_scheduler,
    check_version,
    count_preemptions,
    install_hooks,
    unwrap_model,
)
from alchemist_worker.vllm_backend.sampling import token_logprobs, vllm_sampling_params
from alchemist_worker.vllm_backend.served_weights import ServedWeights
from alchemist_worker.vllm_backend.step_recording import PromptRecording, StepRecording, runner_layout

log = logging.getLogger(__name__)

# Set before vLLM is imported; see the module docstring and runner_hooks.py for why.
VLLM_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class _Request:
    """One request handed to vLLM: what the API needs back, decided here as the native engine does."""

    request: GenerationRequest
    version: int
    detokenizer: IncrementalDetokenizer
    recording: PromptRecording | None
    internal_id: str = ""
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        return self.recording is not None and self.recording.done


def compile_cache_dir(variant: Any) -> Path:
    """A compile-cache folder per model variant (adapter shape, weight layout): graphs compiled for one
    never load for another."""
    digest = hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "vllm-compile" / digest


class VllmEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        recording: StoreRecording | None = None,
        weight_version: int = 0,
        adapter: dict[str, Any] | None = None,
        compile: bool = True,
        own_model_class: bool = True,
        share_weights: bool = True,
    ) -> None:
        """`share_weights`: the trainer computes on views of the served weights (`training_model`); off, vLLM
        may repack them for its CPU kernels and nothing can train (serving, recording and benchmarks only)."""
        for name, value in VLLM_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        check_version()
        from vllm import EngineArgs, ModelRegistry
        from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine

        from alchemist_worker.vllm_backend.model import (
            ADAPTER_CONFIG_KEY,
            ARCHITECTURE,
            RECORD_KEY,
            SHARE_WEIGHTS_KEY,
        )

        if config.recording.enabled and recording is None:
            raise EngineConfigError(f"recording policy {config.recording.policy!r} needs an activation store")
        if recording is not None and not own_model_class:
            raise EngineConfigError("recording needs the engine's own model class (own_model_class=True)")
        self.config = config
        self.model_name = config.model_name
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = ServingTokenizer.from_pretrained(config.model, self.model_config.eos_token_ids)
        overrides: dict[str, Any] = {}
        if own_model_class:
            ModelRegistry.register_model(ARCHITECTURE, f"{__package__}.model:{ARCHITECTURE}")
            overrides = {
                "architectures": [ARCHITECTURE],
                ADAPTER_CONFIG_KEY: adapter,
                SHARE_WEIGHTS_KEY: share_weights,
                RECORD_KEY: recording is not None,
            }
        if config.cpu_threads and self.device.type == "cpu":
            os.environ.setdefault("OMP_NUM_THREADS", str(config.cpu_threads))
        options: dict[str, Any] = dict(
            model=str(config.model),
            skip_tokenizer_init=True,
            dtype=str(dtype).removeprefix("torch."),
            # as the native engine: the configured length, else the model's capped at 4096, never past the model's
            max_model_len=min(
                config.max_model_len or min(self.model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN),
                self.model_config.max_position_embeddings,
            ),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory_bytes=config.kv_cache_bytes,
            seed=config.seed,
            enforce_eager=not compile,
            async_scheduling=False,
            enable_prefix_caching=True,
        )
        if overrides:
            options["hf_overrides"] = overrides
        if compile:
            # vLLM's compile-cache keys (its AOT artifacts' too) miss hf_overrides, so two variants of the model
            # (vLLM's class or ours, adapter shape, weight layout) could load each other's graphs: one root each.
            cache = compile_cache_dir(overrides or "stock")
            os.environ["VLLM_CACHE_ROOT"] = str(cache)
            # vLLM 0.32's AOT artifacts do not load back with this torch ("'function' object has no attribute
            # 'finalize_loading'"), so every start compiled again; without AOT, Inductor's graph cache loads.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            options["compilation_config"] = {"cache_dir": str(cache / "torch_compile_cache")}
        self.llm = VllmLLMEngine.from_engine_args(EngineArgs(**options))
        client: Any = self.llm.engine_core  # in-process client: it holds the EngineCore itself
        core = client.engine_core
        self._scheduler = core.scheduler
        check_scheduler(self._scheduler)
        self._preemptions = count_preemptions(self._scheduler)
        runner = core.model_executor.driver_worker.worker.model_runner
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.served_model = unwrap_model(runner)
        self.served: ServedWeights | None = None
        if own_model_class:
            check_runner(runner)
            install_hooks(runner, self.served_model, lambda output: self._plan_step(output))
            if share_weights:
                self.served = ServedWeights(self.served_model, self.model_config)
        self._runner = runner
        self.recording = recording
        self.policy = parse_policy(config.recording.policy) if recording is not None else None
        self.record_sampler = RecordSampler(config.recording)
        self.weight_version = weight_version
        self._requests: dict[str, _Request] = {}
        self._by_internal: dict[str, _Request] = {}
        self._held: deque[_Request] = deque()
        self._finished: list[RequestOutput] = []
        self._observers: list[FinishedRequestObserver] = []
        self._pending_switch: WeightSwitch | None = None
        self._switch_requested_at = 0.0
        self._prompt_tokens = 0
        self._generated_tokens = 0

    # What the trainer uses -----------------------------------------------------------------------------

    @property
    def training_model(self) -> torch.nn.Module:
        """The native model the trainer computes on: views of the served weights (one copy of the base)."""
        if self.served is None:
            raise EngineConfigError("training needs the engine's own model class sharing its weights")
        return self.served.model

    @property
    def activation_store(self) -> ActivationStore | None:
        return self.recording.store if self.recording is not None else None

    @property
    def switch_pending(self) -> bool:
        return self._pending_switch is not None

    # ServingEngine -------------------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        prompt = list(request.prompt_token_ids)
        check_prompt(prompt, request.params, self.max_model_len, self.model_config.vocab_size)
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id} is already in flight")
        record = self.recording is not None and self.record_sampler.decide(request.record)
        state = _Request(
            request=request,
            version=self.weight_version,
            detokenizer=IncrementalDetokenizer(self.tokenizer.decode, prompt, request.params.stop),
            recording=PromptRecording(request.request_id, len(prompt), self.weight_version)
            if record
            else None,
        )
        self._requests[request.request_id] = state
        if self._pending_switch is not None:
            self._held.append(state)
        else:
            self._submit(state)

    def abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        if state in self._held:
            self._held.remove(state)
        else:
            self.llm.abort_request([request_id])
        self._finished.append(self._finish(state, FinishReason.ABORT))

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._finished) or self._pending_switch is not None

    def add_finished_observer(self, observer: FinishedRequestObserver) -> None:
        self._observers.append(observer)

    def request_weight_switch(self, switch: WeightSwitch) -> None:
        if switch.version == self.weight_version:
            raise ValueError(
                f"weight version {switch.version} is not newer than {self.weight_version}: it is served"
            )
        self._pending_switch = switch
        self._switch_requested_at = time.monotonic()

    def step(self) -> list[RequestOutput]:
        self._apply_pending_switch()
        outputs, self._finished = self._finished, []
        if not self.llm.has_unfinished_requests():
            return outputs
        for out in self.llm.step():
            state = self._requests.get(out.request_id)
            if state is None:  # finished here already (a stop we aborted in vLLM)
                continue
            outputs.append(self._postprocess(state, out))
        return outputs

    def stats(self) -> EngineStats:
        rec = self.recording.stats() if self.recording is not None else RecordingStats()
        pool = self._scheduler.kv_cache_manager.block_pool
        return EngineStats(
            num_waiting=len(self._scheduler.waiting) + len(self._held),
            num_running=len(self._scheduler.running),
            kv_blocks_used=pool.num_gpu_blocks - pool.get_num_free_blocks(),
            kv_blocks_total=pool.num_gpu_blocks,
            num_preemptions=self._preemptions[0],
            prompt_tokens_total=self._prompt_tokens,
            generated_tokens_total=self._generated_tokens,
            weight_version=self.weight_version,
            switch_pending_s=(
                time.monotonic() - self._switch_requested_at if self._pending_switch is not None else 0.0
            ),
            recorded_requests_total=rec.recorded_requests,
            recorded_bytes_by_tier=dict(rec.bytes_by_tier),
            records_evicted_total=rec.evicted,
        )

    # Internals -------------------------------------------------------------------------------------------

    def _submit(self, state: _Request) -> None:
        from vllm.inputs import TokensPrompt

        request = state.request
        prompt = list(request.prompt_token_ids)
        state.version = self.weight_version
        if state.recording is not None:
            state.recording.version = self.weight_version
        max_tokens = min(request.params.max_tokens, self.max_model_len - len(prompt))
        params = vllm_sampling_params(request.params, max_tokens, state.recording is not None)
        salt = self.cache_salt(self.weight_version)
        state.internal_id = self.llm.add_request(
            request.request_id, TokensPrompt(prompt_token_ids=prompt, cache_salt=salt), params
        )
        self._by_internal[state.internal_id] = state
        self._prompt_tokens += len(prompt)

    @staticmethod
    def cache_salt(version: int) -> str:
        """Prefix-cache entries are keyed by this too: KV computed under one version never serves another."""
        return f"alchemist-weights-v{version}"

    def _plan_step(self, scheduler_output: Any) -> StepRecording | None:
        """Runner hook: the step's recording, or None when no scheduled request is a prompt still to record."""
        if self.recording is None or self.policy is None:
            return None
        prompts = {}
        for internal_id in scheduler_output.num_scheduled_tokens:
            state = self._by_internal.get(internal_id)
            if state is not None and state.recording is not None and not state.recording.done:
                prompts[internal_id] = state.recording
        if not prompts:
            return None
        return StepRecording(
            self.policy,
            self.model_config,
            prompts,
            layout_of=lambda: runner_layout(self._runner),
            on_complete=self._store_record,
            record_dtype=self.recording.record_dtype,
        )

    def _store_record(self, response_id: str, record: SequenceRecord) -> None:
        assert self.recording is not None
        self.recording.store.put(response_id, record)
        self.recording.recorded += 1

    def _apply_pending_switch(self) -> None:
        switch = self._pending_switch
        if switch is None or self.llm.has_unfinished_requests():
            return
        switch.apply()
        if self.served is not None:
            self.served.publish()
        log.info(
            "switched weights %d -> %d after %.3f s",
            self.weight_version,
            switch.version,
            time.monotonic() - self._switch_requested_at,
        )
        self.weight_version = switch.version
        self._pending_switch = None
        while self._held:
            self._submit(self._held.popleft())

    def _postprocess(self, state: _Request, out: Any) -> RequestOutput:
        completion = out.outputs[0]
        new_ids = list(completion.token_ids)
        params = state.request.params
        logprobs = token_logprobs(new_ids, completion.logprobs, params.logprobs)
        reason: FinishReason | None = None
        emitted: list[int] = []
        for token_id in new_ids:
            emitted.append(token_id)
            state.output_token_ids.append(token_id)
            self._generated_tokens += 1
            reason = stop_reason(
                token_id,
                params,
                self.tokenizer.eos_token_ids,
                state.detokenizer,
                num_output_tokens=len(state.output_token_ids),
                num_tokens=len(state.request.prompt_token_ids) + len(state.output_token_ids),
                max_model_len=self.max_model_len,
            )
            if reason is not None:
                break
        if reason is None and out.finished:  # vLLM ended it on its own (e.g. its own length limit)
            reason = FinishReason.LENGTH
        if reason is not None:
            if not out.finished:
                self.llm.abort_request([state.request.request_id])
            return self._finish(state, reason, emitted, logprobs[: len(emitted)])
        return RequestOutput(
            request_id=state.request.request_id,
            new_token_ids=emitted,
            new_text=state.detokenizer.take_stream_delta(finished=False),
            new_logprobs=logprobs,
            finished=False,
            finish_reason=None,
            num_prompt_tokens=len(state.request.prompt_token_ids),
            num_output_tokens=len(state.output_token_ids),
            weight_version=state.version,
            recorded=state.recorded,
        )

    def _finish(
        self,
        state: _Request,
        reason: FinishReason,
        new_tokens: list[int] | None = None,
        new_logprobs: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        request = state.request
        self._requests.pop(request.request_id, None)
        self._by_internal.pop(state.internal_id, None)
        if reason is not FinishReason.ABORT:
            state.detokenizer.flush()
        if state.internal_id:  # it reached vLLM: it has a version and maybe a record
            finished = FinishedRequest(
                request_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                output_token_ids=list(state.output_token_ids),
                weight_version=state.version,
                recorded=state.recorded,
                finish_reason=reason,
            )
            notify_finished(self._observers, finished)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens or [],
            new_text=state.detokenizer.take_stream_delta(finished=True),
            new_logprobs=new_logprobs or [],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(state.output_token_ids),
            weight_version=state.version,
            recorded=state.recorded,
        )
