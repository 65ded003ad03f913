"""The exact reuse path: the gradient of the response loss from prefill records, without the prompt's forward.

1. Forward over the suffix only (last prompt token + response, see training/batch.py). At each layer the
   suffix attends to the prompt's K/V taken from the record, as autograd leaves, so the response's backward
   leaves d loss / d K and d loss / d V of the prompt at every layer. Each layer's record is brought to the
   device just before it is read and sent back right after (`LayerStreamer`), next layer prefetched.
2. Backward through the suffix (one autograd call).
3. Backward through the prompt, layer by layer from the top, each layer replayed from its record
   (training/replay.py) with its K/V gradients and the output gradient the layer above produced; records are
   reloaded in this reverse order, the next one prefetched.

With the record made under the current weights, the result equals the gradient of a forward and backward
over prompt + response (tests hold it to 1e-5 relative in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alchemist_worker.activations.records import LayerTensors
from alchemist_worker.activations.transfer import LayerStreamer
from alchemist_worker.model.attention import varlen_attention
from alchemist_worker.model.transformer import Block, Transformer
from alchemist_worker.training.batch import TrainingSample, offsets, suffix_batch
from alchemist_worker.training.recompute import response_loss_sum
from alchemist_worker.training.replay import replay_layer_backward


def _join(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prefix_slice(layers: list[LayerTensors], prefix_lens: list[int]) -> LayerTensors:
    """One layer's record fields over the flat batch of prefixes (each record's first prefix_len tokens)."""
    return {
        name: _join([layer[name][:n] for layer, n in zip(layers, prefix_lens, strict=True)])
        for name in layers[0]
    }


class PrefixedAttention:
    """Attention backend of the suffix forward: each sequence's new tokens attend to its prompt prefix K/V
    (from `prefix_kv(layer)`, flat over the batch's prefixes) followed by its own K/V."""

    def __init__(
        self,
        prefix_kv: PrefixKV,
        prefix_lens: list[int],
        suffix_lens: list[int],
        *,
        sliding_window: int | None,
    ) -> None:
        self.prefix_kv = prefix_kv
        self.prefix_offsets, self.suffix_offsets = offsets(prefix_lens), offsets(suffix_lens)
        self.key_offsets = offsets([p + s for p, s in zip(prefix_lens, suffix_lens, strict=True)])
        self.sliding_window = sliding_window

    def _interleave(self, prefix: Tensor, suffix: Tensor) -> Tensor:
        parts = []
        for i in range(len(self.suffix_offsets) - 1):
            parts.append(prefix[self.prefix_offsets[i] : self.prefix_offsets[i + 1]])
            parts.append(suffix[self.suffix_offsets[i] : self.suffix_offsets[i + 1]])
        return torch.cat(parts)

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, need_lse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        prefix_k, prefix_v = self.prefix_kv(layer)
        return varlen_attention(
            q,
            self._interleave(prefix_k, k),
            self._interleave(prefix_v, v),
            self.suffix_offsets,
            self.key_offsets,
            sliding_window=self.sliding_window,
            need_lse=need_lse,
        )


class PrefixKV:
    """Hands the suffix forward each layer's prompt K/V as fresh autograd leaves, streaming records."""

    def __init__(self, streamer: LayerStreamer, prefix_lens: list[int]) -> None:
        self.streamer, self.prefix_lens = streamer, prefix_lens
        self.leaves: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, layer: int) -> tuple[Tensor, Tensor]:
        layers = self.streamer.fetch(layer)
        self.streamer.prefetch(layer + 1)
        with torch.no_grad():
            k = _join([rec["k"][:n] for rec, n in zip(layers, self.prefix_lens, strict=True)]).clone()
            v = _join([rec["v"][:n] for rec, n in zip(layers, self.prefix_lens, strict=True)]).clone()
        self.streamer.done_with(layer)  # freed in forward order
        leaves = (k.requires_grad_(), v.requires_grad_())
        self.leaves[layer] = leaves
        return leaves

    def nbytes(self) -> int:
        return sum(t.nbytes for pair in self.leaves.values() for t in pair)


def reuse_backward(
    model: Transformer,
    samples: list[TrainingSample],
    streamer: LayerStreamer,
    *,
    scale: float,
) -> float:
    """Accumulates scale * d(summed response loss)/d(params) into `.grad` from the samples' records (streamed
    by `streamer`, in sample order); returns the summed loss."""
    if not samples:
        return 0.0
    config = model.config
    device = next(model.parameters()).device
    prefix_lens = [s.prefix_len for s in samples]
    batch = suffix_batch(samples, device)
    kv = PrefixKV(streamer, prefix_lens)
    backend = PrefixedAttention(
        kv, prefix_lens, [s.response_len for s in samples], sliding_window=config.sliding_window
    )
    streamer.prefetch(0)
    hidden = model(batch.input_ids, batch.positions, backend)
    loss_sum = response_loss_sum(model, hidden, batch.labels)
    (loss_sum * scale).backward()
    del hidden

    prefix_offsets = offsets(prefix_lens)
    if prefix_offsets[-1] > 0:
        positions = torch.cat([torch.arange(n) for n in prefix_lens]).to(device)
        dtype = model.embed_tokens.weight.dtype
        cos, sin = model.rope(positions, dtype)
        embed_trainable = model.embed_tokens.weight.requires_grad
        grad_output: Tensor | None = None
        streamer.prefetch(config.num_layers - 1)
        for layer in reversed(range(config.num_layers)):
            records = streamer.fetch(layer)
            streamer.prefetch(layer - 1)
            k_leaf, v_leaf = kv.leaves.pop(layer)
            block = model.layers[layer]
            assert isinstance(block, Block)
            grad_output = replay_layer_backward(
                block,
                prefix_slice(records, prefix_lens),
                cos,
                sin,
                prefix_offsets,
                grad_output=grad_output,
                grad_k=k_leaf.grad if k_leaf.grad is not None else torch.zeros_like(k_leaf),
                grad_v=v_leaf.grad if v_leaf.grad is not None else torch.zeros_like(v_leaf),
                sliding_window=config.sliding_window,
                need_grad_input=layer > 0 or embed_trainable,
            )
            streamer.done_with(layer)
        if embed_trainable and grad_output is not None:
            prompt_ids = torch.cat([s.prompt_ids[:-1] for s in samples]).to(device)
            with torch.enable_grad():
                torch.autograd.backward(model.embed_tokens(prompt_ids), grad_output)
    return float(loss_sum.detach())
