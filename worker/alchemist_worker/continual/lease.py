"""One trainer per job: a lease in Redis, so the versions form one lineage however many replicas serve.

Every replica serves; the replica holding the lease also consumes feedback and publishes versions. The lease is
a key with the holder's name and a TTL, renewed by the holder well before it lapses; when the holder dies, the
key expires and another replica takes it (and, through XAUTOCLAIM, the feedback the dead one left pending).
Two holders can overlap only if a paused holder misses its TTL; the versions directory fences that case (a
version number can be committed once, see versions/directory.py).
"""

from __future__ import annotations

import redis
from alchemist_protocol.keys import JobKeys

# Take the lease when free, or renew it when it is ours; 1 when held by us afterwards.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TrainerLease:
    def __init__(self, client: redis.Redis, keys: JobKeys, holder: str, ttl_s: float = 15.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease TTL must be positive, got {ttl_s}")
        self.client = client
        self.key = keys.trainer_lease
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self.held = False

    def acquire_or_renew(self) -> bool:
        self.held = bool(self._acquire(keys=[self.key], args=[self.holder, self.ttl_ms]))
        return self.held

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])
        self.held = False

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
