"""Per-user histories: capped lists of (item_id, ts), in Redis or in this process.

Redis layout (prefix P, default "sidrec:"):
  P hist:{user}             list, newest first (LPUSH + LTRIM to history_len), entries "ts item_id"
  P evt:{user}:event_id     "1" with a TTL: this event_id was stored, a retry is a duplicate
The braces are Redis Cluster hash tags: a user's list and event ids live in one slot, so the
Lua script that checks the id and appends is one atomic step, also on a cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.cluster import RedisCluster

from .store import StoreClient

# KEYS[1] = history list, KEYS[2..] = event-id keys.
# ARGV[1] = cap, ARGV[2] = event-id TTL (s), then pairs (entry, index into KEYS or 0 = no id).
# Returns how many entries were pushed (the rest were retries of stored event ids).
_APPEND_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local pushed = 0
for i = 3, #ARGV, 2 do
  local key_index = tonumber(ARGV[i + 1])
  if key_index == 0 or redis.call('SET', KEYS[key_index], '1', 'NX', 'EX', ttl) then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    pushed = pushed + 1
  end
end
if pushed > 0 then redis.call('LTRIM', KEYS[1], 0, cap - 1) end
return pushed
"""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    ts: int  # unix seconds
    event_id: str | None = None


class HistoryStore(Protocol):
    kind: str  # "redis" | "memory"

    async def append(self, events: Sequence[Event]) -> int:
        """Store events; returns how many were new (a stored event_id is a duplicate)."""
        ...

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        """At most history_len (item_id, ts), oldest first (by ts, then arrival)."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot answer."""
        ...


def _chronological(newest_first: list[tuple[str, int]]) -> list[tuple[str, int]]:
    # Arrival order, then a stable sort by ts: late-arriving old events land where they belong.
    return sorted(reversed(newest_first), key=lambda e: e[1])


class RedisHistoryStore:
    kind = "redis"

    def __init__(
        self, redis: StoreClient, prefix: str, history_len: int, event_id_ttl_s: int
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.history_len = history_len
        self.event_id_ttl_s = event_id_ttl_s
        self._append = redis.register_script(_APPEND_LUA)

    def _hist_key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{{{user_id}}}"

    async def append(self, events: Sequence[Event]) -> int:
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        calls: list[tuple[list[str], list[str | int]]] = []
        for user_id, user_events in by_user.items():
            keys = [self._hist_key(user_id)]
            args: list[str | int] = [self.history_len, self.event_id_ttl_s]
            for e in user_events:
                key_index = 0
                if e.event_id is not None:
                    keys.append(f"{self.prefix}evt:{{{user_id}}}:{e.event_id}")
                    key_index = len(keys)
                args += [f"{e.ts} {e.item_id}", key_index]
            calls.append((keys, args))
        pushed: list[int] = []
        if isinstance(self.redis, RedisCluster):
            # Users live on different nodes, and a cluster pipeline cannot load a script the
            # node lacks (NOSCRIPT): one call per user, a few at a time (each is one slot).
            for start in range(0, len(calls), 16):
                pushed += await asyncio.gather(
                    *(self._append(keys=k, args=a) for k, a in calls[start : start + 16])
                )
        else:
            # One script call per user (atomic per user), all in one round trip.
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._append(keys=keys, args=args, client=pipe)
                pushed = await pipe.execute()
        return sum(int(p) for p in pushed)

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        raw = await self.redis.lrange(self._hist_key(user_id), 0, self.history_len - 1)
        entries = []
        for entry in raw:
            ts, item_id = entry.decode().split(" ", 1)
            entries.append((item_id, int(ts)))
        return _chronological(entries)

    async def ping(self) -> None:
        await self.redis.ping()


class MemoryHistoryStore:
    """Same behaviour as RedisHistoryStore, for one process without Redis. Lost on exit."""

    kind = "memory"

    def __init__(self, history_len: int, event_id_ttl_s: int) -> None:
        self.history_len = history_len
        self.event_id_ttl_s = event_id_ttl_s
        self._lists: dict[str, deque[tuple[str, int]]] = {}
        self._event_ids: dict[tuple[str, str], float] = {}  # (user, event_id) -> expiry
        self._lock = asyncio.Lock()

    async def append(self, events: Sequence[Event]) -> int:
        now = time.monotonic()
        pushed = 0
        async with self._lock:
            for e in events:
                if e.event_id is not None:
                    key = (e.user_id, e.event_id)
                    if self._event_ids.get(key, 0.0) > now:
                        continue
                    self._event_ids[key] = now + self.event_id_ttl_s
                entries = self._lists.setdefault(e.user_id, deque(maxlen=self.history_len))
                entries.appendleft((e.item_id, e.ts))
                pushed += 1
            if len(self._event_ids) > 1_000_000:  # forget expired ids now and then
                self._event_ids = {k: t for k, t in self._event_ids.items() if t > now}
        return pushed

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        return _chronological(list(self._lists.get(user_id, ())))

    async def ping(self) -> None:
        return None
