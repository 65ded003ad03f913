"""The data-parallel training group's membership in Redis: who trains together, in which generation.

Every replica of a job may train. Membership lives here, the communication itself in torch.distributed:
- each replica offers to train with a key that has a TTL (`MemberOffer`), renewed while it is alive: a replica
  killed or stalled drops out when the key expires;
- the trainer lease holder (the group's leader and only publisher) writes the group record (`GroupRecord`): a
  new generation number, the members in rank order (the leader first, rank 0, which hosts torch's TCPStore at
  `master_addr:master_port`) and the committed version every member restores before its first round. The write
  is fenced by the lease token in one script, so a leader whose lease lapsed cannot re-form the group;
- a member whose collective failed, or that has just started, offers with `waiting` set: the leader then forms
  a new generation at its next round boundary (or at once when it is itself out of a group).
The operator reads the record for the job's status (group size and generation). Imports neither torch nor kopf.
"""

from __future__ import annotations

import time

import redis
from pydantic import BaseModel, ConfigDict, Field

from alchemist_protocol.keys import JobKeys


class MemberOffer(BaseModel):
    """A replica's offer to train, refreshed while it lives."""

    model_config = ConfigDict(extra="ignore")

    replica: str
    generation: int = Field(default=0, ge=0)  # the generation it trains in (or joins); 0: none yet
    waiting: bool = True  # out of any group: it waits for a new generation that includes it
    at: float = Field(default_factory=time.time)


class GroupRecord(BaseModel):
    """One generation of the training group. Rank r is `members[r]`; rank 0 leads and publishes."""

    model_config = ConfigDict(extra="ignore")

    generation: int = Field(ge=0)  # set by the fenced script, never by the writer
    members: list[str] = Field(min_length=1)
    master_addr: str
    master_port: int = Field(ge=1, le=65535)
    restore_version: int = Field(ge=0)  # every member loads this committed version before its first round
    leader_token: str = ""  # the lease token it was formed under
    # Milliseconds: the forming script re-encodes the record with Lua's cjson, which keeps 14 digits.
    formed_at: float = Field(default_factory=lambda: round(time.time(), 3))

    @property
    def world_size(self) -> int:
        return len(self.members)

    def rank_of(self, replica: str) -> int | None:
        return self.members.index(replica) if replica in self.members else None


# KEYS: group record, generation counter, trainer lease. ARGV: lease token, record JSON (generation ignored).
# Returns the new generation, or 0 when the token is no longer the lease's.
_FORM = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
local generation = redis.call('INCR', KEYS[2])
local record = cjson.decode(ARGV[2])
record['generation'] = generation
redis.call('SET', KEYS[1], cjson.encode(record))
return generation
"""


class TrainingGroupStore:
    def __init__(self, client: redis.Redis, keys: JobKeys) -> None:
        self.client = client
        self.keys = keys
        self._form = client.register_script(_FORM)

    def offer(self, offer: MemberOffer, ttl_s: float) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(
            self.keys.training_group_member(offer.replica), offer.model_dump_json(), px=int(ttl_s * 1000)
        )
        pipe.sadd(self.keys.training_group_candidates, offer.replica)
        pipe.execute()

    def withdraw(self, replica: str) -> None:
        self.client.delete(self.keys.training_group_member(replica))

    def offers(self) -> list[MemberOffer]:
        """Live offers (keys not expired), sorted by replica name."""
        names = sorted(
            n.decode() if isinstance(n, bytes) else str(n)
            for n in self.client.smembers(self.keys.training_group_candidates)
        )
        if not names:
            return []
        raws = self.client.mget([self.keys.training_group_member(n) for n in names])
        return [MemberOffer.model_validate_json(raw) for raw in raws if raw is not None]

    def read(self) -> GroupRecord | None:
        raw = self.client.get(self.keys.training_group)
        return None if raw is None else GroupRecord.model_validate_json(raw)

    def form(self, record: GroupRecord, fence: str) -> GroupRecord | None:
        """Writes a new generation of `record` while `fence` is the lease's token; None when it is not."""
        record = record.model_copy(update={"leader_token": fence})
        generation = int(
            self._form(
                keys=[self.keys.training_group, self.keys.training_group_generation, self.keys.trainer_lease],
                args=[fence, record.model_dump_json()],
            )
        )
        if generation == 0:
            return None
        return record.model_copy(update={"generation": generation})
