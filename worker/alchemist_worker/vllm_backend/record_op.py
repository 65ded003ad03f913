"""`alchemist::record`: the custom op through which a layer hands its activations to the step's recording.

vLLM compiles the model once (Dynamo traces it without guards, Inductor generates the code), so a recording
step cannot be told apart from any other at trace time. The layer calls this op at three points; torch.compile
sees an opaque operator (its schema and a fake implementation) and keeps the call in the compiled code, where its
Python body runs on every call:

- in a step that records nothing (every decode, every unrecorded prefill) the body finds no recording in vLLM's
  forward context and returns: a few microseconds per call, three calls per layer;
- in a step that records, it hands the tensors to the `StepRecording` in the forward context, which copies the
  rows and fields it keeps before the compiled code goes on (it reuses intermediate buffers and overwrites some
  tensors in place, so nothing may be kept by reference).

The op returns nothing; it declares that it writes `token`, a one-element buffer per layer it never touches, so
that no compiler pass drops it as dead code and the three calls of one layer keep their order. Where the calls sit
decides which value each tensor has: the projections before QK norm and rotary (which write them in place), the
residual and the attention's outputs before the fused add-norm (which overwrites them), gate/up after the MLP's
first projection. A step that records is also kept out of CUDA graphs (runner_hooks.py): a replayed graph runs
no Python, so the body would never be called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

# The LayerActivations fields each call hands over, in order; the last part completes the layer.
PARTS: tuple[tuple[str, ...], ...] = (
    ("q_lin", "k_lin"),  # before QK norm and rotary
    ("x", "k", "v", "attn", "o"),  # after o_proj, before the fused add-norm
    ("gate", "up"),  # after gate_up_proj
)
PROJECTIONS, ATTENTION, MLP = range(len(PARTS))
# where the model puts the step's recording in vLLM's forward context (a dict vLLM makes for each forward)
CONTEXT_KEY = "alchemist_step_recording"


class LayerTaker(Protocol):
    """What the op hands the tensors to (step_recording.StepRecording)."""

    def take(self, layer: int, part: int, tensors: Sequence[Tensor]) -> None: ...


def active_recording() -> LayerTaker | None:
    """The recording of the step being run, if it records (set by the model for the one forward)."""
    # imported here: this module is imported without vLLM installed (engine.py reports that as a usage error)
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    taker: LayerTaker | None = get_forward_context().additional_kwargs.get(CONTEXT_KEY)
    return taker


def _record(token: Tensor, layer: int, part: int, tensors: list[Tensor]) -> None:
    taker = active_recording()
    if taker is not None:
        taker.take(layer, part, tensors)


def _record_fake(token: Tensor, layer: int, part: int, tensors: list[Tensor]) -> None:
    return None


_library = torch.library.Library("alchemist", "FRAGMENT")  # the op lives as long as this object
_library.define("record(Tensor(a!) token, int layer, int part, Tensor[] tensors) -> ()")
_library.impl("record", _record, "CompositeExplicitAutograd")
torch.library.register_fake("alchemist::record", _record_fake, lib=_library)


def record(token: Tensor, layer: int, part: int, tensors: Sequence[Tensor]) -> None:
    """Hands `tensors` (the fields `PARTS[part]` names, in that order) of `layer` to the step's recording."""
    op: Any = torch.ops.alchemist.record
    op(token, layer, part, list(tensors))
