import time

import redis
from alchemist_protocol.feedback_client import FeedbackClient
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import (
    ArtifactKind,
    FeedbackLabel,
    ReplicaState,
    RequestRecord,
    RolloutPointer,
    VersionInfo,
    parse_feedback,
)


def store_for(client: redis.Redis) -> JobStore:
    return JobStore(client, JobKeys("ns", "job"))


def test_request_records_expire(redis_client: redis.Redis) -> None:
    store = store_for(redis_client)
    record = RequestRecord(
        request_id="cmpl-1", prompt_tokens=[1, 2], response_tokens=[3], replica="r0", version=0, model="m"
    )
    store.put_request(record, ttl_seconds=1)
    assert store.get_request("cmpl-1") == record
    assert 0 < redis_client.ttl(store.keys.request("cmpl-1")) <= 1
    time.sleep(1.1)
    assert store.get_request("cmpl-1") is None


def test_versions_are_published_atomically_and_ordered(redis_client: redis.Redis) -> None:
    store = store_for(redis_client)
    assert store.latest_version() == 0
    for v in (1, 2, 10):
        store.publish_version(VersionInfo(version=v, parent=v - 1, kind=ArtifactKind.LORA, path=f"/v/{v}"))
    assert store.latest_version() == 10
    assert store.version_numbers() == [1, 2, 10]
    info = store.get_version(2)
    assert info is not None and info.path == "/v/2"
    assert redis_client.xlen(store.keys.version_events) == 3
    store.forget_version(10)
    assert store.latest_version() == 2


def test_replica_heartbeats_expire(redis_client: redis.Redis) -> None:
    store = store_for(redis_client)
    store.report_replica(ReplicaState(replica="r1", loaded_version=1, ready=True), ttl_seconds=1)
    store.report_replica(ReplicaState(replica="r0", loaded_version=0, ready=True), ttl_seconds=30)
    assert [r.replica for r in store.live_replicas()] == ["r0", "r1"]
    time.sleep(1.1)
    assert [r.replica for r in store.live_replicas()] == ["r0"]


def test_rollout_pointer_and_feedback_counts(redis_client: redis.Redis) -> None:
    store = store_for(redis_client)
    assert store.get_rollout().stable_version == 0
    store.set_rollout(RolloutPointer(stable_version=1, canary_version=2, canary_replicas=["r1"]))
    assert store.get_rollout().version_for("r1") == 2
    store.count_feedback(2, FeedbackLabel.POSITIVE)
    store.count_feedback(2, FeedbackLabel.POSITIVE)
    store.count_feedback(2, FeedbackLabel.NEGATIVE)
    counts = store.feedback_counts(2)
    assert counts[FeedbackLabel.POSITIVE] == 2 and counts[FeedbackLabel.NEGATIVE] == 1


def test_feedback_client_writes_parseable_entries(redis_client: redis.Redis) -> None:
    client = FeedbackClient(redis_client, JobKeys("ns", "job"))
    client.accept("cmpl-1", idempotency_key="k1")
    client.reject("cmpl-2")
    client.correct("cmpl-3", "The answer is 4.")
    entries = redis_client.xrange(client.keys.feedback)
    parsed = [parse_feedback(fields) for _, fields in entries]
    assert [f.label for f in parsed] == [
        FeedbackLabel.POSITIVE,
        FeedbackLabel.NEGATIVE,
        FeedbackLabel.CORRECTION,
    ]
    assert parsed[2].correction == "The answer is 4."
    assert parsed[0].idempotency_key == "k1"
