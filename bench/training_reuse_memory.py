"""Activation memory on a CPU: the peak bytes of tensors autograd holds for backward.

A `saved_tensors_hooks` pair wraps every saved tensor in a handle; the handle counts its storage once (several
saved views of one storage count once) until autograd frees it. Model weights are excluded: they are not
activation memory and every method holds the same ones.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch


class _Handle:
    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, key: int | None) -> None:
        self.meter, self.tensor, self.key = meter, tensor, key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    def __init__(self, exclude_storages: set[int]) -> None:
        self.exclude = exclude_storages
        self.refs: Counter[int] = Counter()
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> _Handle:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0 or tensor.device.type == "meta":
            return _Handle(self, tensor, None)
        if self.refs[key] == 0:
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Handle(self, tensor, key)

    @staticmethod
    def _unpack(handle: _Handle) -> torch.Tensor:
        return handle.tensor

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
