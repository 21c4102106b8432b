"""Items added while the service runs: ingestion, persistence in Redis, and keeping every
worker's item table in step.

Ingesting an item (POST /v1/items):
  text -> content vector (ONNX) -> codes from the bundle's codebooks -> dedup digit handed out
  by Redis (atomic, so two workers never give out the same SID) -> item vector from the SID
  (ONNX) -> record written to Redis + an entry appended to the catalog stream, in one script
  -> added to this worker's table. The request is answered only after Redis has the record.
Every worker tails the stream and applies what the others wrote; at start it rebuilds all
ingested items from Redis.

Redis losing its data (restarted empty, FLUSHALL): every worker keeps the ingested items it
holds, and the generation marker tells it Redis lost them. The marker is a random token; each
worker remembers the one it saw. The scripts that hand out dedup digits and write records
refuse to run when the marker is not the caller's, so no write lands in a Redis that forgot
the catalog. A worker that finds the marker gone or changed (at once on a refused write;
within GENERATION_CHECK_S from its stream follower) takes a restore lease, writes every item
it holds back (HSETNX: newer records win), raises the dedup counters past the digits those
items hold, and drops the lease; its writes wait meanwhile.

Nobody sets a missing marker at once, neither a running worker nor a process that just
started (it cannot tell a first start from a Redis that lost its data a moment ago): it
waits GENERATION_GRACE_S from when it first saw the marker missing, longer than a follower
takes to notice, so every running worker has taken its lease by then, and the claim script
refuses while any lease is live. The first claim after that wins (SET), the others adopt it.
So a digit is handed out only after every worker that answers Redis has written back what it
holds, and SIDs handed out afterwards never repeat a live item's.

Redis layout (prefix P; "{catalog}" is a Cluster hash tag: every key below is in one slot, so
each script touches one node, also on a cluster):
  P{catalog}:items              hash item_id -> what the client sent + content vector (any version)
  P{catalog}:derived:<version>  hash item_id -> SID + vector under one bundle version
  P{catalog}:sidctr:<version>   hash "c1,c2,c3" -> next free dedup digit for that code tuple
  P{catalog}:sidasg:<version>   hash "c1,c2,c3|item_id" -> digit given to that item (retries
                                get the same digit)
  P{catalog}:stream             stream of {"item_id"}: "this record changed"
  P{catalog}:generation         random token: which life of this Redis the catalog belongs to
  P{catalog}:restoring          sorted set worker -> lease end (ms, Redis clock): workers
                                writing back after a loss; the marker is not set meanwhile
  P{catalog}:retired            sorted set item_id -> retirement number (bundle items included)
  P{catalog}:retired:seq        counter: the latest retirement number
SIDs and vectors are kept per bundle version: after a retrain, a worker on the new bundle
finds no derived record for its version and derives one from the stored content vector.

A bundle item re-ingested with content that maps to its bundle codes keeps its bundle SID and
trained vector (only the text changes); with different codes it becomes a SID-only item.

Retiring an item (DELETE /v1/items/{id}): one script deletes its record, numbers the retirement
(INCR retired:seq) and adds it to the retired set. Every read that can return items first
compares retired:seq with the number this worker last applied (one GET) and, when it moved,
reads the retirements after it (ZRANGEBYSCORE): so no worker returns the item from the next
request on, without waiting for a stream. At start a worker applies the whole set, which is
how a retired bundle item stays retired. Ingesting the id again removes it from the set.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from redis.exceptions import RedisError, ResponseError
from starlette.concurrency import run_in_threadpool

from sidrec.bundle import Bundle, ItemRecord
from sidrec.item_text import item_text
from sidrec.sid_codebook import Codebooks, CodePaths

from . import metrics
from .retrieval import ItemTable
from .runtime import Engine
from .store import StoreClient, StoreOverloaded

log = logging.getLogger("sidrec.service")

# Redis keeps this many catalog changes in the stream; the records themselves stay forever.
STREAM_MAXLEN = 1_000_000

# How often the stream follower checks that Redis still holds this worker's generation.
GENERATION_CHECK_S = 0.5
# How long a process that finds the marker missing waits before setting it (from when it
# first saw it missing): every running worker's follower has noticed by then and holds a
# restore lease until it has written back what it holds.
GENERATION_GRACE_S = 2 * GENERATION_CHECK_S
# A restore lease lasts this long unless renewed (every chunk written back): a worker that dies
# while writing back holds the marker back no longer than this.
RESTORE_LEASE_S = 10.0
_STALE = "SIDREC_STALE_GENERATION"
# Every write script starts with this: KEYS[#KEYS] = marker, ARGV[1] = the caller's token.
_CHECK_GENERATION = f"""
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[1] then
  return redis.error_reply('{_STALE} the catalog generation changed')
end
"""

# KEYS[1] = counters, KEYS[2] = assignments, KEYS[3] = marker; ARGV[1] = generation, then
# triples (tuple, "tuple|item", bundle_next).
# bundle_next = how many bundle items already hold the tuple: the first digit Redis may give.
_DEDUP_LUA = (
    _CHECK_GENERATION
    + """
local out = {}
for i = 2, #ARGV, 3 do
  local given = redis.call('HGET', KEYS[2], ARGV[i + 1])
  if given then
    out[#out + 1] = tonumber(given)
  else
    redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 2])
    local digit = redis.call('HINCRBY', KEYS[1], ARGV[i], 1) - 1
    redis.call('HSET', KEYS[2], ARGV[i + 1], digit)
    out[#out + 1] = digit
  end
end
return out
"""
)

# KEYS = items, derived:<version>, stream, retired, marker; ARGV[1] = generation, ARGV[2] =
# stream length, then triples (item_id, record, derived). Returns 1 per item new to the store.
# An item ingested again after its retirement is live again: out of the retired set.
_PUT_LUA = (
    _CHECK_GENERATION
    + """
local out = {}
for i = 3, #ARGV, 3 do
  out[#out + 1] = redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  redis.call('ZREM', KEYS[4], ARGV[i])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'item_id', ARGV[i])
end
return out
"""
)

# Writing back what a worker holds after Redis lost it. KEYS = items, derived:<version>,
# counters, assignments, stream; ARGV[1] = stream length, then quintuples (item_id, record,
# derived, tuple or "" when the SID is the bundle's, digit). Records are set only where absent
# (a newer write wins); each counter ends past the highest digit held. Returns items written.
_RESTORE_LUA = """
local written = 0
for i = 2, #ARGV, 5 do
  local item = ARGV[i]
  if redis.call('HSETNX', KEYS[1], item, ARGV[i + 1]) == 1 then
    written = written + 1
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[1], '*', 'item_id', item)
  end
  redis.call('HSETNX', KEYS[2], item, ARGV[i + 2])
  local tuple = ARGV[i + 3]
  if tuple ~= '' then
    local digit = tonumber(ARGV[i + 4])
    redis.call('HSETNX', KEYS[4], tuple .. '|' .. item, digit)
    if tonumber(redis.call('HGET', KEYS[3], tuple) or '0') < digit + 1 then
      redis.call('HSET', KEYS[3], tuple, digit + 1)
    end
  end
end
return written
"""


# KEYS = items, derived:<version>, retired, retired:seq, marker; ARGV[1] = generation,
# ARGV[2] = item id. Returns the retirement's number.
_RETIRE_LUA = (
    _CHECK_GENERATION
    + """
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
return seq
"""
)

# Writing back retirements after Redis lost them. KEYS = items, retired, retired:seq; ARGV =
# pairs (item_id, number). An id whose record came back (ingested since) stays live.
_RESTORE_RETIRED_LUA = """
local top = tonumber(redis.call('GET', KEYS[3]) or '0')
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('ZADD', KEYS[2], 'NX', ARGV[i + 1], ARGV[i])
  end
  if tonumber(ARGV[i + 1]) > top then top = tonumber(ARGV[i + 1]) end
end
redis.call('SET', KEYS[3], top)
return top
"""


# KEYS = marker, restoring; ARGV[1] = token. Sets the marker unless it is set or a restore
# lease is live; returns the marker in force (nil: a worker is still writing back).
_CLAIM_LUA = """
local marker = redis.call('GET', KEYS[1])
if marker then return marker end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', ms))
if redis.call('ZCARD', KEYS[2]) > 0 then return false end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# KEYS = restoring; ARGV = worker, lease (ms). Takes or renews a restore lease (the key itself
# expires with the last lease, should every holder die).
_LEASE_LUA = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%.0f', ms + tonumber(ARGV[2])), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class GenerationChanged(RedisError):
    """Redis no longer holds the catalog generation this worker wrote to (it lost its data)."""


def _stale(e: ResponseError) -> bool:
    return str(e).startswith(_STALE)


def _pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32)


@dataclass
class ItemInput:
    """One item as a client sent it (already validated)."""

    item_id: str
    title: str = ""
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    content_vector: np.ndarray | None = None  # float32 [D]

    def embed_text(self) -> str:
        # The offline template, so a bundle item re-sent with the same fields gets its SID back.
        fields = dict(self.fields)
        if self.text:
            fields["text"] = self.text
        return item_text(self.title, fields)


@dataclass
class StoredItem:
    item_id: str
    title: str
    text: str  # the embedded text
    fields: dict[str, str]
    content_vector: np.ndarray  # float32 [D], L2-normalised
    content_model: str
    updated: float  # unix s

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "item_id": self.item_id,
                "title": self.title,
                "text": self.text,
                "fields": self.fields,
                "content_vector": _pack(self.content_vector),
                "content_model": self.content_model,
                "updated": self.updated,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> StoredItem:
        obj = orjson.loads(raw)
        obj["content_vector"] = _unpack(obj["content_vector"])
        return cls(**obj)


def new_item_score_scale(bundle: Bundle) -> float:
    """The bundle's score scale for items without a trained id (1 for bundles without one)."""
    return float(bundle.model.get("new_item_score_scale", 1.0))


def new_item_score_offset(bundle: Bundle) -> float:
    """The bundle's score offset for items without a trained id, in the index's score units,
    subtracted from their score after the scale (0 for bundles without one)."""
    return float(bundle.model.get("new_item_score_offset", 0.0))


def bundle_score_scales(bundle: Bundle, records: list[ItemRecord]) -> np.ndarray:
    """float32 [n + 1]: 1 for the bundle's trained items (popularity > 0), the new-item scale
    for the rest (their vectors are the model's guesses from content)."""
    scales = np.ones(len(records) + 1, np.float32)
    scales[_untrained_rows(records)] = new_item_score_scale(bundle)
    return scales


def bundle_score_offsets(bundle: Bundle, records: list[ItemRecord]) -> np.ndarray:
    """float32 [n + 1]: 0 for the bundle's trained items, the new-item offset for the rows that
    get the new-item scale (bundle_score_scales): a row's score is its cosine (or dot
    product) times its scale minus its offset."""
    offsets = np.zeros(len(records) + 1, np.float32)
    offsets[_untrained_rows(records)] = new_item_score_offset(bundle)
    return offsets


def bundle_content_weights(bundle: Bundle, records: list[ItemRecord]) -> np.ndarray:
    """float32 [n + 1]: the content-term weight per bundle row, from its training events
    (ContentTerm.row_weights): the new items' weight for the rows that get the new-item scale
    (bundle_score_scales), the rare items' for the rarely trained, 0 for the others."""
    counts = np.zeros(len(records) + 1, np.int64)
    counts[[r.row for r in records]] = [r.popularity for r in records]
    return bundle.content_term.row_weights(counts)


def _untrained_rows(records: list[ItemRecord]) -> np.ndarray:
    # int64 [m]: the bundle rows training never saw (popularity 0)
    return np.array([r.row for r in records if r.popularity == 0], np.int64)


@dataclass
class Derived:
    sid: np.ndarray  # int64 [L + 1]
    vector: np.ndarray  # float32 [d] raw

    def to_json(self) -> bytes:
        return orjson.dumps({"sid": self.sid.tolist(), "vector": _pack(self.vector)})

    @classmethod
    def from_json(cls, raw: bytes) -> Derived:
        obj = orjson.loads(raw)
        return cls(np.asarray(obj["sid"], np.int64), _unpack(obj["vector"]))


@dataclass
class IngestResult:
    item_id: str
    sid: list[int]
    collided: bool  # its code tuple already belonged to another item
    created: bool  # False = an existing item was updated


# What restore() writes back per item: record, derived, and (tuple, digit) when the SID's
# dedup digit was handed out by the store (None = the bundle's own SID).
Held = tuple[StoredItem, Derived, tuple[str, int] | None]


class CatalogStore(Protocol):
    kind: str

    async def generation(self) -> str | None:
        """The marker naming the store's current life; None = the store has none (lost it)."""
        ...

    async def claim_generation(self, token: str) -> str | None:
        """Set the marker to token unless one is set or a restore lease is live; returns the
        marker now in force, None while a lease holds the claim back."""
        ...

    async def lease_restore(self, worker: str) -> None:
        """Take or renew `worker`'s restore lease (RESTORE_LEASE_S): no marker is claimed
        while it is live."""
        ...

    async def release_restore(self, worker: str) -> None: ...

    async def assign_dedup(
        self, version: str, wanted: list[tuple[str, str, int]], generation: str | None
    ) -> list[int]:
        """(tuple key, item id, bundle_next) -> dedup digit, atomic and idempotent per item.
        Raises GenerationChanged if the store's marker is not `generation`."""
        ...

    async def put(
        self, version: str, items: list[tuple[StoredItem, Derived]], generation: str | None
    ) -> list[bool]:
        """Store records (and announce them); True where the item id was new to the store.
        Raises GenerationChanged if the store's marker is not `generation`."""
        ...

    async def restore(self, version: str, items: list[Held]) -> int:
        """Write back records the store lost (absent ones only); returns how many."""
        ...

    async def put_derived(self, version: str, item_id: str, derived: Derived) -> None: ...

    async def get(
        self, version: str, item_ids: list[str]
    ) -> list[tuple[StoredItem | None, Derived | None]]: ...

    async def exists(self, item_id: str) -> bool: ...

    def scan_ids(self) -> AsyncIterator[list[str]]:
        """Every stored item id, in chunks."""
        ...

    async def retire(self, version: str, item_id: str, generation: str | None) -> int:
        """Delete the item's record and add it to the retired set; returns the retirement's
        number. Raises GenerationChanged if the store's marker is not `generation`."""
        ...

    async def retired_seq(self) -> int:
        """The latest retirement's number (0: none)."""
        ...

    async def retired_since(self, after: int) -> list[tuple[str, int]]:
        """(item id, number) of the items retired after number `after` and still retired."""
        ...

    async def retired_of(self, item_ids: list[str]) -> tuple[set[str], int]:
        """Which of these ids are retired now, and the latest retirement's number."""
        ...

    async def restore_retired(self, retired: dict[str, int]) -> None:
        """Write back retirements the store lost."""
        ...


class RedisCatalogStore:
    kind = "redis"

    def __init__(self, redis: StoreClient, prefix: str) -> None:
        self.redis = redis
        base = f"{prefix}{{catalog}}:"
        self.items_key = base + "items"
        self.stream_key = base + "stream"
        self.generation_key = base + "generation"
        self.restoring_key = base + "restoring"
        self._base = base
        self._claim = redis.register_script(_CLAIM_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._dedup = redis.register_script(_DEDUP_LUA)
        self._put = redis.register_script(_PUT_LUA)
        self._restore = redis.register_script(_RESTORE_LUA)
        self.retired_key = base + "retired"
        self.retired_seq_key = base + "retired:seq"
        self._retire = redis.register_script(_RETIRE_LUA)
        self._restore_retired = redis.register_script(_RESTORE_RETIRED_LUA)

    def _derived_key(self, version: str) -> str:
        return f"{self._base}derived:{version}"

    async def generation(self) -> str | None:
        raw = await self.redis.get(self.generation_key)
        return raw.decode() if raw is not None else None

    async def claim_generation(self, token: str) -> str | None:
        raw = await self._claim(keys=[self.generation_key, self.restoring_key], args=[token])
        return raw.decode() if raw is not None else None

    async def lease_restore(self, worker: str) -> None:
        await self._lease(keys=[self.restoring_key], args=[worker, int(RESTORE_LEASE_S * 1000)])

    async def release_restore(self, worker: str) -> None:
        await self.redis.zrem(self.restoring_key, worker)

    async def assign_dedup(
        self, version: str, wanted: list[tuple[str, str, int]], generation: str | None
    ) -> list[int]:
        if not wanted:
            return []
        args: list[str | int] = [generation or ""]
        for tuple_key, item_id, bundle_next in wanted:
            args += [tuple_key, f"{tuple_key}|{item_id}", bundle_next]
        keys = [
            f"{self._base}sidctr:{version}",
            f"{self._base}sidasg:{version}",
            self.generation_key,
        ]
        try:
            return [int(d) for d in await self._dedup(keys=keys, args=args)]
        except ResponseError as e:
            if _stale(e):
                raise GenerationChanged(str(e)) from None
            raise

    async def put(
        self, version: str, items: list[tuple[StoredItem, Derived]], generation: str | None
    ) -> list[bool]:
        # One script: atomic like MULTI, and it checks the marker first.
        args: list[str | int | bytes] = [generation or "", STREAM_MAXLEN]
        for stored, derived in items:
            args += [stored.item_id, stored.to_json(), derived.to_json()]
        keys = [
            self.items_key,
            self._derived_key(version),
            self.stream_key,
            self.retired_key,
            self.generation_key,
        ]
        try:
            replies = await self._put(keys=keys, args=args)
        except ResponseError as e:
            if _stale(e):
                raise GenerationChanged(str(e)) from None
            raise
        return [bool(r) for r in replies]

    async def restore(self, version: str, items: list[Held]) -> int:
        args: list[str | int | bytes] = [STREAM_MAXLEN]
        for stored, derived, dedup in items:
            tuple_key, digit = dedup or ("", 0)
            args += [stored.item_id, stored.to_json(), derived.to_json(), tuple_key, digit]
        keys = [
            self.items_key,
            self._derived_key(version),
            f"{self._base}sidctr:{version}",
            f"{self._base}sidasg:{version}",
            self.stream_key,
        ]
        return int(await self._restore(keys=keys, args=args))

    async def put_derived(self, version: str, item_id: str, derived: Derived) -> None:
        await self.redis.hset(self._derived_key(version), item_id, derived.to_json())

    async def get(
        self, version: str, item_ids: list[str]
    ) -> list[tuple[StoredItem | None, Derived | None]]:
        if not item_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.items_key, item_ids)
            pipe.hmget(self._derived_key(version), item_ids)
            stored_raw, derived_raw = await pipe.execute()
        return [
            (
                StoredItem.from_json(s) if s is not None else None,
                Derived.from_json(d) if d is not None else None,
            )
            for s, d in zip(stored_raw, derived_raw, strict=True)
        ]

    async def exists(self, item_id: str) -> bool:
        return bool(await self.redis.hexists(self.items_key, item_id))

    async def scan_ids(self) -> AsyncIterator[list[str]]:
        cursor = 0
        while True:
            # HSCAN's NOVALUES needs Redis 7.4; the values are dropped here instead.
            cursor, chunk = await self.redis.hscan(self.items_key, cursor, count=500)
            if chunk:
                yield [k.decode() for k in chunk]
            if cursor == 0:
                return

    async def retire(self, version: str, item_id: str, generation: str | None) -> int:
        keys = [
            self.items_key,
            self._derived_key(version),
            self.retired_key,
            self.retired_seq_key,
            self.generation_key,
        ]
        try:
            return int(await self._retire(keys=keys, args=[generation or "", item_id]))
        except ResponseError as e:
            if _stale(e):
                raise GenerationChanged(str(e)) from None
            raise

    async def retired_seq(self) -> int:
        return int(await self.redis.get(self.retired_seq_key) or 0)

    async def retired_since(self, after: int) -> list[tuple[str, int]]:
        found = await self.redis.zrangebyscore(
            self.retired_key, f"({after}", "+inf", withscores=True
        )
        return [(item_id.decode(), int(seq)) for item_id, seq in found]

    async def retired_of(self, item_ids: list[str]) -> tuple[set[str], int]:
        if not item_ids:
            return set(), await self.retired_seq()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zmscore(self.retired_key, item_ids)
            pipe.get(self.retired_seq_key)
            scores, seq = await pipe.execute()
        retired = {i for i, score in zip(item_ids, scores, strict=True) if score is not None}
        return retired, int(seq or 0)

    async def restore_retired(self, retired: dict[str, int]) -> None:
        keys = [self.items_key, self.retired_key, self.retired_seq_key]
        pairs = list(retired.items())
        for start in range(0, len(pairs), 500):
            args = [x for pair in pairs[start : start + 500] for x in pair]
            await self._restore_retired(keys=keys, args=args)

    async def stream_last_id(self) -> str:
        """Id of the newest stream entry, "0-0" if there is none."""
        last = await self.redis.xrevrange(self.stream_key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def read_stream(self, after: str, block_ms: int) -> tuple[str, list[str]]:
        """Item ids announced after stream id `after` (waits up to block_ms), and the new id."""
        reply = await self.redis.xread({self.stream_key: after}, count=1000, block=block_ms)
        item_ids: list[str] = []
        for _stream, entries in reply or []:
            for entry_id, entry in entries:
                after = entry_id.decode()
                item_ids.append(entry[b"item_id"].decode())
        return after, item_ids


class MemoryCatalogStore:
    """The same store inside one process (no Redis): gone when the process exits."""

    kind = "memory"

    def __init__(self) -> None:
        self.items: dict[str, StoredItem] = {}
        self.derived: dict[tuple[str, str], Derived] = {}
        self.counters: dict[tuple[str, str], int] = {}
        self.assigned: dict[tuple[str, str], int] = {}
        self.retired: dict[str, int] = {}
        self.seq = 0

    async def generation(self) -> str | None:
        return "memory"  # this process's memory cannot lose data while the process lives

    async def claim_generation(self, token: str) -> str | None:
        return "memory"

    async def lease_restore(self, worker: str) -> None:
        pass

    async def release_restore(self, worker: str) -> None:
        pass

    async def restore(self, version: str, items: list[Held]) -> int:
        return 0

    async def assign_dedup(
        self, version: str, wanted: list[tuple[str, str, int]], generation: str | None
    ) -> list[int]:
        digits = []
        for tuple_key, item_id, bundle_next in wanted:
            key = (version, f"{tuple_key}|{item_id}")
            if key not in self.assigned:
                counter = (version, tuple_key)
                digit = self.counters.get(counter, bundle_next)
                self.counters[counter] = digit + 1
                self.assigned[key] = digit
            digits.append(self.assigned[key])
        return digits

    async def put(
        self, version: str, items: list[tuple[StoredItem, Derived]], generation: str | None
    ) -> list[bool]:
        created = []
        for stored, derived in items:
            created.append(stored.item_id not in self.items)
            self.items[stored.item_id] = stored
            self.derived[(version, stored.item_id)] = derived
            self.retired.pop(stored.item_id, None)
        return created

    async def retire(self, version: str, item_id: str, generation: str | None) -> int:
        self.items.pop(item_id, None)
        self.derived.pop((version, item_id), None)
        self.seq += 1
        self.retired[item_id] = self.seq
        return self.seq

    async def retired_seq(self) -> int:
        return self.seq

    async def retired_since(self, after: int) -> list[tuple[str, int]]:
        return [(i, n) for i, n in self.retired.items() if n > after]

    async def retired_of(self, item_ids: list[str]) -> tuple[set[str], int]:
        return {i for i in item_ids if i in self.retired}, self.seq

    async def restore_retired(self, retired: dict[str, int]) -> None:
        return None

    async def put_derived(self, version: str, item_id: str, derived: Derived) -> None:
        self.derived[(version, item_id)] = derived

    async def get(
        self, version: str, item_ids: list[str]
    ) -> list[tuple[StoredItem | None, Derived | None]]:
        return [(self.items.get(i), self.derived.get((version, i))) for i in item_ids]

    async def exists(self, item_id: str) -> bool:
        return item_id in self.items

    async def scan_ids(self) -> AsyncIterator[list[str]]:
        if self.items:
            yield list(self.items)


class ClientError(ValueError):
    """A problem with item `index` of a request (field None = the item as a whole): a 422."""

    def __init__(self, index: int, field_name: str | None, problem: str) -> None:
        super().__init__(f"item {index}, {field_name}: {problem}")
        self.index = index
        self.field = field_name
        self.problem = problem


# A field value lists several values when "|" or "," separates them ("Comedy|Drama",
# "Animation, Comedy"): recommend's filter matches any of them, or the whole value.
_VALUE_SEPARATORS = re.compile(r"[|,]")
_NO_TOKENS: frozenset[str] = frozenset()


def field_tokens(value: str) -> frozenset[str]:
    """ "Animation|Children's" -> {"animation|children's", "animation", "children's"}."""
    parts = [value, *_VALUE_SEPARATORS.split(value)]
    return frozenset(t for t in (p.strip().casefold() for p in parts) if t)


def stream_id(entry_id: str) -> tuple[int, int]:
    """ "1700000000000-3" -> (1700000000000, 3), comparable in stream order."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def tuple_key(codes: np.ndarray) -> str:
    return ",".join(str(int(c)) for c in codes)


class Catalog:
    """Ingestion and the bundle's item metadata, over one ItemTable and one CatalogStore."""

    def __init__(
        self,
        bundle: Bundle,
        runtime: Engine,
        codebooks: Codebooks,
        table: ItemTable,
        bundle_vectors: np.ndarray,  # float32 [n + 1, d] the bundle's trained vectors
        store: CatalogStore,
    ) -> None:
        self.version = bundle.version
        self.content_model = str(bundle.manifest["content"]["model"])
        self.runtime = runtime
        self.codebooks = codebooks
        self.table = table
        self.bundle_vectors = bundle_vectors
        self.store = store
        self.layers = codebooks.layers
        records = bundle.items()
        # Display metadata: bundle items from items.jsonl, ingested items added as they come.
        self.meta: dict[str, dict[str, Any]] = {
            r.item_id: {
                "title": r.title,
                "text": r.text,
                "popularity": r.popularity,
                "fields": r.fields,
            }
            for r in records
        }
        self.bundle_row = {r.item_id: r.row for r in records}
        # The bundle's own SIDs, score scales and offsets by bundle row: the table renumbers
        # its rows when it compacts, these never change.
        self.bundle_sids = table.sids[: len(records) + 1].copy()
        self.bundle_scales = table.scales[: len(records) + 1].copy()
        self.bundle_offsets = table.offsets[: len(records) + 1].copy()
        self.bundle_content_weights = table.content_weights[: len(records) + 1].copy()
        # What recommend's filter reads: per live item, field name (casefolded) -> the
        # values it lists; and per field name, how many live items have it (unknown = 0).
        self.fields: dict[str, dict[str, frozenset[str]]] = {}
        self.field_counts: Counter[str] = Counter()
        for r in records:
            self._set_fields(r.item_id, r.fields)
        # Retired item ids -> retirement number, and the store's number last applied here.
        self.retired: dict[str, int] = {}
        self.retired_seq = 0
        table.on_compacted = self.update_gauges
        # A vector the model made for an item without a trained id (a content tower's) scores
        # at this scale, less this offset (docs/bundle.md); a bundle item keeps its row's
        # scale and offset in `table`.
        self.new_item_scale = new_item_score_scale(bundle)
        self.new_item_offset = new_item_score_offset(bundle)
        # and gains this weight * cos(history's mean content, its content) where the table
        # has a content term (service/retrieval.py)
        self.new_item_content_weight = bundle.content_term.new_weight if table.content_dim else 0.0
        # what that cosine reads: the content vector, or that and the item's genres and years
        self.content_term = bundle.content_term
        # What a new item's vector reads beside its content vector: its genres and years, for
        # a bundle whose content part was fitted on them (docs/bundle.md); None: nothing.
        self.item_features = bundle.item_features
        # The codes a new item's vector reads (docs/bundle.md, model.new_item_codes): the
        # nearest path of the bundle's trained items, whose SID rows were trained.
        self.vector_paths: CodePaths | None = None
        if bundle.model.get("new_item_codes") == "nearest-trained-path":
            trained = [r.row for r in records if r.popularity > 0]
            if trained:
                self.vector_paths = CodePaths(self.bundle_sids[trained, : self.layers])
        # First dedup digit Redis may hand out for a code tuple: the bundle already used 0..m-1.
        self.bundle_next: dict[str, int] = {}
        for r in records:
            key = tuple_key(np.asarray(r.sid[: self.layers]))
            self.bundle_next[key] = max(self.bundle_next.get(key, 0), r.sid[self.layers] + 1)
        self.stream_position = "0-0"
        self.follower_error: str | None = None
        # The store's generation marker as this worker last saw it (see the module docstring),
        # and every ingested item it holds, to write back should the store lose them. Memory:
        # the record's content vector (D floats) and the item vector (d floats) per item.
        self.generation: str | None = None
        self.held: dict[str, tuple[StoredItem, Derived]] = {}
        self._recover_lock = asyncio.Lock()
        self.worker_id = uuid.uuid4().hex  # names this worker's restore lease
        # Set while this worker waits to claim a missing marker (/readyz says why at start).
        self.waiting: str | None = None

    # --- deriving SIDs and vectors ------------------------------------------------------

    def _codes(self, content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """content float32 [B, D] -> (SID codes, the codes the item's vector reads) [B, L]."""
        codes = self.codebooks.assign(content)
        if self.vector_paths is None:
            return codes, codes
        return codes, self.codebooks.assign(content, within=self.vector_paths)

    async def _derive(
        self,
        item_ids: list[str],
        content: np.ndarray,
        fields: list[dict[str, str]],
        generation: str | None = None,
    ) -> list[Derived]:
        """content float32 [B, D] and the items' fields -> SID and item vector per item,
        under this bundle."""
        with metrics.stage("sid_assign"):
            codes, vector_codes = await run_in_threadpool(self._codes, content)  # [B, L] each
            sids = np.zeros((len(item_ids), self.layers + 1), np.int64)
            sids[:, : self.layers] = codes
            keep_trained: list[bool] = []
            wanted: list[tuple[str, str, int]] = []
            for i, item_id in enumerate(item_ids):
                row = self.bundle_row.get(item_id)
                if row is not None and np.array_equal(
                    self.bundle_sids[row, : self.layers], codes[i]
                ):
                    sids[i] = self.bundle_sids[row]
                    keep_trained.append(True)
                else:
                    key = tuple_key(codes[i])
                    wanted.append((key, item_id, self.bundle_next.get(key, 0)))
                    keep_trained.append(False)
            generation = generation or self.generation
            digits = iter(await self.store.assign_dedup(self.version, wanted, generation))
            for i, keep in enumerate(keep_trained):
                if not keep:
                    sids[i, self.layers] = next(digits)
            graph_codes = sids.copy()
            graph_codes[:, : self.layers] = vector_codes
            graph_content = content
            if self.item_features is not None:
                graph_content = self.item_features.extend(content, fields)  # [B, D + F]
            vectors = await run_in_threadpool(
                self.runtime.new_item_vectors, graph_codes, graph_content
            )
        derived = []
        for i, item_id in enumerate(item_ids):
            vector = (
                self.bundle_vectors[self.bundle_row[item_id]] if keep_trained[i] else vectors[i]
            )
            derived.append(Derived(sids[i], vector.astype(np.float32)))
        return derived

    def _apply(self, stored: StoredItem, derived: Derived) -> bool:
        """Put one item into this worker's table; True if it was new here."""
        row = self.bundle_row.get(stored.item_id)
        # A bundle item whose vector is still the bundle's keeps its bundle row's scale,
        # offset and content weight (rows 1..n are never rewritten: a changed item gets a
        # new row); any other is new: the new-item scale, offset and content weight.
        scale, offset = self.new_item_scale, self.new_item_offset
        weight = self.new_item_content_weight
        if row is not None and np.array_equal(derived.vector, self.bundle_vectors[row]):
            scale, offset = float(self.bundle_scales[row]), float(self.bundle_offsets[row])
            weight = float(self.bundle_content_weights[row])
        term_vector = stored.content_vector  # [D]
        if self.table.content_dim and self.content_term.transforms:
            term_vector = self.content_term.vectors(term_vector[None, :], [stored.fields])[0]
        created = self.table.upsert(
            stored.item_id, derived.sid, derived.vector, scale, offset, term_vector, weight
        )
        self.retired.pop(stored.item_id, None)  # ingested again after a retirement: live
        self.held[stored.item_id] = (stored, derived)
        popularity = self.meta.get(stored.item_id, {}).get("popularity", 0)
        self.meta[stored.item_id] = {
            "title": stored.title,
            "text": stored.text,
            "popularity": popularity,
            "fields": stored.fields,
            "updated": stored.updated,
        }
        self._set_fields(stored.item_id, stored.fields)
        return created

    def _set_fields(self, item_id: str, fields: dict[str, str] | None) -> None:
        """Index an item's fields for filters (None: the item is gone)."""
        old = self.fields.pop(item_id, None)
        if old is not None:
            self.field_counts.subtract(old.keys())
        if fields is None:
            return
        tokens: dict[str, frozenset[str]] = {}
        for name, value in fields.items():
            key = name.casefold()
            tokens[key] = tokens.get(key, _NO_TOKENS) | field_tokens(str(value))
        self.fields[item_id] = tokens
        self.field_counts.update(tokens.keys())

    # --- filters --------------------------------------------------------------------------

    def unknown_fields(self, names: list[str]) -> list[str]:
        """The names no live item has as a field (compared casefolded)."""
        return [n for n in names if self.field_counts.get(n.casefold(), 0) <= 0]

    def known_fields(self) -> list[str]:
        return sorted(f for f, n in self.field_counts.items() if n > 0)

    def matcher(self, wanted: dict[str, list[str]]) -> Callable[[str], bool]:
        """item id -> whether, for every field named, one of the item's values is listed."""
        want = {
            name.casefold(): frozenset(v.strip().casefold() for v in values)
            for name, values in wanted.items()
        }
        fields = self.fields

        def accept(item_id: str) -> bool:
            have = fields.get(item_id)
            if have is None:
                return False
            return all(not have.get(f, _NO_TOKENS).isdisjoint(v) for f, v in want.items())

        return accept

    # --- retiring items -------------------------------------------------------------------

    async def retire(self, item_id: str) -> bool:
        """Retire a live item everywhere; False if no live item has this id."""
        await self.sync_retired()
        if await self.ensure_known([item_id]):
            return False
        for attempt in range(3):
            try:
                seq = await self.store.retire(self.version, item_id, self.generation)
                break
            except GenerationChanged:
                if attempt == 2:
                    raise
                await self.recover()
        self._retire_local(item_id, seq)
        self.update_gauges()
        return True

    def _retire_local(self, item_id: str, seq: int) -> None:
        self.retired[item_id] = max(seq, self.retired.get(item_id, 0))
        self.table.retire(item_id)
        self.held.pop(item_id, None)  # nothing to write back should Redis lose its data
        self._set_fields(item_id, None)
        if item_id not in self.bundle_row:
            self.meta.pop(item_id, None)

    def retired_seq_key(self) -> str | None:
        """The Redis key of the retirement counter, for a caller that reads it together with
        its own keys and passes the value to sync_retired; None when there is no Redis or it
        is away (then sync_retired returns at once)."""
        if self.follower_error is not None or not isinstance(self.store, RedisCatalogStore):
            return None
        return self.store.retired_seq_key

    async def sync_retired(self, seq: int | None = None) -> None:
        """Apply retirements made by any worker since the last call: one GET when none, or
        nothing more when the caller read the counter (`seq`) in its own round trip.

        Every read that can return items calls this first, so an item retired through one
        worker is returned by none from the next request on. While Redis does not answer, reads
        that need no store (a history override, similar items) still serve, with the
        retirements known here: none can be made meanwhile, retiring needs Redis."""
        if self.follower_error is not None:
            return  # Redis is away (the stream follower says so): do not wait for it here
        if seq is None:
            try:
                seq = await self.store.retired_seq()
            except (RedisError, OSError, StoreOverloaded):
                return
        if seq == self.retired_seq:
            return
        # Lower than ours: the store lost its data; read the whole set it has now.
        changes = await self.store.retired_since(self.retired_seq if seq > self.retired_seq else 0)
        for item_id, number in changes:
            self._retire_local(item_id, number)
        self.retired_seq = max(self.retired_seq, seq) if seq > self.retired_seq else seq
        if changes:
            self.update_gauges()

    # --- the write path -----------------------------------------------------------------

    async def ingest(self, items: list[ItemInput]) -> list[IngestResult]:
        dim = self.codebooks.dim
        content = np.zeros((len(items), dim), np.float32)  # [B, D]
        texts = [item.embed_text() for item in items]
        to_encode = []
        for i, item in enumerate(items):
            if item.content_vector is not None:
                if item.content_vector.shape != (dim,):
                    raise ClientError(
                        i,
                        "content_vector",
                        f"has {item.content_vector.size} numbers, the content model makes {dim}",
                    )
                norm = float(np.linalg.norm(item.content_vector))
                if norm == 0.0:
                    raise ClientError(i, "content_vector", "is all zeros")
                content[i] = item.content_vector / norm
            elif not texts[i]:
                raise ClientError(
                    i, None, "has no text: give title, text or fields, or content_vector"
                )
            else:
                to_encode.append(i)
        if to_encode:
            with metrics.stage("content_encode"):
                encoded = await run_in_threadpool(
                    self.runtime.content_vectors, [texts[i] for i in to_encode]
                )
            content[to_encode] = encoded
        item_ids = [item.item_id for item in items]
        for attempt in range(3):
            generation = self.generation
            try:
                return await self._write(items, texts, content, item_ids, generation)
            except GenerationChanged:
                # Redis lost the catalog: put back what we hold first, then hand out digits.
                if attempt == 2:
                    raise
                await self.recover()
        raise AssertionError("unreachable")

    async def _write(
        self,
        items: list[ItemInput],
        texts: list[str],
        content: np.ndarray,
        item_ids: list[str],
        generation: str | None,
    ) -> list[IngestResult]:
        fields = [item.fields for item in items]
        derived = await self._derive(item_ids, content, fields, generation)
        now = time.time()
        stored = [
            StoredItem(
                item_id=item.item_id,
                title=item.title,
                text=texts[i],
                fields=item.fields,
                content_vector=content[i],
                content_model=self.content_model,
                updated=now,
            )
            for i, item in enumerate(items)
        ]
        with metrics.stage("persist"):
            new_in_store = await self.store.put(
                self.version, list(zip(stored, derived, strict=True)), generation
            )
        results = []
        for s, d, new in zip(stored, derived, new_in_store, strict=True):
            self._apply(s, d)
            collided = bool(d.sid[self.layers] > 0)
            metrics.ITEMS_INGESTED.labels(collided=str(collided).lower()).inc()
            results.append(
                IngestResult(
                    item_id=s.item_id,
                    sid=d.sid.tolist(),
                    collided=collided,
                    created=new and s.item_id not in self.bundle_row,
                )
            )
        self.update_gauges()
        return results

    # --- reading other workers' writes --------------------------------------------------

    async def load(self, item_ids: list[str]) -> int:
        """Fetch items from the store into the table (deriving where needed); returns how many."""
        found = [
            (item_id, s, d)
            for item_id, (s, d) in zip(
                item_ids, await self.store.get(self.version, item_ids), strict=True
            )
            if s is not None
        ]
        # Read after the records: an item retired since its record was read shows here, or
        # has a retirement number above the one read (applied by a sync meanwhile).
        retired_now, seq_at_read = await self.store.retired_of([f[0] for f in found])
        missing = [k for k, (_, _, d) in enumerate(found) if d is None]
        if missing:
            # Written under another bundle version: derive ours from the stored content vector
            # (or from the text, if that version used another content model).
            content = np.zeros((len(missing), self.codebooks.dim), np.float32)
            reencode = []
            for j, k in enumerate(missing):
                s = found[k][1]
                if s.content_model == self.content_model and s.content_vector.shape == (
                    self.codebooks.dim,
                ):
                    content[j] = s.content_vector
                else:
                    reencode.append(j)
            if reencode:
                texts = [found[missing[j]][1].text for j in reencode]
                content[reencode] = await run_in_threadpool(self.runtime.content_vectors, texts)
            derived = await self._derive(
                [found[k][0] for k in missing], content, [found[k][1].fields for k in missing]
            )
            for k, d in zip(missing, derived, strict=True):
                await self.store.put_derived(self.version, found[k][0], d)
                found[k] = (found[k][0], found[k][1], d)
        applied = 0
        for item_id, s, d in found:
            if item_id in retired_now or self.retired.get(item_id, 0) > seq_at_read:
                continue
            self._apply(s, d)
            applied += 1
        self.update_gauges()
        return applied

    async def rebuild(self) -> int:
        """At start: every ingested item from the store into the table."""
        # The marker first: a loss during the scan then shows as a marker that is not ours. A
        # missing one is claimed only after GENERATION_GRACE_S: this may be a Redis that lost
        # its data a moment ago, and running workers still have to write back their items.
        await self.recover()
        if isinstance(self.store, RedisCatalogStore):
            # Read the stream position first: anything written during the scan is replayed.
            self.stream_position = await self.store.stream_last_id()
        # Retirements before items: a retired bundle item leaves the table at once.
        self.retired_seq = await self.store.retired_seq()
        for item_id, number in await self.store.retired_since(0):
            self._retire_local(item_id, number)
        loaded = 0
        async for chunk in self.store.scan_ids():
            loaded += await self.load(chunk)
        return loaded

    def _held(self, item_ids: list[str]) -> list[Held]:
        out: list[Held] = []
        for item_id in item_ids:
            stored, derived = self.held[item_id]
            row = self.bundle_row.get(item_id)
            own = row is not None and np.array_equal(derived.sid, self.bundle_sids[row])
            dedup = None if own else (tuple_key(derived.sid[: self.layers]), int(derived.sid[-1]))
            out.append((stored, derived, dedup))
        return out

    async def _restore(self, item_ids: list[str]) -> int:
        written = 0
        for start in range(0, len(item_ids), 500):
            chunk = item_ids[start : start + 500]
            await self.store.lease_restore(self.worker_id)
            written += await self.store.restore(self.version, self._held(chunk))
        return written

    async def check_generation(self) -> None:
        """Recover if the store's marker is not the one this worker wrote under."""
        if await self.store.generation() != self.generation:
            await self.recover()

    async def recover(self) -> None:
        """The store lost the catalog (or, at start, this worker has no marker yet): write back
        every item held here under a restore lease, then take the marker in force, claiming a
        missing one only GENERATION_GRACE_S after first seeing it missing and once no lease is
        live (one recovery at a time; ingestion waits for it)."""
        async with self._recover_lock:
            holds = bool(self.held or self.retired)
            if holds:
                # The lease before reading the marker: a claim either came before (we find
                # it) or waits for us.
                await self.store.lease_restore(self.worker_id)
            try:
                current = await self.store.generation()
                if current is not None and current == self.generation:
                    return  # recovered while we waited for the lock
                missing_since = time.monotonic()
                if holds:
                    log.warning(
                        "catalog: Redis lost its data (generation marker %s, expected %s); "
                        "writing back the %d ingested items this worker holds",
                        current,
                        self.generation,
                        len(self.held),
                    )
                    written = 0
                    done: set[str] = set()
                    # Again for items applied while a pass ran (an ingest in flight).
                    while todo := [i for i in self.held if i not in done]:
                        written += await self._restore(todo)
                        done.update(todo)
                    await self.store.lease_restore(self.worker_id)
                    await self.store.restore_retired(dict(self.retired))
                    metrics.CATALOG_RESTORED.inc(written)
                    log.warning("catalog: %d items written back", written)
            finally:
                if holds:
                    await self.store.release_restore(self.worker_id)
            # Only now may this worker's writes go on: the marker we claim or find is ours.
            self.generation = current if current is not None else await self._claim(missing_since)
            if holds:
                log.warning("catalog: generation %s", self.generation)

    async def _claim(self, missing_since: float) -> str:
        """The marker in force once this worker may set a missing one: GENERATION_GRACE_S after
        it saw it missing (every running worker's follower has noticed by then and holds a
        restore lease), and no lease live."""
        token = uuid.uuid4().hex
        log.info(
            "catalog: no generation marker in Redis; setting one in %.1f s, once running "
            "workers have written back what they hold",
            max(0.0, missing_since + GENERATION_GRACE_S - time.monotonic()),
        )
        self.waiting = (
            "the generation marker is missing: waiting for running workers to write back "
            "the items they hold"
        )
        try:
            while True:
                left = missing_since + GENERATION_GRACE_S - time.monotonic()
                if left > 0:
                    await asyncio.sleep(left)
                claimed = await self.store.claim_generation(token)
                if claimed is not None:
                    return claimed
                await asyncio.sleep(0.05)  # a lease is live: a worker is writing back
        finally:
            self.waiting = None

    async def follow(self, block_ms: int = 1000) -> None:
        """Tail the catalog stream forever, applying what other workers ingested."""
        store = self.store
        assert isinstance(store, RedisCatalogStore)
        backoff = 0.1
        checked = time.monotonic()
        while True:
            try:
                if self.follower_error is not None:
                    # Back after an outage. A Redis that restarted empty restarts stream ids,
                    # and reading after our old id would skip every new entry.
                    if stream_id(await store.stream_last_id()) < stream_id(self.stream_position):
                        self.stream_position = "0-0"
                    await self.check_generation()
                    checked = time.monotonic()
                    log.info("catalog stream: reconnected")
                    self.follower_error = None
                elif time.monotonic() - checked >= GENERATION_CHECK_S:
                    await self.check_generation()
                    checked = time.monotonic()
                # Blocking no longer than the next check is due: a quiet stream must not stretch
                # GENERATION_CHECK_S (GENERATION_GRACE_S counts on it).
                due_ms = int((checked + GENERATION_CHECK_S - time.monotonic()) * 1000)
                position, item_ids = await store.read_stream(
                    self.stream_position, max(10, min(block_ms, due_ms))
                )
                if item_ids:
                    await self.load(list(dict.fromkeys(item_ids)))
                self.stream_position = position
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except StoreOverloaded:
                # Requests hold every connection: Redis is fine, so readiness stays as it is.
                await asyncio.sleep(0.1)
            except (RedisError, OSError) as e:
                if self.follower_error is None:
                    log.warning("catalog stream: %s; retrying", e)
                self.follower_error = str(e) or type(e).__name__
                await asyncio.sleep(backoff)
                # Short cap: readiness comes back within moments of Redis returning.
                backoff = min(backoff * 2, 0.5)

    # --- lookups ------------------------------------------------------------------------

    async def ensure_known(self, item_ids: list[str]) -> list[str]:
        """Load ids this worker has not seen yet from the store; returns those still unknown."""
        unknown = [i for i in dict.fromkeys(item_ids) if self.table.row(i) is None]
        if unknown and self.store.kind == "redis":
            await self.load(unknown)
            unknown = [i for i in unknown if self.table.row(i) is None]
        return unknown

    def record(self, item_id: str) -> dict[str, Any] | None:
        sid = self.table.sid_of(item_id)
        if sid is None:
            return None
        meta = self.meta.get(item_id, {})
        return {
            "item_id": item_id,
            "sid": sid,
            "title": meta.get("title", ""),
            "text": meta.get("text", ""),
            "fields": meta.get("fields", {}),
            "popularity": meta.get("popularity", 0),
            "source": "bundle" if "updated" not in meta else "ingested",
            "updated": meta.get("updated"),
        }

    def update_gauges(self) -> None:
        metrics.INDEX_ITEMS.set(self.table.live_items)
        metrics.INDEX_ROWS.set(self.table.rows_held)
        for layer, usage in enumerate(self.table.codebook_usage()):
            metrics.CODEBOOK_USAGE.labels(layer=str(layer)).set(usage)
