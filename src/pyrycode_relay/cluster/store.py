"""Ownership and liveness keys in Redis (cluster mode).

Owns: the key names, and every command that reads or changes them — acquiring a server-id
(`SET NX PX` semantics), the compare-and-set takeover, batched lease renewal, release,
this instance's liveness key and the peers' liveness check. Each change is one Lua script,
so a check and its write are atomic on the Redis side.
Must never: decide relay behaviour (the placement does) or swallow a Redis error: callers
treat any error as "Redis unreachable".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

OWNER_PREFIX: Final = "pyrycode-relay:owner:"
INSTANCE_PREFIX: Final = "pyrycode-relay:instance:"
RENEW_CHUNK: Final = 500  # keys per renewal script call: bounded Redis work per call

# KEYS[1] owner key; ARGV me, lease ms. Free → ours. Returns the owner after the call.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return cur
"""
# KEYS[1] owner key; ARGV expected, me, lease ms. Ours if it still names `expected` (or
# nobody, or us already). 1 = ours, 0 = someone else won.
_CAS = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# KEYS owner keys; ARGV me, lease ms. Extends ours, re-asserts lapsed ones (after a Redis
# restart), returns the 1-based indexes of keys another instance now holds.
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if not cur then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  elseif cur == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""
# KEYS[1] instance key; ARGV value, process prefix, lease ms. Refreshes our liveness key
# unless another process (same id, other prefix) holds it: 0 then.
_KEEP_ALIVE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
# KEYS[1] instance key; ARGV process prefix. Deletes it if it is still ours.
_LEAVE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS owner keys; ARGV me. Deletes the ones we still hold.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class InstanceIdTaken(RedisError):
    """Another live process uses our --instance-id. A RedisError so that it takes the
    "Redis unusable" path: this instance keeps its local pairs and stays off the bus."""


class OwnershipStore:
    def __init__(self, client: Redis, instance_id: str, lease: float) -> None:
        self._client = client
        self.me = instance_id
        self._lease_ms = max(1, int(lease * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._cas = client.register_script(_CAS)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._keep_alive = client.register_script(_KEEP_ALIVE)
        self._leave = client.register_script(_LEAVE)

    # -- server-ids -----------------------------------------------------------------

    async def acquire(self, server_id: str) -> str:
        """Take the id if nobody owns it; returns its owner (us, or who holds it)."""
        owner = await self._acquire(keys=[OWNER_PREFIX + server_id], args=[self.me, self._lease_ms])
        return _text(owner)

    async def take(self, server_id: str, expected: str, new_owner: str | None = None) -> bool:
        """Compare-and-set: the id moves from `expected` to `new_owner` (default us)."""
        won = await self._cas(
            keys=[OWNER_PREFIX + server_id],
            args=[expected, new_owner or self.me, self._lease_ms],
        )
        return bool(won)

    async def owner(self, server_id: str) -> str | None:
        value = await self._client.get(OWNER_PREFIX + server_id)
        return None if value is None else _text(value)

    async def renew(self, server_ids: list[str]) -> list[str]:
        """Extend every lease we hold; returns the ids another instance holds now."""
        lost: list[str] = []
        for start in range(0, len(server_ids), RENEW_CHUNK):
            chunk = server_ids[start : start + RENEW_CHUNK]
            indexes = await self._renew(
                keys=[OWNER_PREFIX + sid for sid in chunk], args=[self.me, self._lease_ms]
            )
            lost.extend(chunk[int(i) - 1] for i in indexes)
        return lost

    async def release(self, server_ids: Iterable[str]) -> None:
        ids = list(server_ids)
        for start in range(0, len(ids), RENEW_CHUNK):
            chunk = ids[start : start + RENEW_CHUNK]
            await self._release(keys=[OWNER_PREFIX + sid for sid in chunk], args=[self.me])

    # -- instances ------------------------------------------------------------------

    async def register_instance(self, incarnation: str) -> bool:
        """Boot: claim our instance id; False while another live process uses it."""
        ok = await self._client.set(
            INSTANCE_PREFIX + self.me, incarnation, nx=True, px=self._lease_ms
        )
        return bool(ok)

    async def keep_alive(self, incarnation: str, process: str) -> None:
        """Refresh our liveness key with `incarnation` (which starts with `process`).
        Raises InstanceIdTaken if another process holds our id (both started while Redis
        was unreachable, so the boot check could not see it)."""
        ok = await self._keep_alive(
            keys=[INSTANCE_PREFIX + self.me], args=[incarnation, process, self._lease_ms]
        )
        if not ok:
            raise InstanceIdTaken(self.me)

    async def leave(self, process: str) -> None:
        await self._leave(keys=[INSTANCE_PREFIX + self.me], args=[process])

    async def incarnations(self, instance_ids: list[str]) -> dict[str, str | None]:
        """Each peer's current incarnation token (None: its liveness key lapsed)."""
        if not instance_ids:
            return {}
        values = await self._client.mget([INSTANCE_PREFIX + i for i in instance_ids])
        return {i: _text_or_none(v) for i, v in zip(instance_ids, values, strict=True)}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_or_none(value: object) -> str | None:
    return None if value is None else _text(value)
