"""The native engine: `step()` = apply a pending weight switch, schedule, run, post-process.

It implements `ServingEngine`; see serving_engine.py for the contract and the weight-switch policy, and
scheduler.py for batching and preemption.
"""

from __future__ import annotations

import logging
import time

import torch

from alchemist_worker.activations.store import ActivationStore
from alchemist_worker.engine.block_manager import BlockManager, blocks_for
from alchemist_worker.engine.config import EngineConfig, EngineConfigError
from alchemist_worker.engine.detokenizer import IncrementalDetokenizer
from alchemist_worker.engine.fault_isolation import run_isolating_faults
from alchemist_worker.engine.generation_rules import check_prompt, notify_finished, stop_reason
from alchemist_worker.engine.model_runner import ModelRunner
from alchemist_worker.engine.paged_attention import KVCacheSpec
from alchemist_worker.engine.recording import PrefillRecording, RecordingStats, RecordSampler
from alchemist_worker.engine.scheduler import ScheduledBatch, Scheduler, StepKind
from alchemist_worker.engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from alchemist_worker.engine.serving_engine import (
    EngineStats,
    FinishedRequest,
    FinishedRequestObserver,
    GenerationRequest,
    RequestFailed,
    RequestOutput,
    WeightSwitch,
)
from alchemist_worker.engine.serving_tokenizer import ServingTokenizer
from alchemist_worker.engine.store_recording import StoreRecording
from alchemist_worker.model.checkpoint import load_model
from alchemist_worker.model.transformer import Transformer

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_KV_CACHE_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(f"device {name} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: Transformer,
        tokenizer: ServingTokenizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        recording: PrefillRecording | None = None,
        weight_version: int = 0,
    ) -> None:
        self.config = config
        self.model_name = config.model_name
        self.tokenizer = tokenizer
        model_config = model.config
        self.max_model_len = min(
            config.max_model_len or min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN),
            model_config.max_position_embeddings,
        )
        spec = KVCacheSpec(
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            config.block_size,
            dtype,
        )
        num_blocks = config.num_kv_blocks or spec.blocks_within(
            config.kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        )
        if num_blocks < blocks_for(self.max_model_len, config.block_size):
            raise EngineConfigError(
                f"the KV cache holds {num_blocks} blocks of {config.block_size} tokens "
                f"({num_blocks * spec.bytes_per_block} bytes) but one sequence of max_model_len "
                f"{self.max_model_len} needs {blocks_for(self.max_model_len, config.block_size)}: raise the KV "
                "budget or lower max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens or 2048, self.max_model_len),
            watermark_blocks=int(config.watermark * num_blocks),
        )
        self.runner = ModelRunner(
            model, block_size=config.block_size, num_blocks=num_blocks, device=device, dtype=dtype
        )
        if recording is not None and recording.policy != config.recording.policy:
            raise EngineConfigError(
                f"recording policy {recording.policy!r} differs from the configured {config.recording.policy!r}"
            )
        if config.recording.enabled and recording is None:
            raise EngineConfigError(f"recording policy {config.recording.policy!r} needs an activation store")
        self.recording = recording
        self.record_sampler = RecordSampler(config.recording)
        self.weight_version = weight_version
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[Sequence] = []
        self._observers: list[FinishedRequestObserver] = []
        self._pending_switch: WeightSwitch | None = None
        self._switch_requested_at = 0.0
        self._prompt_tokens = 0
        self._generated_tokens = 0

    @classmethod
    def from_config(
        cls, config: EngineConfig, recording: PrefillRecording | None = None, weight_version: int = 0
    ) -> LLMEngine:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        if config.cpu_threads:
            # On a shared or small CPU, fewer threads than cores avoids OpenMP threads waiting on each other.
            torch.set_num_threads(config.cpu_threads)
        torch.manual_seed(config.seed)
        model = load_model(config.model, dtype=dtype, device=device)
        tokenizer = ServingTokenizer.from_pretrained(config.model, model.config.eos_token_ids)
        return cls(
            config,
            model,
            tokenizer,
            device=device,
            dtype=dtype,
            recording=recording,
            weight_version=weight_version,
        )

    # What the trainer uses (the same names on every engine that can train) ---------------------------------

    @property
    def training_model(self) -> Transformer:
        """The model the trainer computes on: the serving model itself (adapters are double-buffered)."""
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def activation_store(self) -> ActivationStore | None:
        return self.recording.store if isinstance(self.recording, StoreRecording) else None

    @property
    def switch_pending(self) -> bool:
        return self._pending_switch is not None

    # ServingEngine -------------------------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        prompt = list(request.prompt_token_ids)
        check_prompt(prompt, request.params, self.max_model_len, self.runner.config.vocab_size)
        if self.scheduler.find(request.request_id) is not None:
            raise ValueError(f"request id {request.request_id} is already in flight")
        seq = Sequence(
            request.request_id,
            prompt,
            request.params,
            arrival_time=request.arrival_time,
            record=self.record_sampler.decide(request.record),
        )
        self.scheduler.add(seq)
        self._detokenizers[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer.decode, prompt, request.params.stop
        )

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.find(request_id)
        if seq is not None:
            self.scheduler.finish(seq, FinishReason.ABORT)
            self._aborted.append(seq)

    def has_unfinished(self) -> bool:
        """Work for `step()`: requests, aborts to report, or a weight switch waiting to be applied."""
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._pending_switch is not None

    def add_finished_observer(self, observer: FinishedRequestObserver) -> None:
        self._observers.append(observer)

    def request_weight_switch(self, switch: WeightSwitch) -> None:
        # An older version is allowed: that is a rollback. The version being served is not.
        if switch.version == self.weight_version:
            raise ValueError(
                f"weight version {switch.version} is not newer than {self.weight_version}: it is served"
            )
        self._pending_switch = switch
        self._switch_requested_at = time.monotonic()
        self.scheduler.admit_new = False

    def stats(self) -> EngineStats:
        rec = self.recording.stats() if self.recording is not None else RecordingStats()
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.total_preemptions,
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

    def step(self) -> list[RequestOutput]:
        self._apply_pending_switch()
        outputs = [self._finish(seq) for seq in self._aborted]
        self._aborted.clear()
        batch = self.scheduler.schedule()
        if batch is None:
            return outputs
        now = time.monotonic()
        for result in run_isolating_faults(self._run, batch):  # a failure fails only its own requests
            if result.error is not None:
                outputs.append(self._fail(result.seq, result.error))
                continue
            try:
                outputs.append(self._postprocess(result.seq, result.token_id, result.logprob, now))
            except Exception as exc:
                log.exception("post-processing request %s failed", result.seq.request_id)
                error = RequestFailed(f"generation failed for this request: {type(exc).__name__}: {exc}")
                outputs.append(self._fail(result.seq, error))
        return outputs

    # Internals -------------------------------------------------------------------------------------------

    def _apply_pending_switch(self) -> None:
        switch = self._pending_switch
        if switch is None or self.scheduler.has_in_flight():
            return
        switch.apply()
        log.info(
            "switched weights %d -> %d after %.3f s",
            self.weight_version,
            switch.version,
            time.monotonic() - self._switch_requested_at,
        )
        self.weight_version = switch.version
        self._pending_switch = None
        self.scheduler.admit_new = True

    def _run(self, batch: ScheduledBatch) -> tuple[list[int], list[TokenLogprob | None]]:
        if batch.kind is not StepKind.PREFILL:
            return self.runner.run(batch)
        cu = [0]
        input_ids: list[int] = []
        record_ids: list[str | None] = []
        for seq in batch.seqs:
            cu.append(cu[-1] + seq.num_tokens)
            input_ids.extend(seq.token_ids)
            if seq.weight_version is None:
                seq.weight_version = self.weight_version
                self._prompt_tokens += seq.num_prompt_tokens
            # Only a sequence's first prefill records (a recompute after preemption never does).
            wanted = seq.record and not seq.recorded and seq.num_output_tokens == 0
            record_ids.append(seq.request_id if wanted else None)
        if self.recording is None or not any(record_ids):
            return self.runner.run(batch)
        recorder = self.recording.begin(cu, input_ids, record_ids, self.weight_version)
        try:
            result = self.runner.run(batch, recorder)
        except BaseException:
            self.recording.discard(recorder)  # else every later recorded prefill finds it uncommitted
            raise
        self.recording.commit(recorder)
        for seq, record_id in zip(batch.seqs, record_ids, strict=True):
            seq.recorded = seq.recorded or record_id is not None
        return result

    def _postprocess(
        self, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float
    ) -> RequestOutput:
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
        self._generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        params = seq.params
        detok = self._detokenizers[seq.request_id]
        reason = stop_reason(
            token_id,
            params,
            self.tokenizer.eos_token_ids,
            detok,
            num_output_tokens=seq.num_output_tokens,
            num_tokens=seq.num_tokens,
            max_model_len=self.max_model_len,
        )
        if reason is not None:
            self.scheduler.finish(seq, reason)
            return self._finish(seq, [token_id], [logprob] if logprob is not None else [])
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            new_text=detok.take_stream_delta(finished=False),
            new_logprobs=[logprob] if logprob is not None else [],
            finished=False,
            finish_reason=None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            weight_version=seq.weight_version,
            recorded=seq.recorded,
        )

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Ends `seq` because of `error`: its blocks and state are freed, its caller gets the error."""
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq, FinishReason.ABORT)
        try:
            output = self._finish(seq)
        except Exception:  # it failed while finishing: what is left of its state goes now
            self._detokenizers.pop(seq.request_id, None)
            self.runner.release(seq.request_id)
            output = RequestOutput(
                seq.request_id, [], "", [], True, FinishReason.ABORT, seq.num_prompt_tokens,
                seq.num_output_tokens, seq.weight_version, seq.recorded,
            )  # fmt: skip
        output.error = error
        return output

    def _finish(
        self,
        seq: Sequence,
        new_tokens: list[int] | None = None,
        new_logprobs: list[TokenLogprob] | None = None,
    ) -> RequestOutput:
        """The last output of a finished (or aborted) sequence; tells observers and forgets its state."""
        detok = self._detokenizers.pop(seq.request_id)
        self.runner.release(seq.request_id)
        reason = seq.finish_reason or FinishReason.ABORT
        if reason is not FinishReason.ABORT:
            detok.flush()
        if seq.weight_version is not None:
            finished = FinishedRequest(
                request_id=seq.request_id,
                prompt_token_ids=list(seq.prompt_token_ids),
                output_token_ids=seq.output_token_ids,
                weight_version=seq.weight_version,
                recorded=seq.recorded,
                finish_reason=reason,
            )
            notify_finished(self._observers, finished)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens or [],
            new_text=detok.take_stream_delta(finished=True),
            new_logprobs=new_logprobs or [],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            weight_version=seq.weight_version,
            recorded=seq.recorded,
        )
