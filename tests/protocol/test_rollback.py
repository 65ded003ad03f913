import pytest
import redis
from alchemist_protocol.job_store import JobStore
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import ArtifactKind, RollbackRequest, VersionInfo


def test_rollback_request_names_a_published_version(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, JobKeys("ns", "job"))
    assert store.get_rollback() is None and not store.has_rollout()
    for v in (1, 2, 3):
        store.publish_version(VersionInfo(version=v, parent=v - 1, kind=ArtifactKind.LORA, path=f"/v/{v}"))
    with pytest.raises(ValueError, match="not published"):
        store.request_rollback(7)
    request = store.request_rollback(1, reason="canary failed")
    assert store.get_rollback() == request
    assert request.superseded_up_to == 3
    # Honoured while the trainer has published nothing past 3, ignored once it has.
    assert request.applies_to(3) and not request.applies_to(4)


def test_rollback_cannot_point_forward() -> None:
    with pytest.raises(ValueError, match="latest published is 2"):
        RollbackRequest(version=3, superseded_up_to=2)
