"""One trainer per job: a lease in Redis that is also a fencing token, so the versions form one lineage.

Every replica serves; the replica holding the lease also consumes feedback and publishes versions. The lease is
a key with a TTL, renewed by its holder well before it lapses; when the holder dies the key expires and another
replica takes it (and, through XAUTOCLAIM, the feedback the dead one left pending).

A TTL alone cannot keep two trainers apart: a holder paused (SIGSTOP, a long GC, a stalled node) past its TTL
wakes up believing it still holds the lease while another replica trains. So each acquisition mints a new token,
`holder/epoch/nonce`, where the epoch is a counter bumped (INCR) at every acquisition and the nonce is random
(the counter restarts when Redis loses its data; the nonce keeps an old token from ever matching again). The
value of the lease key is the token, and the commit of a version (JobStore.commit_version) checks atomically that
the committer's token is still that value: a holder whose lease was taken over, or merely expired, can never
publish. Renewing an expired lease mints a new token too, so the holder knows it must restart from the newest
committed version.
"""

from __future__ import annotations

import uuid

import redis
from alchemist_protocol.keys import JobKeys

# KEYS: lease, epoch counter. ARGV: holder, TTL in ms, our current token ('' for none), a fresh nonce.
# Renews our own token; takes a free lease under a new epoch; returns the token held afterwards, or nil.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current and current == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return current
end
if current then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '/' .. epoch .. '/' .. ARGV[4]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def parse_token(token: str) -> tuple[str, int]:
    """(holder, epoch) of a lease token `holder/epoch/nonce`."""
    holder, epoch, _nonce = token.rsplit("/", 2)
    return holder, int(epoch)


class TrainerLease:
    def __init__(self, client: redis.Redis, keys: JobKeys, holder: str, ttl_s: float = 15.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease TTL must be positive, got {ttl_s}")
        self.client = client
        self.key = keys.trainer_lease
        self.epoch_key = keys.trainer_epoch
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self.token: str | None = None  # the fencing token while held

    @property
    def held(self) -> bool:
        return self.token is not None

    @property
    def epoch(self) -> int | None:
        return None if self.token is None else parse_token(self.token)[1]

    def acquire_or_renew(self) -> bool:
        """Renews our lease, or takes a free one under a new token; the caller compares `token` to notice."""
        reply = self._acquire(
            keys=[self.key, self.epoch_key],
            args=[self.holder, self.ttl_ms, self.token or "", uuid.uuid4().hex[:12]],
        )
        self.token = None if reply is None else (reply.decode() if isinstance(reply, bytes) else str(reply))
        return self.held

    def release(self) -> None:
        if self.token is not None:
            self._release(keys=[self.key], args=[self.token])
        self.token = None

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        if value is None:
            return None
        return parse_token(value.decode() if isinstance(value, bytes) else str(value))[0]
