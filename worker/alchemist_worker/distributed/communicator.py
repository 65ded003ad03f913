"""One generation of the training group as a torch.distributed process group.

Rendezvous is torch's own: the leader hosts a `TCPStore` for as long as it leads, and each generation's group
is formed over a `PrefixStore` named after the generation, so a late member of an old generation can never
meet a new one. The process group's timeout is the round timeout: a collective that a dead or stalled member
never joins raises on the others after it, and they leave the generation. Only the communication thread
(rounds.py) calls into this module, so torch's default group (global state) has one user.
"""

from __future__ import annotations

import datetime
import logging
import pickle
from typing import Any

import torch
import torch.distributed as dist
from alchemist_protocol.training_group import GroupRecord

log = logging.getLogger(__name__)


class Communicator:
    def __init__(self, backend: str, timeout_s: float) -> None:
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._hosted: dist.TCPStore | None = None
        self._hosted_port = 0
        self.generation = 0
        self.rank = -1
        self.world_size = 0

    @property
    def device(self) -> torch.device:
        """Where collectives' tensors live: NCCL needs them on this process's GPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def host(self, port: int) -> None:
        """Starts the rendezvous store this replica serves while it leads (once; kept across generations)."""
        if self._hosted is not None and self._hosted_port == port:
            return
        self._hosted = dist.TCPStore(
            "0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=self.timeout
        )
        self._hosted_port = port

    def join(self, record: GroupRecord, replica: str) -> None:
        """Forms this generation's group; blocks until every member arrives, raises after the timeout."""
        self.leave()
        rank = record.rank_of(replica)
        if rank is None:
            raise ValueError(f"{replica} is not a member of generation {record.generation}")
        if rank == 0:
            self.host(record.master_port)
            store: dist.Store = self._hosted  # type: ignore[assignment]
        else:
            store = dist.TCPStore(
                record.master_addr, record.master_port, is_master=False, timeout=self.timeout
            )
        prefixed = dist.PrefixStore(f"alchemist/generation/{record.generation}", store)
        dist.init_process_group(
            self.backend, store=prefixed, rank=rank, world_size=record.world_size, timeout=self.timeout
        )
        self.generation, self.rank, self.world_size = record.generation, rank, record.world_size

    def leave(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group broken by a dead peer: nothing left to tear down cleanly
                log.debug("destroying the process group failed", exc_info=True)
        self.generation, self.rank, self.world_size = 0, -1, 0

    def close(self) -> None:
        self.leave()
        self._hosted = None

    # Collectives (blocking; the communication thread's only).
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.to(tensor.device)

    def all_gather_object(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def object_bytes(value: Any) -> int:
    """Size of what all_gather_object sends for `value` (for the benchmark's accounting)."""
    return len(pickle.dumps(value))
