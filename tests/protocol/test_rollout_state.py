import redis
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.rollout_state import (
    CounterSnapshot,
    RolloutProgress,
    load_rollout,
    rollout_progress_key,
    save_rollout,
)
from alchemist_protocol.schemas import RolloutPointer


def test_rollout_is_absent_until_an_operator_writes_it(redis_client: redis.Redis) -> None:
    keys = JobKeys("ns", "job")
    pointer, progress = load_rollout(redis_client, keys)
    assert pointer is None and progress == RolloutProgress(updated_at=progress.updated_at)


def test_pointer_and_progress_are_written_together(redis_client: redis.Redis) -> None:
    keys = JobKeys("ns", "job")
    pointer = RolloutPointer(stable_version=2, canary_version=3, canary_replicas=["job-1"])
    progress = RolloutProgress(
        phase="Canary",
        started_at=10.0,
        stable_baseline=CounterSnapshot(positive=4, total=5),
        rejected_versions=[1],
    )
    save_rollout(redis_client, keys, pointer, progress)
    assert rollout_progress_key(keys) == "alchemist:ns:job:rollout:progress"
    loaded_pointer, loaded_progress = load_rollout(redis_client, keys)
    assert loaded_pointer is not None and loaded_pointer.version_for("job-1") == 3
    assert loaded_pointer.version_for("job-0") == 2
    assert loaded_progress == progress
