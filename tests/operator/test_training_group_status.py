"""The job's status shows the data-parallel group: its generation, size and members, and keeps them while
Redis is away."""

from __future__ import annotations

from alchemist_operator.job_status import RedisView
from alchemist_operator.rollout import RolloutState
from alchemist_protocol.training_group import GroupRecord

from tests.operator.test_job_status import T1, compute_status, inputs

GROUP = GroupRecord(
    generation=7,
    members=["chat-1", "chat-0"],
    master_addr="chat-1.chat-headless.team-a.svc",
    master_port=29500,
    restore_version=4,
)


def test_the_group_is_in_the_status() -> None:
    redis = RedisView(reachable=True, state=RolloutState(stable=4), published=(4,), training_group=GROUP)
    status = compute_status(inputs(redis=redis))
    assert status["trainingGroup"] == {"generation": 7, "size": 2, "members": ["chat-1", "chat-0"]}
    away = compute_status(inputs(redis=RedisView(reachable=False, error="timeout"), previous=status, now=T1))
    assert away["trainingGroup"] == status["trainingGroup"]


def test_no_group_no_field() -> None:
    assert "trainingGroup" not in compute_status(inputs())
