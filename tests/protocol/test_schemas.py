import pytest
from alchemist_protocol.keys import JobKeys
from alchemist_protocol.schemas import (
    Feedback,
    FeedbackLabel,
    InvalidFeedback,
    RolloutPointer,
    dead_letter_fields,
    parse_feedback,
)


def test_keys_share_a_job_prefix_and_reject_bad_names() -> None:
    keys = JobKeys("team-a", "chat")
    assert keys.feedback == "alchemist:team-a:chat:feedback"
    assert keys.request("cmpl-1") == "alchemist:team-a:chat:request:cmpl-1"
    assert keys.version(3) == "alchemist:team-a:chat:version:3"
    with pytest.raises(ValueError, match="job"):
        JobKeys("ns", "a:b")
    with pytest.raises(ValueError, match="namespace"):
        JobKeys("", "job")


def test_feedback_roundtrips_through_stream_fields() -> None:
    fb = Feedback(request_id="cmpl-1", label=FeedbackLabel.CORRECTION, correction="Paris.", rating=0.5)
    assert parse_feedback(fb.to_fields()) == fb
    raw = {k.encode(): v.encode() for k, v in fb.to_fields().items()}
    assert parse_feedback(raw) == fb


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"label": "positive"}, "request_id"),
        ({"request_id": "r", "label": "meh"}, "label"),
        ({"request_id": "r", "label": "correction"}, "correction"),
        ({"request_id": "r", "label": "positive", "correction": "x"}, "only allowed"),
        ({"request_id": "r", "label": "positive", "rating": "7"}, "rating"),
        ({"request_id": "r", "label": "positive", "color": "red"}, "color"),
        ({"request_id": "r", "label": "positive", "timestamp": "yesterday"}, "timestamp"),
    ],
)
def test_invalid_feedback_has_a_reason(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidFeedback) as info:
        parse_feedback(fields)
    assert reason in info.value.reason


def test_dead_letter_keeps_original_fields() -> None:
    fields = dead_letter_fields("1-0", {b"label": b"meh"}, "label: bad")
    assert fields["reason"] == "label: bad"
    assert fields["source_id"] == "1-0"
    assert fields["orig.label"] == "meh"


def test_feedback_id_prefers_idempotency_key() -> None:
    assert Feedback(request_id="r", label="positive", idempotency_key="k").feedback_id("1-0") == "k"
    assert Feedback(request_id="r", label="positive").feedback_id("1-0") == "entry:1-0"


def test_rollout_pointer_routes_canary_replicas() -> None:
    pointer = RolloutPointer(stable_version=2, canary_version=3, canary_replicas=["job-1"])
    assert pointer.version_for("job-1") == 3
    assert pointer.version_for("job-0") == 2


def test_a_job_may_name_its_own_feedback_stream() -> None:
    keys = JobKeys("ns", "job", feedback_stream="shop:reactions")
    assert keys.feedback == "shop:reactions"
    assert keys.dead_letters == "alchemist:ns:job:feedback:dead"
    with pytest.raises(ValueError, match="feedback_stream"):
        JobKeys("ns", "job", feedback_stream="two words")
