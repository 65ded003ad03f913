"""Recording inside vLLM's prefill: which rows of a step's flat batch belong to which recorded prompt.

vLLM flattens the tokens of every scheduled request into one batch: request i owns rows
`query_start_loc[i]:query_start_loc[i+1]`, starting at position `num_computed_tokens[i]`. A prompt may arrive
in chunks over several steps (chunked prefill), share a step with other prompts and with decodes, and be
prefilled again after preemption (then over its output tokens too). `PromptRecording` follows one recorded
prompt across steps; `StepRecording` is the recorder of one step: it lays the prompt chunks of that step out for
a `PrefillRecorder`, and on commit appends each chunk to its prompt. A prompt whose chunks cover it from position
0 goes into the activation store under its response id, the same record the native engine makes except for the
softmax log-sum-exp of `selective` and `full`: vLLM's attention does not return it, and computing it again in the
step cost a second attention forward (about 10% of the step on CPU), so it is deferred to the trainer, which
computes it for the few records that ever get feedback (training/replay.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from alchemist_worker.activations.policy import RecordingPolicy
from alchemist_worker.activations.recorder import PrefillRecorder
from alchemist_worker.activations.records import SequenceRecord, concat_records
from alchemist_worker.model.config import ModelConfig
from alchemist_worker.model.layer_activations import LayerActivations


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


class StepRecording:
    """The recorder of one vLLM step (a `Recorder`, plus the log-sum-exp it computes for the model)."""

    def __init__(
        self,
        policy: RecordingPolicy,
        config: ModelConfig,
        prompts: dict[str, PromptRecording],
        layout_of: Callable[[], BatchLayout],
        on_complete: Callable[[str, SequenceRecord], None],
        copy_stream: torch.cuda.Stream | None = None,
        record_dtype: torch.dtype | None = None,
    ) -> None:
        self.policy = policy
        self.record_dtype = record_dtype  # None: the model's dtype
        self.config = config
        self.prompts = prompts  # internal request id -> its recording, for the requests of this step
        self.layout_of = layout_of  # read once the runner has prepared the step
        self.on_complete = on_complete  # (response id, record) of each prompt whose record is complete
        self.copy_stream = copy_stream  # CUDA: record copies run beside the forward
        self.layout: BatchLayout | None = None
        self._prefill: PrefillRecorder | None = None
        self._segments: list[tuple[int, int, PromptRecording]] = []  # kept rows [start, end) and their prompt

    def recorder(self, input_ids: Tensor, positions: Tensor) -> StepRecording:
        """Called by the model at the start of the step's forward, when the layout is final."""
        layout = self.layout = self.layout_of()
        total = int(input_ids.shape[0])
        cuts, keep, starts = [0], [], []
        for i, req_id in enumerate(layout.req_ids):
            prompt = self.prompts.get(req_id)
            begin, end = layout.query_start_loc[i], layout.query_start_loc[i + 1]
            start = layout.num_computed[i]
            if prompt is None or not prompt.wants(start):
                continue
            rows = min(end - begin, prompt.prompt_len - start)
            if begin > cuts[-1]:
                cuts.append(begin)
                keep.append(False)
                starts.append(0)
            cuts.append(begin + rows)
            keep.append(True)
            starts.append(start)
            self._segments.append((begin, begin + rows, prompt))
        if cuts[-1] < total:
            cuts.append(total)
            keep.append(False)
            starts.append(0)
        versions = {p.version for _, _, p in self._segments}
        if len(versions) > 1:
            raise RuntimeError(f"one step holds prompts of weight versions {sorted(versions)}")
        self._prefill = PrefillRecorder(
            self.policy,
            cuts,
            input_ids,
            num_layers=self.config.num_layers,
            version=versions.pop() if versions else 0,
            qk_norm=self.config.qk_norm,
            keep=keep,
            start_positions=starts,
            copy_stream=self.copy_stream,
            defer_lse=True,
            record_dtype=self.record_dtype,
        )
        return self

    # Recorder -------------------------------------------------------------------------------------------

    @property
    def wants_lse(self) -> bool:
        return False  # deferred to the trainer

    @property
    def fields(self) -> tuple[str, ...]:
        """The `LayerActivations` fields this step keeps (the model copies only these where it must)."""
        return tuple(f for f in self.policy.fields(self.config.qk_norm) if f != "lse")

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        if self._prefill is None:
            raise RuntimeError("record_layer() before recorder(): the forward was not started by the model")
        self._prefill.record_layer(layer, activations)

    # After the forward ---------------------------------------------------------------------------------

    def finish(self) -> None:
        """After the forward: appends this step's chunks to their prompts and hands over completed records."""
        if self._prefill is None:  # the step ran no forward (nothing scheduled)
            return
        kept = [r for r in self._prefill.records() if r is not None]
        for (_, _, prompt), chunk in zip(self._segments, kept, strict=True):
            prompt.chunks.append(chunk)
            if prompt.next_position >= prompt.prompt_len:
                record = concat_records(prompt.chunks)
                prompt.chunks = []
                prompt.done = True
                self.on_complete(prompt.response_id, record)
