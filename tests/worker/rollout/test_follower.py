import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import ArtifactKind, RollbackRequest, RolloutPointer, VersionInfo
from alchemist_worker.rollout.follower import FollowMode, RolloutFollower, target_version
from alchemist_worker.rollout.heartbeat import Heartbeat


def test_target_version_by_mode() -> None:
    canary = RolloutPointer(stable_version=2, canary_version=3, canary_replicas=["r1"])
    assert target_version(FollowMode.POINTER, "r0", canary, 5, None, 0) == 2
    assert target_version(FollowMode.POINTER, "r1", canary, 5, None, 0) == 3
    assert target_version(FollowMode.POINTER, "r0", None, 5, None, 0) is None
    assert target_version(FollowMode.AUTO, "r1", canary, 5, None, 0) == 3
    assert target_version(FollowMode.AUTO, "r0", None, 5, None, 0) == 5
    rollback = RollbackRequest(version=2, superseded_up_to=5)
    assert target_version(FollowMode.LATEST, "r0", None, 5, rollback, 5) == 2
    assert target_version(FollowMode.LATEST, "r0", None, 6, rollback, 2) == 6  # the trainer moved on from 2
    # Without a rollback, `latest` never goes back (e.g. Redis restarted and its index is not rebuilt yet).
    assert target_version(FollowMode.LATEST, "r0", None, 0, None, 4) is None


def test_follower_reads_redis_and_checks_availability(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, JobKeys("ns", "job"))
    on_disk = {1}
    follower = RolloutFollower(store, "r0", FollowMode.AUTO, lambda v: v in on_disk)
    assert follower.decide(0).target is None
    for v in (1, 2):
        store.publish_version(VersionInfo(version=v, parent=v - 1, kind=ArtifactKind.LORA, path=f"/v/{v}"))
    decision = follower.decide(0)
    assert decision.target == 2 and not decision.available  # published, not yet visible here
    store.set_rollout(RolloutPointer(stable_version=1))
    assert follower.decide(0).target == 1 and follower.decide(0).available


def test_heartbeat_reports_loaded_version_with_a_ttl(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, JobKeys("ns", "job"))
    beat = Heartbeat(store, "r0", interval_s=2.0)
    assert beat.due()
    beat.beat(loaded_version=3, ready=True, feedback_lag=7)
    assert not beat.due()
    (state,) = store.live_replicas()
    assert state.loaded_version == 3 and state.feedback_lag == 7
    assert 0 < redis_client.ttl(store.keys.replica("r0")) <= 6


def test_latest_skips_versions_the_evaluation_gate_held() -> None:
    # Published up to 5; the gate held 4 and 5, so 3 is the newest servable version.
    assert target_version(FollowMode.LATEST, "r0", None, 5, None, serving=2, servable=3) == 3
    assert target_version(FollowMode.LATEST, "r0", None, 5, None, serving=3, servable=3) is None
    assert target_version(FollowMode.LATEST, "r0", None, 5, None, serving=2) == 5  # no gate: latest
