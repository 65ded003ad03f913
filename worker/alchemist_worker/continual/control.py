"""The trainer's control thread: everything that talks to Redis or the disk, never to the model directly.

It holds the trainer lease, reads and resolves feedback, decides when a step starts, commits versions, follows
the rollout pointer, honours rollback requests, beats the heartbeat and repairs state after a crash or a Redis
restart. Work on the model goes to the engine thread through `EngineSide.call` and comes back as `StepDone`.
A Redis outage only pauses this thread (with back-off); serving goes on.

Step life: resolved samples wait in `pending`; a step starts when `min_batch_samples` wait (or the oldest has
waited `max_wait_s`) and `step_interval_s` has passed since the previous one; it takes up to `batch_samples`
samples and `batch_tokens` tokens. Every `publish_every_steps` finished steps become a version, and only then
is their feedback acknowledged (at-least-once). A failed step puts its samples back, to be retried one at a
time; a sample that fails `MAX_FAILURES` times goes to the dead-letter stream.

Commits (pending_commit.py, versions/publisher.py): a version is committed under the lease's fencing token. A
conflict (the lease was taken over, or the head moved) abandons the uncommitted steps: their feedback goes back,
unacknowledged, and training restarts from the newest committed version if the lease is still ours. An I/O or a
Redis failure keeps the draft and retries it on a timer with back-off; no step starts meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.live_settings import LiveTraining, read_live_settings
from alchemist_protocol.schemas import EvaluationReading

from alchemist_worker.continual.duties import ControlDuties
from alchemist_worker.continual.engine_side import EngineSide, StepDone
from alchemist_worker.continual.lease import TrainerLease
from alchemist_worker.continual.metrics import TrainingMetrics
from alchemist_worker.continual.pending_commit import CommitHealth, PendingCommit
from alchemist_worker.continual.settings import TrainerSettings
from alchemist_worker.continual.step_cursor import StepCancelled
from alchemist_worker.continual.trainable_weights import TrainableWeights
from alchemist_worker.continual.trainer import ContinualTrainer, StepResult
from alchemist_worker.engine.serving_engine import WeightSwitch
from alchemist_worker.evaluation.gate import consecutive_holds, is_held, newest_passed
from alchemist_worker.evaluation.settings import OnHeld
from alchemist_worker.feedback.consumer import FeedbackConsumer, FeedbackItem, SettledFeedback
from alchemist_worker.feedback.samples import SampleResolver, Skip, SkipKind, TrainingSample
from alchemist_worker.rollout.follower import RolloutFollower
from alchemist_worker.rollout.heartbeat import Heartbeat
from alchemist_worker.versions.artifacts import read_trainer_state, write_trainer_state
from alchemist_worker.versions.directory import VersionDirectory
from alchemist_worker.versions.publisher import (
    CommitConflict,
    CommitFailure,
    RedisUnavailable,
    VersionDraft,
    VersionPublisher,
    entry_ranges,
)

log = logging.getLogger(__name__)

MAX_FAILURES = 3


@dataclass
class Pending:
    item: FeedbackItem
    sample: TrainingSample
    since: float = field(default_factory=time.monotonic)
    failures: int = 0


@dataclass(frozen=True)
class ControlTimings:
    poll_s: float = 0.02
    lease_s: float = 2.0
    follow_s: float = 0.25
    heartbeat_s: float = 5.0
    commit_retry_s: float = 0.5  # first retry of a failed commit; doubles up to commit_retry_max_s
    commit_retry_max_s: float = 30.0
    settings_s: float = 2.0  # how often the live settings the operator writes are read


class TrainingControl:
    def __init__(
        self,
        *,
        store: JobStore,
        consumer: FeedbackConsumer,
        resolver: SampleResolver,
        directory: VersionDirectory,
        publisher: VersionPublisher,
        lease: TrainerLease,
        follower: RolloutFollower,
        heartbeat: Heartbeat,
        engine_side: EngineSide,
        trainer: ContinualTrainer,
        weights: TrainableWeights,
        settings: TrainerSettings,
        metrics: TrainingMetrics,
        model_config: Path | None = None,
        timings: ControlTimings = ControlTimings(),
        duties: ControlDuties | None = None,
    ) -> None:
        self.store = store
        self.consumer = consumer
        self.resolver = resolver
        self.directory = directory
        self.publisher = publisher
        self.lease = lease
        self.follower = follower
        self.heartbeat = heartbeat
        self.engine_side = engine_side
        self.engine: Any = engine_side.engine
        self.trainer = trainer
        self.weights = weights
        self.settings = settings
        self.metrics = metrics
        self.model_config = model_config
        self.timings = timings
        self.duties = duties or ControlDuties()  # each duty fails alone (duties.py)
        self.done: queue.SimpleQueue[StepDone] = queue.SimpleQueue()
        self.pending: deque[Pending] = deque()
        self.in_step: list[Pending] | None = None
        self.step_id = 0  # of the step in progress (or the last one started)
        self._honoured: tuple[int, float] | None = None  # the rollback request already acted upon
        self.uncommitted: list[tuple[list[Pending], StepResult]] = []
        self.training = False  # holds the lease and restored the trainer
        self._fence: str | None = None  # the lease token training started under; commits carry it
        self.committing: PendingCommit | None = None  # a commit not finished yet (retried on a timer)
        self.commit_health = CommitHealth()
        self.switching_to: int | None = None
        self.redis_errors = 0
        self.last_error = ""
        self._last_step = 0.0
        self._due: dict[str, float] = {}
        self._run_id: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a step finished: react now, not at the next poll
        self._thread: threading.Thread | None = None
        self._seen = (0, 0, 0)  # consumer counters already exported: dead letters, duplicates, delivered
        self._refused: LiveTraining | str | None = None  # live settings found invalid here, reported once

    # Lifecycle.
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainer-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.lease.held:
            with contextlib.suppress(redis.RedisError):
                self.lease.release()

    def on_step_done(self, done: StepDone) -> None:
        """Called on the engine thread."""
        self.done.put(done)
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                self.tick()
                self.duties.tick_done()
                backoff = 0.0
            except redis.RedisError as exc:
                self.redis_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                backoff = min(2.0, max(0.1, backoff * 2))
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
            except Exception as exc:  # never let the control thread die: log and go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("trainer control failed")
                self._stop.wait(1.0)
            self._wake.wait(self.timings.poll_s)
            self._wake.clear()

    def _duty(self, name: str, duty: Callable[[], object]) -> None:
        """Runs one duty; its failure is logged, counted and backed off, and never stops the others."""
        error = self.duties.run(name, duty)
        if error is not None:
            self.redis_errors += isinstance(error, redis.RedisError)
            self.last_error = f"{name}: {type(error).__name__}: {error}"

    def _is_due(self, what: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(what, 0.0):
            return False
        self._due[what] = now + every
        return True

    def tick(self) -> None:
        self._duty("step_results", self._handle_done)
        if self._is_due("lease", self.timings.lease_s):
            self._duty("lease", self._lease_tick)
        if self.training and self.committing is not None and self.committing.due():
            self._duty("commit", self._attempt_commit)
        if self.training:
            self._duty("rollback", self._check_rollback)
            self._duty("feedback", self._consume)
            self._duty("step_start", self._maybe_begin_step)
        self._replica_duties()

    def _replica_duties(self) -> None:
        """What every replica does, training or not, alone or in a data-parallel group: follow the rollout
        pointer, beat the heartbeat, take the live settings."""
        if self._is_due("follow", self.timings.follow_s):
            self._duty("follow", self._follow)
        if self._is_due("heartbeat", self.timings.heartbeat_s):
            self._duty("heartbeat", self._heartbeat)
        if self._is_due("settings", self.timings.settings_s):
            self._duty("settings", self._apply_live_settings)

    def _apply_live_settings(self) -> None:
        """Takes the training hyper-parameters the operator wrote, from the next step on (no restart).

        Values this worker cannot take (a batch smaller than its minimum batch) are reported once and the old
        ones kept: a bad value must not make the replica unready, as a failing duty would.
        """
        try:
            live = read_live_settings(self.store.client, self.store.keys)
        except pydantic.ValidationError as exc:
            if self._refused != "unreadable":
                log.error("ignoring unreadable live settings in %s: %s", self.store.keys.live_settings, exc)
            self._refused = "unreadable"
            return
        if live is None or live.training == self._refused:
            return
        changes = {k: v for k, v in live.training.model_dump().items() if getattr(self.settings, k) != v}
        if not changes:
            return
        try:
            updated = self.settings.with_(**changes)
        except ValueError as exc:
            self._refused = live.training
            log.error("live settings not applied, keeping the current ones: %s", exc)
            return
        self._refused = None
        old = {k: getattr(self.settings, k) for k in changes}
        self.settings = updated
        self.engine_side.call(lambda: self.trainer.apply_settings(updated)).result()
        log.info("applied live settings: %s", ", ".join(f"{k} {old[k]} -> {v}" for k, v in changes.items()))

    # Lease and restore.
    def _lease_tick(self) -> None:
        if not self.settings.enabled:
            return
        held = self.lease.acquire_or_renew()
        self.metrics.trainer_lease.set(1 if held else 0)
        if held and self.training and self.lease.token != self._fence:
            # Our lease lapsed (a pause, a Redis restart) and was taken again: anyone may have trained meanwhile.
            log.warning(
                "trainer lease re-acquired as %s: restarting from the newest version", self.lease.token
            )
            self._stop_training()
        if held and not self.training:
            self._become_trainer()
        elif not held and self.training:
            log.warning("lost the trainer lease; this replica stops training")
            self._stop_training()

    def _become_trainer(self) -> None:
        self.consumer.ensure_group()
        self.consumer.reset_after_redis_loss()  # re-read our own pending entries now, not after the claim idle
        self._fence = self.lease.token
        report = self.publisher.reconcile(self._fence)
        self._run_id = self._redis_run_id()
        head = self.store.latest_version()  # Redis lists the lineage; the directory may hold unpublished ones
        rollback = self.store.get_rollback()
        if rollback is not None and rollback.applies_to(head):
            head = rollback.version
            self._honoured = (rollback.version, rollback.requested_at)
        elif self.reverts_held():
            head = newest_passed(head, self.store.get_version)  # a held head was being reverted at a crash
        self._restore(head)
        self.training = True
        log.info("training from version %d in %s (reconciled %s)", head, self.directory.root, report)

    def _restore(self, version: int) -> None:
        if version == 0:
            tensors = self.weights.initial
            state = None
        else:
            path = self.directory.require(version)  # a version held elsewhere is copied here first
            tensors, state = self.weights.read(path), read_trainer_state(path)
        passed = version == 0 or not is_held(self.store.get_version(version))
        scale = self.lr_scale(version)
        self.engine_side.call(
            lambda: self.trainer.restore(version, dict(tensors), state, passed, scale)
        ).result()
        self.metrics.version.labels(role="training").set(version)

    def _stop_training(self) -> None:
        self.engine_side.call(self.trainer.cancel).result()
        for pending in self._all_held():
            self.consumer.release([pending.item])
        self.pending.clear()
        self.in_step = None
        self.uncommitted.clear()
        self.committing = None
        self.training = False

    def _all_held(self) -> list[Pending]:
        held = list(self.pending) + (self.in_step or [])
        return held + [p for batch, _ in self.uncommitted for p in batch]

    def _check_rollback(self) -> None:
        rollback = self.store.get_rollback()
        if rollback is None or not rollback.applies_to(self.store.latest_version()):
            return
        if self._honoured == (rollback.version, rollback.requested_at):
            return
        if self.committing is not None and self.committing.draft is not None:
            self.publisher.withdraw(self.committing.draft)  # written on the abandoned branch, not published
        if rollback.version != 0 and rollback.version not in self.directory.committed():
            if self.directory.fetch_missing is not None:  # held by another replica or a bucket: copy it first
                self.directory.fetch_missing(rollback.version)
            log.error(
                "rollback to version %d requested, but it is not in %s", rollback.version, self.directory.root
            )
            return
        log.info("rolling back: training continues from version %d", rollback.version)
        self.engine_side.call(self.trainer.cancel).result()
        # Samples of the abandoned steps train again, on the rolled-back weights.
        again = (self.in_step or []) + [p for batch, _ in self.uncommitted for p in batch]
        self.pending.extendleft(reversed(again))
        self.in_step = None
        self.uncommitted.clear()
        self.committing = None
        self._restore(rollback.version)
        self._honoured = (rollback.version, rollback.requested_at)

    # Feedback.
    def _consume(self) -> None:
        if not self.consumer.has_room:
            return
        items = self.consumer.poll()
        for n, item in enumerate(items):
            try:
                self._settle_or_keep(item)
            except BaseException:
                # Redis went away mid-batch: the rest stay pending in Redis; XAUTOCLAIM brings them back.
                self.consumer.release(items[n:])
                raise
        self.metrics.held.set(self.consumer.held)

    def _settle_or_keep(self, item: FeedbackItem) -> None:
        self.metrics.feedback.labels(label=item.feedback.label.value).inc()
        resolved = self.resolver.resolve(item)
        if not isinstance(resolved, Skip):
            self._keep(item, resolved)
        elif resolved.kind is SkipKind.DEAD:
            # The response id in the line's context (JSON logs): the feedback names the response it judges.
            log.debug(
                "feedback dead-lettered: %s", resolved.reason, extra={"response_id": item.feedback.request_id}
            )
            self.consumer.dead_letter(item, resolved.reason)
        else:
            versions = {} if resolved.served_version is None else {item.feedback_id: resolved.served_version}
            self.consumer.finalize([item], versions)

    def _keep(self, item: FeedbackItem, sample: TrainingSample) -> None:
        """A trainable sample waits for a step (a data-parallel member may hand it to the one that served it)."""
        self.pending.append(Pending(item, sample))

    def _batch_due(self, now: float) -> bool:
        """Whether the waiting samples (at least one) make a step now: `step_interval_s` after the last one,
        once `min_batch_samples` wait or the oldest has waited `max_wait_s`."""
        s = self.settings
        if now - self._last_step < s.step_interval_s:
            return False
        return len(self.pending) >= s.min_batch_samples or now - self.pending[0].since >= s.max_wait_s

    def _maybe_begin_step(self) -> None:
        if self.in_step is not None or not self.pending or self.committing is not None:
            return
        now = time.monotonic()
        if not self._batch_due(now):
            return
        batch = self._take_batch()
        due = len(self.uncommitted) + 1 >= self.settings.publish_every_steps
        samples = [p.sample for p in batch]
        self.step_id += 1
        step_id = self.step_id
        self.engine_side.call(lambda: self.engine_side.begin_step(step_id, samples, due)).result()
        self.in_step = batch
        self._last_step = now

    def _take_batch(self) -> list[Pending]:
        first = self.pending.popleft()
        batch, tokens = [first], first.sample.num_tokens
        if first.failures:  # retried alone, so one bad sample cannot sink others
            return batch
        while self.pending and len(batch) < self.settings.batch_samples:
            nxt = self.pending[0]
            if nxt.failures or tokens + nxt.sample.num_tokens > self.settings.batch_tokens:
                break
            batch.append(self.pending.popleft())
            tokens += nxt.sample.num_tokens
        return batch

    # Steps and versions.
    def _handle_done(self) -> None:
        while True:
            try:
                done = self.done.get_nowait()
            except queue.Empty:
                return
            if done.step_id != self.step_id or self.in_step is None:
                continue  # a step abandoned by a rollback or a lost lease: its samples were put back
            batch, self.in_step = self.in_step, None
            if done.result is None:
                if not isinstance(done.error, StepCancelled):
                    self._failed(batch, done.error)
                continue
            self._step_finished(batch, done.result)
            if done.snapshot is not None and done.state is not None:
                self.committing = PendingCommit(done.snapshot, done.state, steps=len(self.uncommitted))
                self._attempt_commit()

    def _step_finished(self, batch: list[Pending], result: StepResult) -> None:
        """Counts a finished step; its samples stay held, unacknowledged, until the version that covers it."""
        self.metrics.step_finished(
            tokens=result.tokens,
            loss=result.loss,
            lr=result.lr,
            wall_s=result.wall_s,
            busy_s=result.busy_s,
            outcomes=[(r.path, r.reason) for r in result.results],
            staleness=[r.staleness for r in result.results if r.staleness is not None],
        )
        self.uncommitted.append((batch, result))

    def _failed(self, batch: list[Pending], error: BaseException | None) -> None:
        for pending in reversed(batch):
            pending.failures += 1
            if pending.failures >= MAX_FAILURES:
                reason = f"training failed {pending.failures} times: {error}"
                log.warning(
                    "feedback dead-lettered: %s",
                    reason,
                    extra={"response_id": pending.item.feedback.request_id},
                )
                self.consumer.dead_letter(pending.item, reason)
            else:
                self.pending.appendleft(pending)

    def _attempt_commit(self) -> None:
        """Commits the pending version, or resumes it where the last attempt stopped; classifies failures."""
        pending = self.committing
        assert pending is not None
        try:
            if pending.draft is None:
                pending.draft = self._draft(pending)
            if not pending.published:
                info = self.publisher.publish(pending.draft, self._fence)
                pending.published = True
                version = pending.draft.version
                passed = not is_held(info)
                self.engine_side.call(lambda: self.trainer.committed(version, passed)).result()
                self.metrics.versions_published.inc()
                self.metrics.steps.inc(pending.steps)
                self.metrics.version.labels(role="training").set(version)
                log.info(
                    "published version %d (parent %d, %d samples, loss %.4f)",
                    version,
                    info.parent,
                    info.samples,
                    info.loss or 0,
                )
                self.judged(version, info.evaluation)
            self.publisher.finalize(pending.draft)
        except redis.RedisError as exc:  # building the draft: same as the publisher's RedisUnavailable
            self._commit_failed(pending, RedisUnavailable(f"Redis unavailable before committing: {exc}"))
            return
        except CommitFailure as failure:
            self._commit_failed(pending, failure)
            return
        self.commit_health.record_success(pending.draft.version)
        self.consumer.release([p.item for batch, _ in self.uncommitted for p in batch])
        self.uncommitted.clear()
        self.committing = None
        parent = pending.draft.parent
        self.publisher.prune(protect={pending.draft.version, parent, self.engine.weight_version})
        reading = pending.draft.evaluation
        if reading is not None and reading.held and self.reverts_held():
            self.revert_held(pending.draft.version, parent)

    def reverts_held(self) -> bool:
        """Whether training continues from a held version's parent (evaluation/settings.py: `on_held`)."""
        gate = self.trainer.evaluation
        return gate is not None and gate.on_held is OnHeld.REVERT

    def revert_held(self, held: int, parent: int) -> None:
        log.warning("version %d was held: training continues from its parent, version %d", held, parent)
        self._restore(parent)

    def lr_scale(self, version: int) -> float:
        """The learning-rate multiplier for steps trained from `version`, from the gate's holds of its children
        as Redis lists them (evaluation/settings.py: `held_backoff`)."""
        gate = self.trainer.evaluation
        if gate is None:
            return 1.0
        holds = consecutive_holds(version, self.store.latest_version(), self.store.get_version)
        scale = gate.lr_scale(holds)
        if holds:
            log.info(
                "%d candidates trained from version %d were held: learning rate x%.3g", holds, version, scale
            )
        return scale

    def _draft(self, pending: PendingCommit) -> VersionDraft:
        head = self.store.latest_version()
        version = head + 1
        state = pending.state
        parent = int(state["head_version"])  # the head, or a rollback's target
        state = {**state, "head_version": version, "lineage": sorted({*state["lineage"], version})}
        batches = [batch for batch, _ in self.uncommitted]
        results = [result for _, result in self.uncommitted]
        items = [p for batch in batches for p in batch]
        settled = [
            SettledFeedback(
                p.item.feedback_id, p.item.entry_ids, p.item.feedback.label.value, p.sample.served_version
            )
            for p in items
        ]
        snapshot = pending.snapshot

        def write(path: Path) -> None:
            self.weights.write(path, snapshot, self.model_config)
            write_trainer_state(path, state)

        tokens = sum(r.response_tokens for r in results)
        evaluation = self.gate_reading(results[-1], parent)
        return VersionDraft(
            version=version,
            parent=parent,
            kind=self.weights.kind,
            write_files=write,
            feedback=settled,
            loss=sum(r.loss * r.response_tokens for r in results) / max(1, tokens),
            samples=len(items),
            training={
                **self.settings.describe(),
                "steps": [r.step for r in results],
                "learning_rates": [r.lr for r in results],
                "reused": sum(x.path == "reused" for r in results for x in r.results),
                "recomputed": sum(x.path == "recomputed" for r in results for x in r.results),
                "rehearsed": sum(r.extra.get("rehearsed", 0) for r in results),
            },
            feedback_ranges=entry_ranges([e for s in settled for e in s.entry_ids]),
            expected_head=head,
            evaluation=evaluation,
        )

    def gate_reading(self, result: StepResult, parent: int) -> EvaluationReading | None:
        """The evaluation gate's reading of the candidate the last step produced (it scored it), if any."""
        gate = self.trainer.evaluation
        scores = result.extra.get("evaluation")
        if gate is None or scores is None:
            return None
        return gate.reading(scores, parent, self.store.get_version(parent) if parent else None)

    def judged(self, version: int, reading: EvaluationReading | None) -> None:
        gate = self.trainer.evaluation
        if gate is None or reading is None:
            return
        gate.judged(version, reading)
        if reading.held:
            log.warning("version %d held by the evaluation gate: %s", version, "; ".join(reading.reasons))

    def _commit_failed(self, pending: PendingCommit, failure: CommitFailure) -> None:
        version = None if pending.draft is None else pending.draft.version
        self.metrics.commit_failures.labels(failure.kind).inc()
        retrying = not isinstance(failure, CommitConflict)
        self.commit_health.record_failure(failure, version, retrying)
        if not retrying:
            log.error("%s; discarding the uncommitted steps (their feedback trains again)", failure)
            self._stop_training()
            self._due["lease"] = 0.0  # still the holder (the head moved)? restart from the newest version now
            return
        delay = pending.failed(self.timings.commit_retry_s, self.timings.commit_retry_max_s)
        log.warning(
            "commit of version %s failed (%s): %s; retrying in %.1fs", version, failure.kind, failure, delay
        )

    # Serving side: rollout and heartbeat.
    def _follow(self) -> None:
        serving = self.engine.weight_version
        decision = self.follower.decide(serving)
        target = decision.target
        if target is None or not decision.available or target == serving or target == self.switching_to:
            return
        tensors = None if target == 0 else self.weights.read(self.directory.path(target))
        self.switching_to = target
        self.engine_side.call(lambda: self._request_switch(target, tensors)).result()

    def _request_switch(self, version: int, tensors: dict[str, Any] | None) -> None:
        """Engine thread: prepares the serving set now; the engine installs it between iterations."""
        prepared = self.weights.base_serving_set() if tensors is None else self.weights.serving_set(tensors)

        def apply() -> None:
            self.weights.serving = prepared
            self.weights.use_serving()
            self.metrics.version.labels(role="serving").set(version)

        try:
            self.engine.request_weight_switch(WeightSwitch(version=version, apply=apply))
        except ValueError as exc:
            log.error("cannot switch to version %d: %s", version, exc)

    def _heartbeat(self) -> None:
        lag = self.consumer.lag() if self.training else None
        if lag is not None:
            self.metrics.lag_entries.set(lag.entries)
            self.metrics.lag_seconds.set(lag.seconds)
        self.heartbeat.beat(
            self.engine.weight_version,
            ready=True,
            feedback_lag=lag.entries if lag else 0,
            commit_error=self.commit_health.unresolved,
        )
        counters = self.consumer.counters
        dead, dup, _ = self._seen
        self.metrics.dead_letters.inc(counters.dead_letters - dead)
        self.metrics.duplicates.inc(counters.duplicates - dup)
        self._seen = (counters.dead_letters, counters.duplicates, counters.delivered)
        self.metrics.refresh_throughput()
        run_id = self._redis_run_id()
        if self.training and self._run_id is not None and run_id != self._run_id:
            # Its data may be gone, the lease included: the lease tick then takes a new token and restarts
            # training, whose reconcile rebuilds versions and trained feedback from the directory.
            log.warning("Redis restarted (run id changed): checking the trainer lease now")
            self._due["lease"] = 0.0
        self._run_id = run_id

    def _redis_run_id(self) -> str:
        return str(self.store.client.info("server").get("run_id", ""))

    def status(self) -> dict[str, Any]:
        """For /v1/versions and tests (called from the HTTP server's threads)."""
        try:
            lag = self.consumer.lag().entries if self.training else 0
        except Exception:  # informative only: the route answers without it
            lag = -1
        return {
            "feedback_lag": lag,
            "training": self.training,
            "head_version": self.trainer.head_version,
            "serving_version": self.engine.weight_version,
            "pending": len(self.pending),
            "in_step": len(self.in_step or []),
            "uncommitted_steps": len(self.uncommitted),
            "steps": self.trainer.step_count,
            "duties": self.duties.snapshot(),
            "redis_errors": self.redis_errors,
            "last_error": self.last_error,
            "lease_epoch": self.lease.epoch,
            "commit": self.commit_health.snapshot(self.committing),
        }
