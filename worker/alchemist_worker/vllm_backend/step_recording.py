"""Recording inside vLLM's prefill: which rows of a step's flat batch belong to which recorded prompt.

vLLM flattens the tokens of every scheduled request into one batch: request i owns rows
`query_start_loc[i]:query_start_loc[i+1]`, starting at position `num_computed_tokens[i]`. A prompt may arrive
in chunks over several steps (chunked prefill), share a step with other prompts and with decodes, and be
prefilled again after preemption (then over its output tokens too). `PromptRecording` follows one recorded
prompt across steps; `StepRecording` is the recording of one step: it finds the rows of each prompt chunk of
that step, gives each chunk a `PrefillRecorder`, and after the forward appends each chunk to its prompt. A prompt whose chunks cover it from position
0 goes into the activation store under its response id, the same record the native engine makes except for the
softmax log-sum-exp of `selective` and `full`: vLLM's attention does not return it, and computing it again in the
step cost a second attention forward (about 10% of the step on CPU), so it is deferred to the trainer, which
computes it for the few records that ever get feedback (training/replay.py).

The layers hand their tensors over through the `alchemist::record` op (record_op.py), in three parts per layer,
from inside vLLM's compiled code. Each part is copied at once, rows of each recorded prompt apart and only the
fields the policy keeps (compiled code reuses intermediate buffers and writes some tensors in place, so a
reference would not stay valid). The copies are the record's tensors as they are (each prompt chunk's own rows, in
the record's dtype), so the chunk's record is built from them directly. The copies run on the current stream on
CUDA too: compiled code reuses buffers without the allocator, so a side stream could race with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.records import LayerTensors, SequenceRecord, concat_records
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.vllm_backend.record_op import PARTS


@dataclass
class PromptRecording:
    """One recorded request's prompt, recorded chunk by chunk; `done` once it is in the store (or abandoned)."""

    response_id: str
    prompt_len: int
    version: int
    chunks: list[SequenceRecord] = field(default_factory=list)
    done: bool = False

    @property
    def next_position(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def wants(self, start: int) -> bool:
        """Whether a prefill chunk starting at `start` is to be recorded (a restart at 0 begins again)."""
        if self.done or start >= self.prompt_len:
            return False
        if start == 0:
            self.chunks.clear()  # first prefill, or prefilled again after preemption before it completed
            return True
        return start == self.next_position


@dataclass(frozen=True)
class BatchLayout:
    """The flat batch of one step as the runner laid it out."""

    req_ids: list[str]
    query_start_loc: list[int]  # [num_reqs + 1]
    num_computed: list[int]  # [num_reqs] position of each request's first row


def runner_layout(runner: Any) -> BatchLayout:
    """Reads the layout from vLLM's V1 GPU/CPU model runner after it prepared the step's inputs."""
    batch = runner.input_batch
    n = batch.num_reqs
    return BatchLayout(
        req_ids=list(batch.req_ids[:n]),
        query_start_loc=[int(x) for x in runner.query_start_loc.np[: n + 1]],
        num_computed=[int(x) for x in batch.num_computed_tokens_cpu[:n]],
    )


@dataclass
class _Segment:
    """One recorded prompt chunk of the step: its rows [begin, end) of the flat batch, from prompt position
    `start`; its tokens (int64, on the CPU) and the copies of every layer handed over so far."""

    begin: int
    end: int
    start: int
    prompt: PromptRecording
    token_ids: Tensor
    layers: list[LayerTensors] = field(default_factory=list)


class StepRecording:
    """The recording of one vLLM step: `start` when the forward begins, `take` from the record op, `finish` after."""

    def __init__(
        self,
        policy: RecordingPolicy,
        config: ModelConfig,
        prompts: dict[str, PromptRecording],
        layout_of: Callable[[], BatchLayout],
        on_complete: Callable[[str, SequenceRecord], None],
        record_dtype: torch.dtype | None = None,
    ) -> None:
        self.policy = policy
        self.record_dtype = record_dtype  # None: the model's dtype
        self.config = config
        self.prompts = prompts  # internal request id -> its recording, for the requests of this step
        self.layout_of = layout_of  # read once the runner has prepared the step
        self.on_complete = on_complete  # (response id, record) of each prompt whose record is complete
        self.fields = frozenset(f for f in policy.fields(config.qk_norm) if f != "lse")  # lse: deferred
        self.layout: BatchLayout | None = None
        self._segments: list[_Segment] = []

    def start(self, input_ids: Tensor) -> None:
        """Called by the model before the step's forward, when the runner has laid the batch out."""
        layout = self.layout = self.layout_of()
        for i, req_id in enumerate(layout.req_ids):
            prompt = self.prompts.get(req_id)
            begin, end = layout.query_start_loc[i], layout.query_start_loc[i + 1]
            start = layout.num_computed[i]
            if prompt is None or not prompt.wants(start):
                continue
            rows = min(end - begin, prompt.prompt_len - start)
            with torch.inference_mode(False):  # the runner reuses its input buffer; training reads the copy
                token_ids = input_ids[begin : begin + rows].to("cpu", torch.int64, copy=True)
            self._segments.append(_Segment(begin, begin + rows, start, prompt, token_ids))
        versions = {segment.prompt.version for segment in self._segments}
        if len(versions) > 1:
            raise RuntimeError(f"one step holds prompts of weight versions {sorted(versions)}")

    def take(self, layer: int, part: int, tensors: Sequence[Tensor]) -> None:
        """From the record op: copies the kept fields of `PARTS[part]` ([T, ...] over the flat batch)."""
        if part == 0:
            for segment in self._segments:
                if len(segment.layers) != layer:
                    raise RuntimeError(
                        f"layer {layer} handed over after {len(segment.layers)} complete layers"
                    )
                segment.layers.append({})
        with torch.inference_mode(False), torch.no_grad():
            for name, tensor in zip(PARTS[part], tensors, strict=True):
                if name not in self.fields:
                    continue
                dtype = self.record_dtype or tensor.dtype
                for segment in self._segments:
                    segment.layers[layer][name] = tensor[segment.begin : segment.end].to(
                        dtype, memory_format=torch.contiguous_format, copy=True
                    )
        if part != len(PARTS) - 1:
            return
        for segment in self._segments:
            missing = self.fields - segment.layers[layer].keys()
            if missing:
                raise RuntimeError(f"layer {layer} handed over no {sorted(missing)}")

    def finish(self) -> None:
        """After the forward: appends this step's chunks to their prompts and hands over completed records."""
        for segment in self._segments:
            prompt = segment.prompt
            if len(segment.layers) != self.config.num_layers:
                raise RuntimeError(
                    f"{len(segment.layers)} of {self.config.num_layers} layers were recorded; did the forward run?"
                )
            prompt.chunks.append(
                SequenceRecord(
                    policy=self.policy,
                    version=prompt.version,
                    token_ids=segment.token_ids,
                    layers=segment.layers,
                    start_position=segment.start,
                    qk_norm=self.config.qk_norm,
                )
            )
            if prompt.next_position >= prompt.prompt_len:
                record = concat_records(prompt.chunks)
                prompt.chunks = []
                prompt.done = True
                self.on_complete(prompt.response_id, record)
