"""Per-user histories: capped lists of (item_id, ts), in Redis or in this process.

Redis layout (prefix P, default "sidrec:"):
  P hist:{user}             list, newest first (LPUSH + LTRIM to history_len), entries "ts item_id"
  P evt:{user}:event_id     "1" with a TTL: this event_id was stored, a retry is a duplicate
  P evts:{user}             sorted set of that user's evt keys, score = when each expires: the
                            index that lets DELETE /v1/users/{id} find them without a SCAN
The braces are Redis Cluster hash tags: a user's keys live in one slot, so the Lua scripts that
check an id and append, or erase a user, are one atomic step each, also on a cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.cluster import RedisCluster

from .store import StoreClient

# KEYS[1] = history list, KEYS[2] = event-id index, KEYS[3..] = event-id keys.
# ARGV[1] = cap, ARGV[2] = event-id TTL (s), ARGV[3] = now (unix s), then pairs (entry, index
# into KEYS or 0 = no id). Returns how many entries were pushed (the rest were retries of
# stored event ids). The index drops members whose keys have expired, so it holds no more than
# the event ids still remembered.
_APPEND_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local pushed = 0
local indexed = false
for i = 4, #ARGV, 2 do
  local key_index = tonumber(ARGV[i + 1])
  if key_index == 0 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    pushed = pushed + 1
  elseif redis.call('SET', KEYS[key_index], '1', 'NX', 'EX', ttl) then
    redis.call('ZADD', KEYS[2], now + ttl, KEYS[key_index])
    indexed = true
    redis.call('LPUSH', KEYS[1], ARGV[i])
    pushed = pushed + 1
  end
end
if pushed > 0 then redis.call('LTRIM', KEYS[1], 0, cap - 1) end
if indexed then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return pushed
"""

# KEYS[1] = history list, KEYS[2] = event-id index, KEYS[3..] = the event-id keys the index
# held when the caller read it (a script must name every key it touches, also on a cluster).
# Returns {history entries removed, event ids removed, index members not named in KEYS}: the
# last is non-zero only when an event with an id arrived between the read and this call, and
# the caller erases again.
_ERASE_LUA = """
local entries = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
local ids = 0
for i = 3, #KEYS do
  ids = ids + redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[2], KEYS[i])
end
local left = redis.call('ZCARD', KEYS[2])
if left == 0 then redis.call('DEL', KEYS[2]) end
return {entries, ids, left}
"""

# Longest RPUSH of a bulk load: a history of SIDREC_HISTORY_LEN (up to 100,000) entries goes in
# several, so no single command holds Redis for long.
_RPUSH_CHUNK = 10_000


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

    async def replace(self, histories: Iterable[tuple[str, Sequence[tuple[str, int]]]]) -> int:
        """Bulk load: each user's stored list becomes the newest history_len of the given
        (item_id, ts), oldest first. Running it twice stores the same lists. Returns how many
        entries were stored."""
        ...

    async def erase(self, user_id: str) -> Erased:
        """Forget a user: history and remembered event ids. An unknown user is no error."""
        ...


@dataclass(frozen=True)
class Erased:
    history_events: int  # entries the history held
    event_ids: int  # event ids still remembered (retries of them would have been duplicates)


def _chronological(newest_first: list[tuple[str, int]]) -> list[tuple[str, int]]:
    # Arrival order, then a stable sort by ts: late-arriving old events land where they belong.
    return sorted(reversed(newest_first), key=lambda e: e[1])


def _parse(raw: list[bytes]) -> list[tuple[str, int]]:
    entries = []
    for entry in raw:
        ts, item_id = entry.decode().split(" ", 1)
        entries.append((item_id, int(ts)))
    return _chronological(entries)


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
        self._erase = redis.register_script(_ERASE_LUA)

    def _hist_key(self, user_id: str) -> str:
        return f"{self.prefix}hist:{{{user_id}}}"

    def _evt_key(self, user_id: str, event_id: str) -> str:
        return f"{self.prefix}evt:{{{user_id}}}:{event_id}"

    def _evt_index_key(self, user_id: str) -> str:
        return f"{self.prefix}evts:{{{user_id}}}"

    def _load_key(self, user_id: str) -> str:
        # Where a bulk load builds a user's list before RENAME puts it in place (same slot).
        return f"{self.prefix}hist-load:{{{user_id}}}"

    async def append(self, events: Sequence[Event]) -> int:
        by_user: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            by_user[e.user_id].append(e)
        calls: list[tuple[list[str], list[str | int]]] = []
        now = int(time.time())
        for user_id, user_events in by_user.items():
            keys = [self._hist_key(user_id), self._evt_index_key(user_id)]
            args: list[str | int] = [self.history_len, self.event_id_ttl_s, now]
            for e in user_events:
                key_index = 0
                if e.event_id is not None:
                    keys.append(self._evt_key(user_id, e.event_id))
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
        return _parse(raw)

    async def history_and_get(
        self, user_id: str, key: str
    ) -> tuple[list[tuple[str, int]], bytes | None]:
        """The history and the value of one other key, in one round trip (one server only).

        /v1/recommend reads the catalog's retirement counter with every history
        (service/catalog.py): one pipeline takes one pooled connection, one write and one read
        where two commands took two of each."""
        if isinstance(self.redis, RedisCluster):
            raise TypeError(
                "history_and_get needs one Redis server: on a cluster the keys live apart"
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self._hist_key(user_id), 0, self.history_len - 1)
            pipe.get(key)
            raw, value = await pipe.execute()
        return _parse(raw), value

    async def ping(self) -> None:
        await self.redis.ping()

    async def replace(self, histories: Iterable[tuple[str, Sequence[tuple[str, int]]]]) -> int:
        # Plain commands, one pipeline (a cluster pipeline splits them by node; no script, so
        # no NOSCRIPT there). Each list is built aside and RENAMEd over the old one: a reader
        # sees the old list or the new one, never an empty or half-written one.
        stored = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, events in histories:
                newest = events[-self.history_len :]
                if not newest:
                    continue
                scratch = self._load_key(user_id)
                pipe.delete(scratch)
                entries = [f"{ts} {item_id}" for item_id, ts in reversed(newest)]
                for start in range(0, len(entries), _RPUSH_CHUNK):
                    pipe.rpush(scratch, *entries[start : start + _RPUSH_CHUNK])
                # execute_command: redis-py's cluster pipeline blocks rename() as a multi-key
                # command, but both keys share the user's slot.
                pipe.execute_command("RENAME", scratch, self._hist_key(user_id))
                stored += len(newest)
            await pipe.execute()
        return stored

    async def erase(self, user_id: str) -> Erased:
        hist, index = self._hist_key(user_id), self._evt_index_key(user_id)
        entries = ids = 0
        for _ in range(10):
            members = [m.decode() for m in await self.redis.zrange(index, 0, -1)]
            # Only this user's keys, whatever the index holds (it is ours, but a key outside
            # the user's slot would fail the script on a cluster).
            own = self._evt_key(user_id, "")
            named = [m for m in members if m.startswith(own)]
            removed, removed_ids, left = await self._erase(keys=[hist, index, *named])
            entries += int(removed)
            ids += int(removed_ids)
            if int(left) == 0 or len(named) < len(members):
                break
        return Erased(entries, ids)


class MemoryHistoryStore:
    """Same behaviour as RedisHistoryStore, for one process without Redis. Lost on exit."""

    kind = "memory"

    def __init__(self, history_len: int, event_id_ttl_s: int) -> None:
        self.history_len = history_len
        self.event_id_ttl_s = event_id_ttl_s
        self._lists: dict[str, deque[tuple[str, int]]] = {}
        # user -> event_id -> expiry: by user, so erasing one finds that user's ids at once
        self._event_ids: dict[str, dict[str, float]] = {}
        self._event_id_count = 0
        self._lock = asyncio.Lock()

    async def append(self, events: Sequence[Event]) -> int:
        now = time.monotonic()
        pushed = 0
        async with self._lock:
            for e in events:
                if e.event_id is not None:
                    ids = self._event_ids.setdefault(e.user_id, {})
                    if ids.get(e.event_id, 0.0) > now:
                        continue
                    self._event_id_count += e.event_id not in ids
                    ids[e.event_id] = now + self.event_id_ttl_s
                entries = self._lists.setdefault(e.user_id, deque(maxlen=self.history_len))
                entries.appendleft((e.item_id, e.ts))
                pushed += 1
            if self._event_id_count > 1_000_000:  # forget expired ids now and then
                self._forget_expired(now)
        return pushed

    def _forget_expired(self, now: float) -> None:
        kept = {u: {i: t for i, t in ids.items() if t > now} for u, ids in self._event_ids.items()}
        self._event_ids = {u: ids for u, ids in kept.items() if ids}
        self._event_id_count = sum(len(ids) for ids in self._event_ids.values())

    async def history(self, user_id: str) -> list[tuple[str, int]]:
        return _chronological(list(self._lists.get(user_id, ())))

    async def ping(self) -> None:
        return None

    async def replace(self, histories: Iterable[tuple[str, Sequence[tuple[str, int]]]]) -> int:
        stored = 0
        async with self._lock:
            for user_id, events in histories:
                newest = events[-self.history_len :]
                if not newest:
                    continue
                # Newest first, like the Redis list (and what append's appendleft keeps).
                self._lists[user_id] = deque(reversed(newest), maxlen=self.history_len)
                stored += len(newest)
        return stored

    async def erase(self, user_id: str) -> Erased:
        now = time.monotonic()
        async with self._lock:
            entries = self._lists.pop(user_id, ())
            ids = self._event_ids.pop(user_id, {})
            self._event_id_count -= len(ids)
        return Erased(len(entries), sum(1 for t in ids.values() if t > now))
