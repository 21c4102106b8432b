"""Items added while the service runs: ingestion, persistence in Redis, and keeping every
worker's item table in step.

Ingesting an item (POST /v1/items):
  text -> content vector (ONNX) -> codes from the bundle's codebooks -> dedup digit handed out
  by Redis (atomic, so two workers never give out the same SID) -> item vector from the SID
  (ONNX) -> record written to Redis + an entry appended to the catalog stream, in one MULTI
  -> added to this worker's table. The request is answered only after Redis has the record.
Every worker tails the stream and applies what the others wrote; at start it rebuilds all
ingested items from Redis.

Redis layout (prefix P; "{catalog}" is a Cluster hash tag, so MULTI covers all of it):
  P{catalog}:items              hash item_id -> what the client sent + content vector (any version)
  P{catalog}:derived:<version>  hash item_id -> SID + vector under one bundle version
  P{catalog}:sidctr:<version>   hash "c1,c2,c3" -> next free dedup digit for that code tuple
  P{catalog}:sidasg:<version>   hash "c1,c2,c3|item_id" -> digit given to that item (retries
                                get the same digit)
  P{catalog}:stream             stream of {"item_id"}: "this record changed"
SIDs and vectors are kept per bundle version: after a retrain, a worker on the new bundle
finds no derived record for its version and derives one from the stored content vector.

A bundle item re-ingested with content that maps to its bundle codes keeps its bundle SID and
trained vector (only the text changes); with different codes it becomes a SID-only item.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from sidrec.bundle import Bundle
from sidrec.item_text import item_text
from sidrec.sid_codebook import Codebooks

from . import metrics
from .retrieval import ItemTable
from .runtime import Engine

log = logging.getLogger("sidrec.service")

# Redis keeps this many catalog changes in the stream; the records themselves stay forever.
STREAM_MAXLEN = 1_000_000

# KEYS[1] = counters, KEYS[2] = assignments; ARGV = triples (tuple, "tuple|item", bundle_next).
# bundle_next = how many bundle items already hold the tuple: the first digit Redis may give.
_DEDUP_LUA = """
local out = {}
for i = 1, #ARGV, 3 do
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


class CatalogStore(Protocol):
    kind: str

    async def assign_dedup(self, version: str, wanted: list[tuple[str, str, int]]) -> list[int]:
        """(tuple key, item id, bundle_next) -> dedup digit, atomic and idempotent per item."""
        ...

    async def put(self, version: str, items: list[tuple[StoredItem, Derived]]) -> list[bool]:
        """Store records (and announce them); True where the item id was new to the store."""
        ...

    async def put_derived(self, version: str, item_id: str, derived: Derived) -> None: ...

    async def get(
        self, version: str, item_ids: list[str]
    ) -> list[tuple[StoredItem | None, Derived | None]]: ...

    async def exists(self, item_id: str) -> bool: ...

    def scan_ids(self) -> AsyncIterator[list[str]]:
        """Every stored item id, in chunks."""
        ...


class RedisCatalogStore:
    kind = "redis"

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        base = f"{prefix}{{catalog}}:"
        self.items_key = base + "items"
        self.stream_key = base + "stream"
        self._base = base
        self._dedup = redis.register_script(_DEDUP_LUA)

    def _derived_key(self, version: str) -> str:
        return f"{self._base}derived:{version}"

    async def assign_dedup(self, version: str, wanted: list[tuple[str, str, int]]) -> list[int]:
        if not wanted:
            return []
        args: list[str | int] = []
        for tuple_key, item_id, bundle_next in wanted:
            args += [tuple_key, f"{tuple_key}|{item_id}", bundle_next]
        keys = [f"{self._base}sidctr:{version}", f"{self._base}sidasg:{version}"]
        return [int(d) for d in await self._dedup(keys=keys, args=args)]

    async def put(self, version: str, items: list[tuple[StoredItem, Derived]]) -> list[bool]:
        async with self.redis.pipeline(transaction=True) as pipe:
            for stored, derived in items:
                pipe.hset(self.items_key, stored.item_id, stored.to_json())
                pipe.hset(self._derived_key(version), stored.item_id, derived.to_json())
                pipe.xadd(
                    self.stream_key,
                    {"item_id": stored.item_id},
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
            replies = await pipe.execute()
        return [bool(replies[3 * i]) for i in range(len(items))]

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

    async def assign_dedup(self, version: str, wanted: list[tuple[str, str, int]]) -> list[int]:
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

    async def put(self, version: str, items: list[tuple[StoredItem, Derived]]) -> list[bool]:
        created = []
        for stored, derived in items:
            created.append(stored.item_id not in self.items)
            self.items[stored.item_id] = stored
            self.derived[(version, stored.item_id)] = derived
        return created

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
            r.item_id: {"title": r.title, "text": r.text, "popularity": r.popularity}
            for r in records
        }
        self.bundle_row = {r.item_id: r.row for r in records}
        # First dedup digit Redis may hand out for a code tuple: the bundle already used 0..m-1.
        self.bundle_next: dict[str, int] = {}
        for r in records:
            key = tuple_key(np.asarray(r.sid[: self.layers]))
            self.bundle_next[key] = max(self.bundle_next.get(key, 0), r.sid[self.layers] + 1)
        self.stream_position = "0-0"
        self.follower_error: str | None = None

    # --- deriving SIDs and vectors ------------------------------------------------------

    async def _derive(self, item_ids: list[str], content: np.ndarray) -> list[Derived]:
        """content float32 [B, D] -> SID and item vector per item, under this bundle."""
        with metrics.stage("sid_assign"):
            codes = await run_in_threadpool(self.codebooks.assign, content)  # [B, L]
            sids = np.zeros((len(item_ids), self.layers + 1), np.int64)
            sids[:, : self.layers] = codes
            keep_trained: list[bool] = []
            wanted: list[tuple[str, str, int]] = []
            for i, item_id in enumerate(item_ids):
                row = self.bundle_row.get(item_id)
                if row is not None and np.array_equal(
                    self.table.sids[row, : self.layers], codes[i]
                ):
                    sids[i] = self.table.sids[row]
                    keep_trained.append(True)
                else:
                    key = tuple_key(codes[i])
                    wanted.append((key, item_id, self.bundle_next.get(key, 0)))
                    keep_trained.append(False)
            digits = iter(await self.store.assign_dedup(self.version, wanted))
            for i, keep in enumerate(keep_trained):
                if not keep:
                    sids[i, self.layers] = next(digits)
            vectors = await run_in_threadpool(self.runtime.new_item_vectors, sids, content)
        derived = []
        for i, item_id in enumerate(item_ids):
            vector = (
                self.bundle_vectors[self.bundle_row[item_id]] if keep_trained[i] else vectors[i]
            )
            derived.append(Derived(sids[i], vector.astype(np.float32)))
        return derived

    def _apply(self, stored: StoredItem, derived: Derived) -> bool:
        """Put one item into this worker's table; True if it was new here."""
        created = self.table.upsert(stored.item_id, derived.sid, derived.vector)
        popularity = self.meta.get(stored.item_id, {}).get("popularity", 0)
        self.meta[stored.item_id] = {
            "title": stored.title,
            "text": stored.text,
            "popularity": popularity,
            "updated": stored.updated,
        }
        return created

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
        derived = await self._derive(item_ids, content)
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
                self.version, list(zip(stored, derived, strict=True))
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
            derived = await self._derive([found[k][0] for k in missing], content)
            for k, d in zip(missing, derived, strict=True):
                await self.store.put_derived(self.version, found[k][0], d)
                found[k] = (found[k][0], found[k][1], d)
        for _, s, d in found:
            self._apply(s, d)
        self.update_gauges()
        return len(found)

    async def rebuild(self) -> int:
        """At start: every ingested item from the store into the table."""
        if isinstance(self.store, RedisCatalogStore):
            # Read the stream position first: anything written during the scan is replayed.
            self.stream_position = await self.store.stream_last_id()
        loaded = 0
        async for chunk in self.store.scan_ids():
            loaded += await self.load(chunk)
        return loaded

    async def follow(self, block_ms: int = 1000) -> None:
        """Tail the catalog stream forever, applying what other workers ingested."""
        store = self.store
        assert isinstance(store, RedisCatalogStore)
        backoff = 0.1
        while True:
            try:
                if self.follower_error is not None:
                    # Back after an outage. A Redis that restarted empty restarts stream ids,
                    # and reading after our old id would skip every new entry.
                    if stream_id(await store.stream_last_id()) < stream_id(self.stream_position):
                        self.stream_position = "0-0"
                    log.info("catalog stream: reconnected")
                    self.follower_error = None
                position, item_ids = await store.read_stream(self.stream_position, block_ms)
                if item_ids:
                    await self.load(list(dict.fromkeys(item_ids)))
                self.stream_position = position
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if self.follower_error is None:
                    log.warning("catalog stream: %s; retrying", e)
                self.follower_error = str(e) or type(e).__name__
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # --- lookups ------------------------------------------------------------------------

    async def ensure_known(self, item_ids: list[str]) -> list[str]:
        """Load ids this worker has not seen yet from the store; returns those still unknown."""
        unknown = [i for i in dict.fromkeys(item_ids) if self.table.row(i) is None]
        if unknown and self.store.kind == "redis":
            await self.load(unknown)
            unknown = [i for i in unknown if self.table.row(i) is None]
        return unknown

    def record(self, item_id: str) -> dict[str, Any] | None:
        row = self.table.row(item_id)
        if row is None:
            return None
        meta = self.meta.get(item_id, {})
        return {
            "item_id": item_id,
            "sid": self.table.sids[row].tolist(),
            "title": meta.get("title", ""),
            "text": meta.get("text", ""),
            "popularity": meta.get("popularity", 0),
            "source": "bundle" if "updated" not in meta else "ingested",
            "updated": meta.get("updated"),
        }

    def update_gauges(self) -> None:
        metrics.INDEX_ITEMS.set(self.table.live_items)
        for layer, usage in enumerate(self.table.codebook_usage()):
            metrics.CODEBOOK_USAGE.labels(layer=str(layer)).set(usage)
