"""The exact reuse path: the gradient of the response loss from prefill records, without the prompt's forward.

1. Forward over the suffix only (last prompt token + response, see training/batch.py), without autograd. At
   each layer the suffix attends to the prompt's K/V taken from the record, and the layer's activations are
   kept (references to what the forward computed anyway, the fields of a `full` record). Each layer's record
   is brought to the device just before it is read and sent back right after (`LayerStreamer`), the next
   layer prefetched.
2. The loss over the response (final norm and vocabulary projection, under autograd) gives the gradient of
   the top layer's output at the response's rows.
3. Backward layer by layer from the top, each layer replayed over the prompt's and the response's rows
   together (training/replay.py): the prompt's activations from its record, the response's from step 1.
   Records are reloaded in this reverse order, the next one prefetched.

With the record made under the current weights, the result equals the gradient of a forward and backward
over prompt + response (tests hold it to 1e-5 relative in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model.attention import varlen_attention
from alchemist_worker.model.layer_activations import LayerActivations
from alchemist_worker.model.transformer import Block, Transformer
from alchemist_worker.training.batch import TrainingSample, offsets, suffix_batch
from alchemist_worker.training.loss import response_loss_sum
from alchemist_worker.training.replay import LayerRows, replay_layer_backward

KEY_FIELDS = ("x", "k", "v", "k_lin")
QUERY_FIELDS = ("q_lin", "attn", "lse", "o", "gate", "up")


class SequenceLayout:
    """Rows of the step's sequences, each its prompt prefix (p - 1 tokens) then its suffix (r tokens)."""

    def __init__(self, prefix_lens: list[int], suffix_lens: list[int]) -> None:
        self.prefix_lens = prefix_lens
        self.lengths = [p + s for p, s in zip(prefix_lens, suffix_lens, strict=True)]
        self.prefix_offsets, self.suffix_offsets = offsets(prefix_lens), offsets(suffix_lens)
        self.offsets = offsets(self.lengths)
        self.suffix_rows = torch.cat(
            [
                torch.arange(start + p, end)
                for start, end, p in zip(self.offsets, self.offsets[1:], prefix_lens, strict=False)
            ]
        )

    def interleave(self, prefix: Tensor, suffix: Tensor) -> Tensor:
        """[P, ...] flat prefixes and [S, ...] flat suffixes -> [P + S, ...] sequence by sequence."""
        parts = []
        for i in range(len(self.suffix_offsets) - 1):
            parts.append(prefix[self.prefix_offsets[i] : self.prefix_offsets[i + 1]])
            parts.append(suffix[self.suffix_offsets[i] : self.suffix_offsets[i + 1]])
        return torch.cat(parts)

    def prefixes(self, records: list[LayerTensors], name: str) -> Tensor:
        """One record field over the flat batch of prefixes (each record's first prefix_len tokens)."""
        parts = [layer[name][:n] for layer, n in zip(records, self.prefix_lens, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def join(self, records: list[LayerTensors], name: str, suffix: Tensor) -> Tensor:
        """A field over every row: the records' prefixes and the suffix's rows, sequence by sequence, in one
        copy (the step's contiguous layout of the layer)."""
        parts = []
        for i, (layer, n) in enumerate(zip(records, self.prefix_lens, strict=True)):
            parts.append(layer[name][:n])
            parts.append(suffix[self.suffix_offsets[i] : self.suffix_offsets[i + 1]])
        return torch.cat(parts)


class PrefixedAttention:
    """Attention backend of the suffix forward: each sequence's new tokens attend to its prompt prefix K/V
    (streamed from the records) followed by its own K/V."""

    def __init__(
        self, streamer: LayerStreamer, layout: SequenceLayout, *, sliding_window: int | None
    ) -> None:
        self.streamer, self.layout = streamer, layout
        self.sliding_window = sliding_window

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, need_lse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        records = self.streamer.fetch(layer)
        self.streamer.prefetch(layer + 1)
        keys, values = self.layout.join(records, "k", k), self.layout.join(records, "v", v)
        self.streamer.done_with(layer)  # freed in forward order
        return varlen_attention(
            q,
            keys,
            values,
            self.layout.suffix_offsets,
            self.layout.offsets,
            sliding_window=self.sliding_window,
            need_lse=need_lse,
        )


class KeptActivations:
    """A recorder for the step's own suffix forward: keeps each layer's activations (references to what the
    forward computed anyway) until that layer's backward.

    With offload, a layer goes to the host as soon as the forward has moved past it and comes back, prefetched,
    in backward order, as the prompt's records do: the device holds about two layers of them instead of all.
    What is on the device is counted in the store's device tier (`ActivationStore.hold_working_bytes`), so its
    peak is the step's, records and these together (on a CPU-only machine the tiers share memory and the count
    says what a GPU would hold)."""

    wants_lse = True

    def __init__(self, num_layers: int, streamer: LayerStreamer, *, qk_norm: bool) -> None:
        self.fields = [f for f in KEY_FIELDS + QUERY_FIELDS if qk_norm or f != "k_lin"]  # what backward reads
        self.store, self.copies = streamer.store, streamer.copies
        self.offload = streamer.offload_after_use
        self.layers: list[LayerTensors | None] = [None] * num_layers
        self._on_device = [False] * num_layers
        self._ready: dict[int, torch.cuda.Event | None] = {}

    def record_layer(self, layer: int, activations: LayerActivations) -> None:
        tensors = {name: getattr(activations, name) for name in self.fields}
        self.layers[layer] = {name: t for name, t in tensors.items() if t is not None}
        self._count(layer, on_device=True)
        if self.offload and layer > 0:  # the layer below is read by nothing until its backward
            self._to_host(layer - 1)

    def prefetch(self, layer: int) -> None:
        """Starts bringing `layer` back to the device (no-op if out of range, there, or under way)."""
        tensors = self.layers[layer] if 0 <= layer < len(self.layers) else None
        if tensors is None or self._on_device[layer] or layer in self._ready:
            return
        self.layers[layer], self._ready[layer] = self.copies.to_device(tensors)
        self._count(layer, on_device=True)

    def fetch(self, layer: int) -> LayerTensors:
        """Layer `layer`, on the device and safe to read."""
        self.prefetch(layer)
        tensors = self.layers[layer]
        if tensors is None:
            raise RuntimeError(f"layer {layer} kept no activations")
        self.copies.wait(self._ready.pop(layer, None), tensors)
        return tensors

    def release(self, layer: int) -> None:
        """Forgets layer `layer` (its backward has what it needs)."""
        self._count(layer, on_device=False)
        self.layers[layer] = None

    def close(self) -> None:
        """Forgets every layer still held (the step ended, or failed)."""
        for layer in range(len(self.layers)):
            self.release(layer)

    def _to_host(self, layer: int) -> None:
        tensors = self.layers[layer]
        if tensors is not None and self._on_device[layer]:
            self._count(layer, on_device=False)  # the device bytes counted in, not the (compact) host copies'
            self.layers[layer] = self.copies.to_host(tensors)

    def _count(self, layer: int, *, on_device: bool) -> None:
        if self._on_device[layer] == on_device:
            return
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage() for t in (self.layers[layer] or {}).values()
        }
        nbytes = sum(s.nbytes() for s in storages.values())
        self._on_device[layer] = on_device
        self.store.hold_working_bytes(nbytes if on_device else -nbytes)


def _suffix_field(acts: LayerTensors, name: str) -> Tensor:
    value = acts.get(name)
    if value is None:
        raise RuntimeError(f"the suffix forward kept no {name}")
    return value


@dataclass
class SuffixForward:
    """The suffix forward of a step's reused samples, waiting for its loss's backward (`hidden`'s gradient)."""

    hidden: (
        Tensor  # [R, hidden] final-normed hidden states of the suffix rows, in sample order, differentiable
    )
    top: Tensor  # [R, hidden] the top layer's output: the leaf `hidden` was computed from
    kept: KeptActivations
    layout: SequenceLayout
    input_ids: Tensor  # [R] the suffix tokens


def reuse_forward(
    model: Transformer, samples: list[TrainingSample], streamer: LayerStreamer
) -> SuffixForward:
    """Step 1: the suffix forward over the samples' records (streamed by `streamer`, in sample order)."""
    config = model.config
    device = next(model.parameters()).device
    batch = suffix_batch(samples, device)
    layout = SequenceLayout([s.prefix_len for s in samples], [s.response_len for s in samples])
    backend = PrefixedAttention(streamer, layout, sliding_window=config.sliding_window)
    kept = KeptActivations(config.num_layers, streamer, qk_norm=config.qk_norm)
    streamer.prefetch(0)
    try:
        with torch.no_grad():
            x = model.embed_tokens(batch.input_ids)
            cos, sin = model.rope(batch.positions, x.dtype)
            for block in model.layers:
                x = block(x, cos, sin, backend, kept)
    except BaseException:
        kept.close()
        raise
    top = x.requires_grad_()
    with torch.enable_grad():
        hidden = model.norm(top)
    return SuffixForward(hidden=hidden, top=top, kept=kept, layout=layout, input_ids=batch.input_ids)


def reuse_prompt_backward(
    model: Transformer, samples: list[TrainingSample], streamer: LayerStreamer, suffix: SuffixForward
) -> None:
    """Step 3, once the loss's backward has reached `suffix.hidden`: the layers' backward over prompt and
    response rows, accumulated into `.grad`. The caller closes `suffix.kept` once the step ends or fails (a
    frozen bottom layer ends the replay early, with lower layers still held)."""
    config = model.config
    layout = suffix.layout
    device = suffix.top.device
    grad: Tensor = suffix.top.grad if suffix.top.grad is not None else torch.zeros_like(suffix.top)
    positions = torch.cat([torch.arange(n) for n in layout.lengths]).to(device)
    cos, sin = model.rope(positions, suffix.top.dtype)
    suffix_rows = layout.suffix_rows.to(device)
    embed_trainable = model.embed_tokens.weight.requires_grad
    streamer.prefetch(config.num_layers - 1)
    for layer in reversed(range(config.num_layers)):
        records = streamer.fetch(layer)
        streamer.prefetch(layer - 1)
        acts = suffix.kept.fetch(layer)
        suffix.kept.prefetch(layer - 1)
        prompt_fields = records[0].keys()
        keys = {
            name: layout.join(records, name, _suffix_field(acts, name))
            for name in KEY_FIELDS
            if name in prompt_fields
        }
        top_layer = layer == config.num_layers - 1
        queries: LayerTensors = {}
        for name in QUERY_FIELDS:
            if top_layer:  # only the responses' rows query at the top: the suffix forward gave all of them
                queries[name] = _suffix_field(acts, name)
            elif name in prompt_fields:
                queries[name] = layout.join(records, name, _suffix_field(acts, name))
        streamer.done_with(layer)  # what the replay reads was copied out of the records
        del acts  # and out of the suffix's activations (at the top layer, autograd saves them)
        suffix.kept.release(layer)
        rows = (
            LayerRows(cos, sin, layout.offsets, suffix_rows, layout.suffix_offsets)
            if top_layer
            else LayerRows(cos, sin, layout.offsets)
        )
        block = model.layers[layer]
        assert isinstance(block, Block)
        grad_input = replay_layer_backward(
            block,
            keys,
            queries,
            rows,
            grad_output=grad,
            sliding_window=config.sliding_window,
            need_grad_input=layer > 0 or embed_trainable,
        )
        if grad_input is None:
            return
        grad = grad_input
    if embed_trainable:
        prompt_ids = torch.cat([s.prompt_ids[:-1] for s in samples]).to(device)
        ids = layout.interleave(prompt_ids, suffix.input_ids)
        with torch.enable_grad():
            torch.autograd.backward(model.embed_tokens(ids), grad)


def reuse_backward(
    model: Transformer,
    samples: list[TrainingSample],
    streamer: LayerStreamer,
    *,
    scale: float,
    loss: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Accumulates scale * d(summed response loss)/d(params) into `.grad` from the samples' records (streamed
    by `streamer`, in sample order); returns the summed loss. `loss` maps the response rows' final-normed
    hidden states [R, hidden] to the summed loss (default: cross-entropy)."""
    if not samples:
        return 0.0
    suffix = reuse_forward(model, samples, streamer)
    labels = torch.cat([s.response_ids for s in samples]).to(suffix.hidden.device)
    try:
        with torch.enable_grad():
            loss_sum = (
                response_loss_sum(model, suffix.hidden, labels) if loss is None else loss(suffix.hidden)
            )
            (loss_sum * scale).backward()
        suffix.hidden = suffix.hidden.detach()
        reuse_prompt_backward(model, samples, streamer, suffix)
    finally:
        suffix.kept.close()
    return float(loss_sum.detach())
