"""The control thread of a data-parallel member: feedback to the replica that served it, rounds elsewhere.

What changes from one-trainer mode (continual/control.py): every member consumes feedback, and a feedback
entry about a request another live member served is handed to that member (XCLAIM to its consumer name, so it
stays pending all along and a crash loses nothing); the owner re-reads its pending list and trains the sample
on its own prefill record. Feedback whose owner is gone (no live offer), or whose request was never recorded,
is trained here by recomputation; a dead member's pending entries come back through XAUTOCLAIM after the
claim idle time, which live members keep from elapsing on what they hold (`touch_held`).

Steps are not started here: the communication thread (rounds.py) takes a batch at each agreed round. As with
one trainer, every `publish_every_steps` rounds become one version: the batches of the rounds in between stay
held here (`uncommitted`), unacknowledged, until the leader's commit of the version that covers them
acknowledged them; a new generation drops them (their feedback is read again and trained on the restored
newest version). The lease no longer means "the one trainer" but "the leader": rank 0 of each generation,
host of the rendezvous store, and the only publisher. Rollbacks are honoured by the leader forming a new
generation that restores the rolled-back version.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from alchemist_protocol.training_group import GroupRecord, TrainingGroupStore

from alchemist_worker.continual.control import Pending, TrainingControl
from alchemist_worker.continual.engine_side import StepDone
from alchemist_worker.continual.trainer import StepResult
from alchemist_worker.distributed.rounds import RoundLoop
from alchemist_worker.distributed.settings import DataParallelSettings
from alchemist_worker.feedback.consumer import FeedbackItem
from alchemist_worker.feedback.samples import TrainingSample
from alchemist_worker.versions.publisher import VersionDraft

log = logging.getLogger(__name__)


class DataParallelControl(TrainingControl):
    def __init__(
        self, *, data_parallel: DataParallelSettings, group: TrainingGroupStore, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        data_parallel.check_claim_idle(self.consumer.settings.claim_idle_ms)
        self.data_parallel = data_parallel
        self.replica = self.consumer.settings.consumer
        self.lock = threading.RLock()  # pending and the consumer, shared with the communication thread
        self.members: frozenset[str] = frozenset()
        self.handed_off = 0
        self.rounds = RoundLoop(self, data_parallel, group)

    # Lifecycle.
    def start(self) -> None:
        super().start()
        if self.settings.enabled:
            self.rounds.start()

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)  # first: its offer duty must not renew the offer the rounds withdraw
        self.rounds.stop(timeout)

    def on_step_done(self, done: StepDone) -> None:
        self.rounds.step_done(done)

    def tick(self) -> None:
        if self._is_due("lease", self.timings.lease_s):
            self._duty("lease", self._lease_tick)
        if self.settings.enabled and self._is_due("offer", self.data_parallel.member_ttl_s / 4):
            self._duty("offer", self.rounds.offer)
        if self.training:
            self._duty("feedback", self._consume)
            if self._is_due("touch", self.consumer.settings.claim_idle_ms / 4000):
                self._duty("touch", self._touch)
        # Members take new live settings at slightly different times; a round that straddles the change ends
        # with differing digests, is not published, and the group restores the newest version.
        self._replica_duties()

    def _lease_tick(self) -> None:
        """The lease only elects the leader here; the communication thread acts on it."""
        if not self.settings.enabled:
            return
        held = self.lease.acquire_or_renew()
        self.metrics.trainer_lease.set(1 if held else 0)

    # Generations (communication thread).
    def enter_generation(self, record: GroupRecord) -> None:
        """Before joining: no step, no feedback held, and the weights of the record's version."""
        self.training = False
        self._drop_held()
        self._restore(record.restore_version)
        self._fence = record.leader_token
        self.members = frozenset(record.members)

    def start_training(self) -> None:
        self.training = True

    def leave_generation(self) -> None:
        self.training = False
        self.members = frozenset()
        self._drop_held()

    def _drop_held(self) -> None:
        """Cancels the step and forgets every held entry unacknowledged, those of uncommitted rounds included:
        each stays pending in Redis (ours, or claimed by whoever outlived us) and is read again after the
        restore of the newest committed version, which none of them trained."""
        self.engine_side.call(self.trainer.cancel).result()
        with self.lock:
            for pending in self._all_held():
                self.consumer.release([pending.item])
            self.pending.clear()
            self.in_step = None
            self.uncommitted.clear()
            self.consumer.reset_after_redis_loss()

    # Feedback.
    def _consume(self) -> None:
        with self.lock:
            if self._is_due("own_pending", 0.25):
                self.consumer.reread_own_pending()  # what other members handed to us
            super()._consume()

    def _touch(self) -> None:
        with self.lock:
            self.consumer.touch_held()

    def _keep(self, item: FeedbackItem, sample: TrainingSample) -> None:
        owner = sample.served_by
        if owner != self.replica and owner in self.members:
            self.consumer.hand_off(item, owner)  # it trains where its prefill record is
            self.handed_off += 1
            return
        super()._keep(item, sample)

    # Rounds (communication thread).
    def ready_count(self) -> int:
        """Samples this member would train now (0 until a batch is due: min samples, or the oldest's wait)."""
        with self.lock:
            if not self.training or not self.pending or not self._batch_due(time.monotonic()):
                return 0
            return len(self.pending)

    def take_round_batch(self) -> list[Pending]:
        with self.lock:
            if not self.training or not self.pending:
                return []
            batch = self._take_batch()
            self.in_step = batch
            self._last_step = time.monotonic()
            return batch

    def round_failed_locally(self, batch: list[Pending], error: BaseException) -> None:
        with self.lock:
            self.in_step = None
            self._failed(batch, error)

    def round_applied(self, batch: list[Pending], result: StepResult | None) -> None:
        """Every member stepped on the round: its batch waits, held, for the version that covers it."""
        with self.lock:
            self.in_step = None
            if batch and result is not None:
                self._step_finished(batch, result)

    def rounds_committed(self, version: int) -> None:
        """The leader's commit of `version` acknowledged the uncommitted rounds' feedback: forget it."""
        with self.lock:
            for batch, _ in self.uncommitted:
                self.consumer.release([p.item for p in batch])
            self.uncommitted.clear()
        self.metrics.version.labels(role="training").set(version)

    def version_published(self, draft: VersionDraft, version: int, rounds: int) -> None:
        """Leader, after the commit and its acknowledgement."""
        self.commit_health.record_success(version)
        self.metrics.versions_published.inc()
        self.metrics.steps.inc(rounds)
        self.publisher.prune(protect={version, draft.parent, self.engine.weight_version})

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["data_parallel"] = {**self.rounds.status(), "handed_off": self.handed_off}
        return status
