import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.rollback_command import overwritten, roll_back, roll_back_and_settle
from alchemist_protocol.rollout_state import RolloutProgress, load_rollout, save_rollout
from alchemist_protocol.schemas import ArtifactKind, RolloutPointer, VersionInfo

KEYS = JobKeys("ns", "job")


def _store_with_versions(client: redis.Redis, count: int) -> JobStore:
    store = JobStore(client, KEYS)
    for v in range(1, count + 1):
        store.publish_version(VersionInfo(version=v, parent=v - 1, kind=ArtifactKind.LORA, path=f"/v/{v}"))
    return store


def test_without_an_operator_only_the_trainer_request_is_written(redis_client: redis.Redis) -> None:
    store = _store_with_versions(redis_client, 3)
    outcome = roll_back(redis_client, KEYS, 1, reason="bad answers")
    assert outcome.pointer is None and outcome.rejected == ()
    # The same message the existing rollback path writes, read back through the job store.
    request = store.get_rollback()
    assert request == outcome.request
    assert (request.version, request.superseded_up_to, request.reason) == (1, 3, "bad answers")
    assert not store.has_rollout()  # a pointer would switch workers from following the latest version


def test_with_an_operator_the_pointer_moves_back_and_newer_versions_are_rejected(
    redis_client: redis.Redis,
) -> None:
    store = _store_with_versions(redis_client, 4)
    canary = RolloutPointer(stable_version=3, canary_version=4, canary_replicas=["job-2"])
    save_rollout(
        redis_client, KEYS, canary, RolloutProgress(phase="Canary", started_at=1.0, rejected_versions=[2])
    )
    outcome = roll_back(redis_client, KEYS, 1)
    pointer, progress = load_rollout(redis_client, KEYS)
    assert pointer is not None and outcome.pointer is not None
    assert (pointer.stable_version, pointer.canary_version, pointer.canary_replicas) == (1, None, [])
    assert progress.phase == "Idle" and progress.started_at is None
    assert progress.rejected_versions == [2, 3, 4] and outcome.rejected == (2, 3, 4)
    assert "rolled back to version 1 by hand" in progress.message
    assert store.get_rollback() is not None and store.get_rollback().version == 1  # type: ignore[union-attr]
    for replica in ("job-0", "job-2"):
        assert pointer.version_for(replica) == 1


def test_the_base_model_is_always_a_target_and_unknown_versions_are_refused(
    redis_client: redis.Redis,
) -> None:
    store = _store_with_versions(redis_client, 2)
    save_rollout(redis_client, KEYS, RolloutPointer(stable_version=2), RolloutProgress())
    with pytest.raises(ValueError, match=r"version 7 is not published .*known: \[1, 2\]"):
        roll_back(redis_client, KEYS, 7)
    assert store.get_rollback() is None and store.get_rollout().stable_version == 2  # nothing written
    assert roll_back(redis_client, KEYS, 0).pointer == RolloutPointer(
        stable_version=0, updated_at=store.get_rollout().updated_at
    )


def test_a_racing_rollout_decision_is_caught_and_the_rollback_written_again(
    redis_client: redis.Redis,
) -> None:
    store = _store_with_versions(redis_client, 3)
    save_rollout(redis_client, KEYS, RolloutPointer(stable_version=3), RolloutProgress())
    stale = load_rollout(redis_client, KEYS)  # what the operator read just before the rollback
    waits: list[float] = []

    def operator_writes_its_stale_decision(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            assert stale[0] is not None
            save_rollout(redis_client, KEYS, stale[0], stale[1])

    outcome, redone = roll_back_and_settle(
        redis_client, KEYS, 1, settle_s=0.5, sleep=operator_writes_its_stale_decision
    )
    assert redone == 1 and waits == [0.5, 0.5]
    pointer, progress = load_rollout(redis_client, KEYS)
    assert pointer is not None and pointer.stable_version == 1 and progress.rejected_versions == [2, 3]
    assert not overwritten(redis_client, KEYS, outcome)
    # A child of the rolled-back version rolling out later is no race.
    store.publish_version(VersionInfo(version=4, parent=1, kind=ArtifactKind.LORA, path="/v/4"))
    save_rollout(redis_client, KEYS, RolloutPointer(stable_version=4), progress)
    assert not overwritten(redis_client, KEYS, outcome)
