"""The communication thread of a data-parallel member: generations and synchronous rounds.

Outside a generation, the thread waits for a group record that lists this replica (and was formed by the
current lease holder), or, when it holds the trainer lease, forms one from the live offers. Joining means: offer
the generation, restore the record's committed version (weights and optimizer state: every member starts
identical), then form torch's process group (blocks until all members arrive, or the round timeout).

A round, on every member of a generation:
1. agree: all-reduce [samples ready here, leader's regroup flag]. Nothing anywhere: wait `poll_s`, again.
   The leader sets the flag after writing a new generation (a replica joined, left or failed; a rollback);
2. the local gradient of this member's batch (maybe empty) in slices on the engine thread (EngineSide);
3. all-reduce of the token-weighted gradients and the token counts, here, off the engine thread;
4. the identical optimizer step on the engine thread (one call), and the weights' digest;
5. all-gather of the contributions; the leader checks the digests and, on every `publish_every_steps`-th round
   of the generation, scores the candidate on the evaluation set when the job names one (in engine slices; the
   gate's reading goes with the version, as with one trainer) and commits one version with everyone's feedback
   of the rounds since the last one; then it broadcasts the outcome. A round not yet due is kept: every member
   holds its feedback, unacknowledged, until the version that covers it is committed, then marks the version
   committed and forgets the kept rounds' feedback (the leader's commit acknowledged it).
Any collective error (a member died, stalled past the timeout, or left) ends the generation on this member:
its step is cancelled, the feedback of its kept rounds and of the round in progress released unacknowledged
(it trains again, after the next generation restored the newest committed version, which holds none of it),
and it waits for the next generation. The leader waits `member_ttl_s` after a failure, so that a dead member's
offer has expired.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from alchemist_protocol.training_group import GroupRecord, MemberOffer, TrainingGroupStore

from alchemist_worker.continual.engine_side import StepDone
from alchemist_worker.continual.rehearsal import RehearsalBuffer, answers_of
from alchemist_worker.continual.trainer import StepResult
from alchemist_worker.distributed.communicator import Communicator
from alchemist_worker.distributed.round_commit import (
    AppliedRound,
    Contribution,
    RoundOutcome,
    RoundStats,
    diverged,
    round_draft,
)
from alchemist_worker.distributed.settings import DataParallelSettings
from alchemist_worker.distributed.trainer import AppliedStep, DataParallelTrainer
from alchemist_worker.evaluation.gate import newest_passed
from alchemist_worker.feedback.consumer import SettledFeedback
from alchemist_worker.versions.artifacts import write_trainer_state
from alchemist_worker.versions.publisher import CommitFailure, RedisUnavailable

if TYPE_CHECKING:
    from alchemist_worker.continual.control import Pending
    from alchemist_worker.distributed.control import DataParallelControl

log = logging.getLogger(__name__)
T = TypeVar("T")
FINALIZE_ATTEMPTS = 3


class Regroup(Exception):
    """This generation ends without a failure (the leader formed a new one, or the lease moved)."""


class RoundLoop:
    def __init__(
        self, control: DataParallelControl, settings: DataParallelSettings, group: TrainingGroupStore
    ) -> None:
        self.control = control
        self.settings = settings
        self.group = group
        self.replica = control.consumer.settings.consumer
        trainer = control.trainer
        if not isinstance(trainer, DataParallelTrainer):
            raise TypeError("data-parallel training needs a DataParallelTrainer")
        self.trainer: DataParallelTrainer = trainer
        self.comm = Communicator(settings.resolved_backend, settings.round_timeout_s)
        self.record: GroupRecord | None = None  # the generation this member trains in
        self.last_generation = 0
        self.kept: list[AppliedRound] = []  # rounds applied since the last version (the same on every member)
        self.stats = RoundStats()
        self._offer = MemberOffer(replica=self.replica)
        self._offer_lock = threading.Lock()
        self._done: queue.SimpleQueue[StepDone] = queue.SimpleQueue()
        self._step_id = 0
        self._settle_until = 0.0
        self._honoured: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Lifecycle.
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="data-parallel-rounds", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Withdraws the offer (the leader re-forms without us at once), then ends the thread."""
        self._stop.set()
        try:
            self.group.withdraw(self.replica)
        except Exception:  # Redis away: the offer expires by itself
            log.debug("withdrawing the offer failed", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still inside a collective: its timeout ends it; never tear the group down under it
        self.comm.close()

    def step_done(self, done: StepDone) -> None:
        """Engine thread: the local gradient of a round is ready."""
        self._done.put(done)

    def offer(self) -> None:
        """Renews this replica's offer (control thread, and here on every change of generation)."""
        with self._offer_lock:
            self._offer = self._offer.model_copy(update={"at": time.time()})
            self.group.offer(self._offer, self.settings.member_ttl_s)

    def _set_offer(self, generation: int, waiting: bool) -> None:
        with self._offer_lock:
            self._offer = MemberOffer(replica=self.replica, generation=generation, waiting=waiting)
            self.group.offer(self._offer, self.settings.member_ttl_s)

    def status(self) -> dict[str, Any]:
        record = self.record
        return {
            "generation": record.generation if record else None,
            "rank": self.comm.rank if record else None,
            "world_size": record.world_size if record else 0,
            "members": record.members if record else [],
            "waiting": record is None,
            "uncommitted_rounds": len(self.kept),
            "uncommitted_samples": sum(len(c.feedback) for r in self.kept for c in r.contributions),
            **self.stats.snapshot(),
        }

    # The thread.
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.record is None:
                    self._outside()
                else:
                    self._round()
            except Regroup as why:
                log.info("generation %s ends: %s", self.last_generation, why)
                self.stats.regroups += 1
                self._leave(failed=False)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "data-parallel round failed (%s: %s); leaving the generation", type(exc).__name__, exc
                )
                self.stats.failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._leave(failed=True)

    def _outside(self) -> None:
        lease = self.control.lease
        record = self.group.read()
        current_token = self.control.store.client.get(self.control.store.keys.trainer_lease)
        if isinstance(current_token, bytes):
            current_token = current_token.decode()
        joinable = (
            record is not None
            and record.generation > self.last_generation
            and self.replica in record.members
            and record.leader_token == current_token
        )
        if (
            not joinable
            and lease.held
            and lease.token == current_token
            and time.monotonic() >= self._settle_until
        ):
            record = self._form()
            joinable = record is not None
        if joinable and record is not None:
            self._join(record)
        else:
            if self._offer.generation or not self._offer.waiting:
                self._set_offer(0, waiting=True)
            self._stop.wait(self.settings.poll_s)

    def _form(self) -> GroupRecord | None:
        """Leader: a new generation of every live offer, this replica first (rank 0 hosts the store)."""
        control = self.control
        token = control.lease.token
        if token is None:
            return None
        control.publisher.reconcile(token)  # a commit a dead leader left half-way, before anyone trains on
        alive = {offer.replica for offer in self.group.offers()} | {self.replica}
        restore = control.store.latest_version()
        rollback = control.store.get_rollback()
        if rollback is not None and rollback.applies_to(restore):
            restore = rollback.version
            self._honoured = (rollback.version, rollback.requested_at)
        elif control.reverts_held():
            restore = newest_passed(restore, control.store.get_version)  # never build on a held head
        record = GroupRecord(
            generation=0,
            members=[self.replica, *sorted(alive - {self.replica})],
            master_addr=self.settings.address,
            master_port=self.settings.port,
            restore_version=restore,
        )
        formed = self.group.form(record, token)
        if formed is not None:
            log.info("formed generation %d: %s, from version %d", formed.generation, formed.members, restore)
        return formed

    def _join(self, record: GroupRecord) -> None:
        self._set_offer(record.generation, waiting=False)
        self.kept = []
        self.control.enter_generation(record)
        self.comm.join(record, self.replica)
        self.trainer.leads = self.comm.rank == 0
        self.record = record
        self.last_generation = record.generation
        self.control.start_training()
        log.info(
            "joined generation %d as rank %d of %d", record.generation, self.comm.rank, record.world_size
        )

    def _leave(self, failed: bool) -> None:
        record = self.record
        if record is not None:
            self.last_generation = max(self.last_generation, record.generation)
        self.record = None
        self.kept = []  # their feedback goes back with the rest of what the control holds
        self.comm.leave()
        try:
            self.control.leave_generation()
            self._set_offer(0, waiting=True)
        except Exception:  # Redis or the engine unavailable: the next pass tries again
            log.exception("leaving the generation")
        if failed:
            self._settle_until = time.monotonic() + self.settings.member_ttl_s

    # Rounds.
    def _round(self) -> None:
        record = self.record
        assert record is not None
        regroup = 0.0
        if self.comm.rank == 0:
            regroup = 1.0 if self._leader_regroups(record) else 0.0
        elif self.control.lease.held:
            raise Regroup("this replica took the trainer lease: it leads a new generation")
        ready = float(self.control.ready_count())
        agreed = self.comm.all_reduce_sum(torch.tensor([ready, regroup], dtype=torch.float64))
        if agreed[1] > 0:
            raise Regroup("the leader formed a new generation")
        if agreed[0] == 0:
            self.stats.empty_polls += 1
            self._stop.wait(self.settings.poll_s)
            return
        self._train_round(record)

    def _leader_regroups(self, record: GroupRecord) -> bool:
        """Leader: whether membership changed (or a rollback waits); if so it forms the next generation."""
        lease = self.control.lease
        if not lease.held or lease.token != record.leader_token:
            raise Regroup("the leader lost the trainer lease")
        offers = {offer.replica: offer for offer in self.group.offers()}
        alive = set(offers) | {self.replica}
        waiting = [
            name for name, offer in offers.items() if offer.waiting or offer.generation != record.generation
        ]
        rollback = self.control.store.get_rollback()
        rollback_due = (
            rollback is not None
            and rollback.applies_to(self.control.store.latest_version())
            and self._honoured != (rollback.version, rollback.requested_at)
        )
        if alive == set(record.members) and not waiting and not rollback_due:
            return False
        log.info(
            "re-forming the group: live %s, members %s, waiting %s, rollback %s",
            sorted(alive),
            record.members,
            waiting,
            rollback_due,
        )
        if self._form() is None:
            raise Regroup("the leader lost the trainer lease")
        return True

    def _train_round(self, record: GroupRecord) -> None:
        control = self.control
        started = time.perf_counter()
        batch = control.take_round_batch()
        result, error = self._local_gradient(batch)
        local_done = time.perf_counter()
        units = int(result.extra.get("units", result.response_tokens)) if result is not None else 0
        flat = self._engine(lambda: self.trainer.contribution(units))
        summed = self.comm.all_reduce_sum(flat)
        loss_sum = result.loss * units if result is not None else 0.0
        totals = self.comm.all_reduce_sum(torch.tensor([float(units), loss_sum], dtype=torch.float64))
        total_units = round(float(totals[0]))
        comm_s = time.perf_counter() - local_done
        if error is not None:
            control.round_failed_locally(batch, error)
            batch = []
        if total_units == 0:  # every member's step failed: nothing to apply, nothing to commit
            self._engine(self.trainer.discard_gradient)
            return
        leader = self.comm.rank == 0
        # Only the leader's count decides (live settings reach members at slightly different times).
        due = leader and len(self.kept) + 1 >= control.settings.publish_every_steps
        applied, snapshot, state = self._engine(lambda: self._apply(summed, total_units, due))
        mine = Contribution(
            replica=self.replica,
            feedback=[
                SettledFeedback(
                    p.item.feedback_id, p.item.entry_ids, p.item.feedback.label.value, p.sample.served_version
                )
                for p in batch
            ],
            outcomes=[(r.path, r.reason) for r in result.results] if result is not None else [],
            tokens=result.tokens if result is not None else 0,
            response_tokens=result.response_tokens if result is not None else 0,
            units=units if result is not None else 0,
            loss_sum=loss_sum if result is not None else 0.0,
            digest=applied.digest,
            answers=answers_of(p.sample for p in batch),
            rehearsed=int(result.extra.get("rehearsed", 0)) if result is not None else 0,
        )
        gathered_at = time.perf_counter()
        contributions: list[Contribution] = self.comm.all_gather_object(mine)
        comm_s += time.perf_counter() - gathered_at
        applied_round = AppliedRound(applied.step, contributions, applied.lr)
        commit_s = 0.0
        outcome: RoundOutcome | None = None
        if leader:
            commit_started = time.perf_counter()
            why = diverged(contributions)
            if why:
                log.error("%s: not publishing", why)
                outcome = RoundOutcome(error=why)
            elif due:
                outcome = self._commit(record, [*self.kept, applied_round], snapshot, state)
            else:
                outcome = RoundOutcome()
            commit_s = time.perf_counter() - commit_started
        broadcast_at = time.perf_counter()
        outcome = self.comm.broadcast_object(outcome)
        comm_s += time.perf_counter() - broadcast_at
        if outcome.error:
            raise Regroup(f"the round was not committed: {outcome.error}")
        self.kept.append(applied_round)
        if result is not None:  # the local step only computed a gradient; the round applied it at this rate
            result.lr = applied.lr
        control.round_applied(batch, result)
        answers = [a for c in contributions for a in c.answers]
        self._engine(lambda: self.trainer.trained(answers))
        if outcome.version is not None:
            version, passed = outcome.version, not outcome.held
            self._engine(lambda: self.trainer.committed(version, passed))
            control.rounds_committed(version)
            self.kept = []
            if outcome.revert_to is not None:
                control.revert_held(version, outcome.revert_to)
        total_s = time.perf_counter() - started
        stats = self.stats
        stats.rounds += 1
        stats.round_s += total_s
        stats.local_s += local_done - started
        stats.comm_s += comm_s
        stats.commit_s += commit_s
        stats.history.append(
            {"round_s": total_s, "local_s": local_done - started, "comm_s": comm_s, "commit_s": commit_s}
        )
        del stats.history[:-256]

    def _local_gradient(self, batch: list[Pending]) -> tuple[Any, BaseException | None]:
        """(StepResult or None, error) of this member's batch (with the round's rehearsal on the leader); None,
        None when it has nothing to train."""
        if not batch and not self._engine(self.trainer.rehearses):
            return None, None
        samples = [p.sample for p in batch]
        side = self.control.engine_side
        what = f"local gradient of {len(samples)} samples"
        return self._sliced(what, lambda step_id: side.begin_step(step_id, samples, False))

    def _candidate_scores(self) -> StepResult:
        """Leader: the applied step's weights scored on the evaluation set, in engine slices."""
        result, error = self._sliced("scoring the candidate", self.control.engine_side.begin_evaluation)
        if error is not None:
            raise error
        return result

    def _sliced(self, what: str, begin: Callable[[int], None]) -> tuple[Any, BaseException | None]:
        """Starts work on the engine thread under a new step id and waits for its (result, error).

        Logs when the engine thread has started it and when it ended: a member slow to contribute (the round
        waits for it) shows in its own log, and the kill test times its kill on the first line."""
        self._step_id += 1
        step_id = self._step_id
        self._engine(lambda: begin(step_id))
        log.info("round of generation %d: %s started", self.last_generation, what)
        started = time.perf_counter()
        while True:
            try:
                done = self._done.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    raise Regroup("stopping") from None
                continue
            if done.step_id == step_id:
                ended = "done" if done.error is None else f"failed ({type(done.error).__name__})"
                log.info(
                    "round of generation %d: %s %s in %.3f s",
                    self.last_generation,
                    what,
                    ended,
                    time.perf_counter() - started,
                )
                return done.result, done.error

    def _apply(self, summed: torch.Tensor, total_units: int, snapshot: bool) -> tuple[AppliedStep, Any, Any]:
        """Engine thread: the step; on a round that completes a version, the leader also snapshots what it will
        write (before any later step can change it)."""
        applied = self.trainer.apply(summed, total_units, self.settings.verify_weights)
        if not snapshot:
            return applied, None, None
        return applied, self.trainer.weights.snapshot(), self.trainer.state_dict()

    def _commit(
        self, record: GroupRecord, rounds: list[AppliedRound], snapshot: Any, state: dict[str, Any]
    ) -> RoundOutcome:
        """Leader: the version of the rounds since the last one, under the lease's fencing token."""
        control = self.control
        token = control.lease.token
        if token is None or token != record.leader_token:
            return RoundOutcome(error="the leader lost the trainer lease")
        parent = self.trainer.head_version  # the head, or a rollback's target
        # The gate judges every candidate, as with one trainer: the members wait in the outcome's broadcast
        # meanwhile, so the round timeout must cover the scoring (docs/data-parallel.md).
        reading = None
        if self.trainer.evaluation is not None:
            reading = control.gate_reading(self._candidate_scores(), parent)
        head = control.store.latest_version()
        version = head + 1
        # The snapshot predates the gather: this round's answers join the kept rounds' (rehearsal.py).
        answers = [a for c in rounds[-1].contributions for a in c.answers]
        state = {
            **state,
            "head_version": version,
            "lineage": sorted({*state["lineage"], version}),
            "unadmitted": state["unadmitted"] + RehearsalBuffer.entries_state(answers),
        }

        def write(path: Any) -> None:
            control.weights.write(path, snapshot, control.model_config)
            write_trainer_state(path, state)

        draft = round_draft(
            rounds,
            version=version,
            parent=parent,
            kind=control.weights.kind,
            write_files=write,
            training=control.settings.describe(),
            generation=record.generation,
            expected_head=head,
            evaluation=reading,
        )
        try:
            control.publisher.publish(draft, token)
        except CommitFailure as failure:
            control.metrics.commit_failures.labels(failure.kind).inc()
            return RoundOutcome(error=str(failure))
        for attempt in range(FINALIZE_ATTEMPTS):
            try:
                control.publisher.finalize(draft)
                break
            except RedisUnavailable as failure:
                if attempt == FINALIZE_ATTEMPTS - 1:
                    # Published; the next leader's reconcile acknowledges it. The members regroup first.
                    return RoundOutcome(
                        error=f"version {version} published, feedback not acknowledged: {failure}"
                    )
                time.sleep(0.2 * 2**attempt)
        control.version_published(draft, version, rounds=len(rounds))
        control.judged(version, reading)
        held = reading is not None and reading.held
        return RoundOutcome(version, held=held, revert_to=parent if held and control.reverts_held() else None)

    def _engine(self, fn: Callable[[], T]) -> T:
        return self.control.engine_side.call(fn).result()
