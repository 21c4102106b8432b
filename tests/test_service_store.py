"""The service and its Redis under stress, against real redis-server processes and real uvicorn
servers: 400 requests in flight (backpressure, never a false "Redis did not answer"), a Redis
that is stopped and killed under load (no acknowledged write lost, readiness follows Redis),
a Redis that loses its data (the catalog is written back, SIDs never collide, also with a
process that starts on it at that moment), and a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RedisClusterServers, RedisServer, Service
from test_service_ops import samples

from sidrec.bundle import load_bundle

pytestmark = pytest.mark.slow


def bundle_item_ids(bundle_dir: Path) -> list[str]:
    return [r.item_id for r in load_bundle(bundle_dir).items()]


def content_dim(bundle_dir: Path) -> int:
    return int(load_bundle(bundle_dir).manifest["content"]["dim"])


async def _burst(url: str, requests: list[tuple[str, str, Any]]) -> list[httpx.Response]:
    """All requests at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(client.request(method, path, json=body) for method, path, body in requests)
        )


def burst(url: str, requests: list[tuple[str, str, Any]]) -> list[httpx.Response]:
    return asyncio.run(_burst(url, requests))


def seed_histories(service: Service, item_ids: list[str], users: int) -> None:
    events = [
        {"user_id": f"c{u}", "item_id": item_ids[(u * 7 + j) % len(item_ids)], "ts": 1000 + j}
        for u in range(users)
        for j in range(5)
    ]
    assert service.post("/v1/events", events).status_code == 200


def figures(test: str, **values: Any) -> None:
    """The figures a test measured, one line (shown with `pytest -s`): issue 12's closing note
    quotes them."""
    print(f"\nFIGURES {test}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def store_errors(responses: list[httpx.Response]) -> list[str]:
    return [
        r.text
        for r in responses
        if r.status_code == 503 and r.json().get("error") == "store_unavailable"
    ]


def test_400_concurrent_recommends_get_no_false_store_errors(
    redis_server: RedisServer, start_service: Any, bundle_dir: Path
) -> None:
    """Default settings: 400 recommends in flight on one worker all succeed (they wait for a
    Redis connection; on main 394 of them were 503 "Redis did not answer")."""
    service = start_service(redis_url=redis_server.url)
    seed_histories(service, bundle_item_ids(bundle_dir), users=50)
    requests = [("POST", "/v1/recommend", {"user_id": f"c{i % 50}", "k": 10}) for i in range(400)]
    responses = burst(service.url, requests)
    statuses = Counter(r.status_code for r in responses)
    figures(
        "400 in-flight recommends",
        in_flight=len(requests),
        statuses=dict(statuses),
        false_store_errors=len(store_errors(responses)),
    )
    assert not store_errors(responses)
    assert statuses == {200: 400}, statuses
    assert all(r.json()["history_len"] == 5 for r in responses)


def test_saturated_pool_answers_overloaded_not_store_unavailable(
    redis_server: RedisServer, start_service: Any, bundle_dir: Path
) -> None:
    """A pool of 2 connections and a 1 ms wait: the burst is refused with the documented
    overload answer (503 `overloaded`, Retry-After, its own metric), never `store_unavailable`,
    and readiness stays true: Redis is fine, this worker is saturated."""
    service = start_service(
        redis_url=redis_server.url, redis_max_connections=2, redis_pool_timeout_s=0.001
    )
    seed_histories(service, bundle_item_ids(bundle_dir), users=50)
    requests: list[tuple[str, str, Any]] = [
        ("POST", "/v1/recommend", {"user_id": f"c{i % 50}", "k": 10}) for i in range(400)
    ]
    requests[200:200] = [("GET", "/readyz", None)] * 5
    responses = burst(service.url, requests)
    assert not store_errors(responses)
    ready = [r for r in responses if r.request.url.path == "/readyz"]
    assert [r.status_code for r in ready] == [200] * 5, [r.text for r in ready]
    recommends = [r for r in responses if r.request.url.path == "/v1/recommend"]
    overloaded = [r for r in recommends if r.status_code != 200]
    assert overloaded, "a 2-connection pool with a 1 ms wait never overflowed"
    for r in overloaded:
        assert r.status_code == 503 and r.json()["error"] == "overloaded", r.text
        assert r.headers["retry-after"] == "1"
        assert "SIDREC_REDIS_MAX_CONNECTIONS" in r.json()["detail"]
    (counted,) = samples(service.get("/metrics").text, "sidrec_store_overloaded_total")
    figures(
        "saturated pool (2 connections, 1 ms wait)",
        recommends=len(recommends),
        overloaded_503=len(overloaded),
        sidrec_store_overloaded_total=counted[1],
        readyz=[r.status_code for r in ready],
    )
    assert counted[1] == len(overloaded)
    assert service.get("/readyz").status_code == 200


class Load:
    """Bounded background writes, each acknowledged (200) write remembered: events with a
    unique ts per event (the stored entry is "ts item_id") and items with random vectors."""

    def __init__(
        self, service: Service, item_ids: list[str], dim: int, ingest: Callable[[int], Any]
    ) -> None:
        self.service = service
        self.item_ids = item_ids
        self.dim = dim
        self.ingest = ingest
        self.acked_events: list[tuple[str, int, str]] = []  # (user, ts, item)
        self.acked_items: dict[str, list[int]] = {}  # item id -> SID
        self.answers: Counter[str] = Counter()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._events, daemon=True),
            threading.Thread(target=self._items, daemon=True),
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _post(self, client: httpx.Client, path: str, body: Any) -> httpx.Response | None:
        try:
            r = client.post(path, json=body)
        except httpx.TransportError:
            self.answers["transport error"] += 1
            return None
        self.answers[f"{path} {r.status_code} {r.json().get('error', '')}".strip()] += 1
        return r

    def _events(self) -> None:
        ts = 2_000_000_000
        with httpx.Client(base_url=self.service.url, timeout=30) as client:
            while not self.stop.is_set():
                ts += 1
                user, item = f"f{ts % 4}", self.item_ids[ts % len(self.item_ids)]
                r = self._post(client, "/v1/events", {"user_id": user, "item_id": item, "ts": ts})
                if r is not None and r.status_code == 200:
                    self.acked_events.append((user, ts, item))
                time.sleep(0.01)

    def _items(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            # A new connection each time: with several workers, each gets some of them.
            with httpx.Client(base_url=self.service.url, timeout=30) as client:
                item_id = f"load-{n}"
                r = self._post(client, "/v1/items", {"item_id": item_id, **self.ingest(n)})
            if r is not None and r.status_code == 200:
                self.acked_items[item_id] = r.json()["items"][0]["sid"]
            time.sleep(0.02)


def random_vector(dim: int) -> Callable[[int], Any]:
    rng = random.Random(0)
    return lambda n: {"content_vector": [rng.gauss(0, 1) for _ in range(dim)]}


def one_tuple(dim: int) -> Callable[[int], Any]:
    """Items that all map to one code tuple: only the dedup digit tells their SIDs apart."""
    vector = [0.0] * dim
    vector[5] = 1.0
    return lambda n: {"content_vector": vector}


def wait_ready(service: Service, timeout: float) -> float:
    """Seconds until /readyz answers 200 (fails after timeout)."""
    start = time.monotonic()
    while service.get("/readyz").status_code != 200:
        assert time.monotonic() - start < timeout, service.get("/readyz").text
        time.sleep(0.02)
    return time.monotonic() - start


def wait_not_ready(service: Service, timeout: float) -> float:
    start = time.monotonic()
    while service.get("/readyz").status_code == 200:
        assert time.monotonic() - start < timeout, "still ready"
        time.sleep(0.02)
    return time.monotonic() - start


def check_stored(redis_server: RedisServer, load: Load, events: bool = True) -> dict[str, int]:
    """Every acknowledged event is in its user's list, every acknowledged item is stored;
    returns the counts."""
    prefix = "sidrec:"
    client = redis_server.client()
    stored_events = {
        user: set(client.lrange(f"{prefix}hist:{{{user}}}", 0, -1))
        for user in ("f0", "f1", "f2", "f3")
    }
    lost = [
        e
        for e in load.acked_events
        if events and f"{e[1]} {e[2]}".encode() not in stored_events[e[0]]
    ]
    items_key = f"{prefix}{{catalog}}:items"
    missing = [i for i in load.acked_items if not client.hexists(items_key, i)]
    assert not lost and not missing, (len(lost), missing, load.answers)
    return {
        "acked_events": len(load.acked_events) if events else 0,
        "stored_acked_events": (len(load.acked_events) - len(lost)) if events else 0,
        "acked_items": len(load.acked_items),
        "stored_acked_items": len(load.acked_items) - len(missing),
    }


def test_redis_stopped_and_killed_under_load_loses_no_acknowledged_write(
    tmp_path: Path, start_service: Any, bundle_dir: Path
) -> None:
    """Redis with an fsync-always append-only file, stopped (SIGSTOP) and killed (kill -9,
    restarted from its file) under steady writes: 0 acknowledged events or items lost,
    /readyz false within 1 s of each failure and true within 2 s of Redis answering again."""
    redis_server = RedisServer(tmp_path / "redis-aof", aof=True)
    redis_server.start()
    try:
        service = start_service(
            redis_url=redis_server.url, redis_timeout_s=0.5, history_len=100_000
        )
        dim = content_dim(bundle_dir)
        seconds: dict[str, float] = {}
        with Load(service, bundle_item_ids(bundle_dir), dim, random_vector(dim)) as load:
            time.sleep(1.5)
            redis_server.pause()
            seconds["not_ready_after_sigstop_s"] = wait_not_ready(service, 5)
            assert seconds["not_ready_after_sigstop_s"] < 1.0
            time.sleep(1.5)
            redis_server.resume()
            seconds["ready_after_sigcont_s"] = wait_ready(service, 5)
            assert seconds["ready_after_sigcont_s"] < 2.0
            time.sleep(1.5)
            redis_server.kill()
            seconds["not_ready_after_kill9_s"] = wait_not_ready(service, 5)
            assert seconds["not_ready_after_kill9_s"] < 1.0
            time.sleep(1.0)
            redis_server.start()  # returns once it answers PING, data loaded from the file
            seconds["ready_after_restart_s"] = wait_ready(service, 5)
            assert seconds["ready_after_restart_s"] < 2.0
            time.sleep(1.5)
        counts = check_stored(redis_server, load)
        figures(
            "Redis SIGSTOP + kill -9 under load",
            **counts,
            **{k: round(v, 3) for k, v in seconds.items()},
            answers=dict(load.answers),
        )
        # Writes kept coming through; the outages cost some (503, nothing acknowledged).
        assert len(load.acked_events) > 50 and len(load.acked_items) > 10, load.answers
        assert load.answers["/v1/events 503 store_unavailable"] > 0, load.answers
    finally:
        redis_server.stop()


def test_redis_losing_its_data_under_load(
    redis_server: RedisServer, start_service: Any, bundle_dir: Path
) -> None:
    """FLUSHALL, then a restart with nothing on disk, while two workers ingest items that share
    one code tuple: every acknowledged item ends up stored again with the SID it was given,
    no two items share a SID, and a new process sees them all."""
    service = start_service(redis_url=redis_server.url, workers=2, redis_timeout_s=0.5)
    dim = content_dim(bundle_dir)
    with Load(service, bundle_item_ids(bundle_dir), dim, one_tuple(dim)) as load:
        time.sleep(2.0)
        before = len(load.acked_items)
        redis_server.client().flushall()
        time.sleep(2.0)
        redis_server.stop()
        time.sleep(0.5)
        redis_server.start()  # same port, empty
        wait_ready(service, 10)
        time.sleep(2.0)
    assert before > 3 and len(load.acked_items) > before + 3, load.answers
    sids = [tuple(s) for s in load.acked_items.values()]
    assert len(set(sids)) == len(sids), sorted(Counter(sids).items(), key=lambda kv: -kv[1])[:5]
    # Written back within moments (each worker checks its generation every 0.5 s). Histories
    # live only in Redis: events from before the loss are gone, and nothing can bring them back.
    deadline = time.monotonic() + 5
    while True:
        try:
            check_stored(redis_server, load, events=False)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # Every worker answers with the SID the item was given.
    for item_id, sid in load.acked_items.items():
        got = httpx.get(f"{service.url}/v1/items/{item_id}")  # a new connection: any worker
        assert got.status_code == 200 and got.json()["sid"] == sid, (item_id, got.text)
    # New digits come after the written-back ones.
    r = service.post("/v1/items", {"item_id": "after-loss", **one_tuple(dim)(0)})
    assert r.status_code == 200 and tuple(r.json()["items"][0]["sid"]) not in set(sids)
    fresh = start_service(redis_url=redis_server.url)
    for item_id, sid in list(load.acked_items.items())[:: max(1, len(sids) // 10)]:
        assert fresh.get(f"/v1/items/{item_id}").json()["sid"] == sid
    (restored,) = samples(service.get("/metrics").text, "sidrec_catalog_restored_items_total")
    figures(
        "FLUSHALL + restart-empty under load",
        acked_items_before_loss=before,
        acked_items=len(load.acked_items),
        distinct_sids=len(set(sids)),
        restored_items_total=restored[1],
        answers=dict(load.answers),
    )
    assert restored[1] > 0


class HeldProxy:
    """A TCP proxy to a Redis that holds every connection until release(): a service started
    through it answers HTTP with its first catalog call (reading the generation marker)
    waiting, and the test chooses the moment that call reaches Redis."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.released = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.released.wait()
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_a_process_started_on_a_just_emptied_redis_repeats_no_sid(
    redis_server: RedisServer, start_service: Any, bundle_dir: Path
) -> None:
    """FLUSHALL while a worker holds items of one code tuple, and at that very moment a new
    process reads the (now missing) generation marker and ingests items of the same tuple:
    it waits for the running worker to write its items back, so all SIDs stay distinct."""
    dim = content_dim(bundle_dir)
    a = start_service(redis_url=redis_server.url)
    body = [{"item_id": f"a-{n}", **one_tuple(dim)(n)} for n in range(5)]
    r = a.post("/v1/items", body)
    assert r.status_code == 200, r.text
    acked = {i["item_id"]: tuple(i["sid"]) for i in r.json()["items"]}
    proxy = HeldProxy(redis_server.port)
    b: Service | None = None
    try:
        # b is up (HTTP answers), its first Redis call held by the proxy.
        b = start_service(wait_ready=False, redis_url=proxy.url, redis_timeout_s=30)
        redis_server.client().flushall()
        proxy.release()
        start = time.monotonic()
        body = [{"item_id": f"b-{n}", **one_tuple(dim)(n)} for n in range(5)]
        r = b.post("/v1/items", body)
        ingest_s = time.monotonic() - start
        assert r.status_code == 200, r.text
        acked.update({i["item_id"]: tuple(i["sid"]) for i in r.json()["items"]})
        wait_ready(b, 10)
        # a writes its items back within moments of noticing the loss.
        client = redis_server.client()
        deadline = time.monotonic() + 5
        while not all(client.hexists("sidrec:{catalog}:items", i) for i in acked):
            assert time.monotonic() < deadline, "a never wrote its items back"
            time.sleep(0.1)
        figures(
            "new process on a just-emptied Redis",
            items=len(acked),
            distinct_sids=len(set(acked.values())),
            first_ingest_s=round(ingest_s, 3),
        )
        assert len(set(acked.values())) == len(acked), sorted(acked.items(), key=lambda kv: kv[1])
        for service in (a, b):
            for item_id, sid in acked.items():
                got = service.get(f"/v1/items/{item_id}")
                assert got.status_code == 200 and tuple(got.json()["sid"]) == sid, got.text
    finally:
        if b is not None:
            b.stop()
        proxy.close()


def test_core_flows_on_a_redis_cluster(
    redis_cluster: RedisClusterServers, start_service: Any, bundle_dir: Path
) -> None:
    """SIDREC_REDIS_CLUSTER=true against a real 3-master cluster: events, history, recommend,
    ingest, a second process seeing the item, a restart seeing the catalog."""
    settings = {"redis_url": redis_cluster.url, "redis_cluster": "true", "key_prefix": "cl:"}
    a = start_service(**settings)
    assert a.get("/readyz").json()["store"] == "redis"
    items = bundle_item_ids(bundle_dir)
    # Users on every node (hash tags spread them over the slots).
    events = [
        {"user_id": f"user-{u}", "item_id": items[(u + j) % len(items)], "ts": 1000 + j}
        for u in range(12)
        for j in range(4)
    ]
    events.append({**events[0], "event_id": "e-1"})
    events.append({**events[0], "event_id": "e-1"})  # a retry: stored once
    r = a.post("/v1/events", events)
    assert r.status_code == 200 and r.json()["duplicates"] == 1, r.text
    cluster = redis_cluster.client()
    nodes = {cluster.get_node_from_key(f"cl:hist:{{user-{u}}}").name for u in range(12)}
    assert len(nodes) == 3  # the users' keys really are spread over the three masters
    history = a.get("/v1/users/user-3/history").json()["events"]
    assert [e["item_id"] for e in history] == [items[(3 + j) % len(items)] for j in range(4)]
    rec = a.post("/v1/recommend", {"user_id": "user-3", "k": 5})
    assert rec.status_code == 200 and rec.json()["history_len"] == 4

    dim = content_dim(bundle_dir)
    sids = []
    for n in range(3):
        r = a.post("/v1/items", {"item_id": f"cl-item-{n}", **one_tuple(dim)(n)})
        assert r.status_code == 200, r.text
        sids.append(tuple(r.json()["items"][0]["sid"]))
    assert len(set(sids)) == 3
    assert a.post("/v1/events", {"user_id": "user-3", "item_id": "cl-item-0"}).status_code == 200
    b = start_service(**settings)
    assert tuple(b.get("/v1/items/cl-item-2").json()["sid"]) == sids[2]
    r = a.post("/v1/items", {"item_id": "cl-item-late", "title": "Star Voyage 12"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5  # b hears of it from the catalog stream
    while b.get("/v1/items/cl-item-late").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rec = b.post("/v1/recommend", {"user_id": "user-3", "k": 5})
    assert rec.status_code == 200 and rec.json()["history_len"] == 5
    b.stop()
    b.start()
    assert tuple(b.get("/v1/items/cl-item-1").json()["sid"]) == sids[1]
    assert b.get("/readyz").status_code == 200


def test_bulk_load_and_erase_on_a_redis_cluster(redis_cluster: RedisClusterServers) -> None:
    """The history store's bulk replace (one pipeline over every node) and erase (a script on
    the user's slot) on a real 3-master cluster."""
    from redis.asyncio.cluster import RedisCluster

    from sidrec.service.history_store import Event, RedisHistoryStore

    async def scenario() -> None:
        client = RedisCluster.from_url(redis_cluster.url)
        try:
            store = RedisHistoryStore(client, "clh:", history_len=3, event_id_ttl_s=60)
            data = [(f"user-{u}", [(f"i{j}", 100 + j) for j in range(u + 1)]) for u in range(12)]
            for _ in range(2):  # idempotent
                assert await store.replace(data) == sum(min(u + 1, 3) for u in range(12))
            assert await store.history("user-7") == [("i5", 105), ("i6", 106), ("i7", 107)]
            await store.append([Event("user-7", "i0", 200, "e-1")])
            erased = await store.erase("user-7")
            assert (erased.history_events, erased.event_ids) == (3, 1)
            assert await store.history("user-7") == []
            assert await store.append([Event("user-7", "i0", 200, "e-1")]) == 1  # id forgotten
            assert await store.history("user-8") == [("i6", 106), ("i7", 107), ("i8", 108)]
            # /v1/recommend reads the counter apart on a cluster; the one-pipeline read refuses.
            with pytest.raises(TypeError, match="one Redis server"):
                await store.history_and_get("user-8", "clh:counter")
        finally:
            await client.aclose()

    cluster = redis_cluster.client()
    nodes = {cluster.get_node_from_key(f"clh:hist:{{user-{u}}}").name for u in range(12)}
    assert len(nodes) == 3  # the users really are spread over the three masters
    asyncio.run(scenario())


def test_history_and_retirement_counter_in_one_round_trip(redis_server: RedisServer) -> None:
    """/v1/recommend's read on one server: the history and the catalog's retirement counter
    take one pooled connection (one pipeline), not two, and come back as two reads would."""
    from redis.asyncio import BlockingConnectionPool, Redis

    from sidrec.service.history_store import Event, RedisHistoryStore

    class CountingPool(BlockingConnectionPool):
        taken = 0

        async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            CountingPool.taken += 1
            return await super().get_connection(*args, **kwargs)

    async def scenario() -> None:
        client = Redis.from_pool(CountingPool.from_url(redis_server.url))
        try:
            store = RedisHistoryStore(client, "rt:", history_len=3, event_id_ttl_s=60)
            await store.append([Event("u", f"i{j}", 100 + j) for j in range(5)])
            await client.set("rt:retired:seq", 12)
            before = CountingPool.taken
            history, seq = await store.history_and_get("u", "rt:retired:seq")
            assert CountingPool.taken - before == 1
            assert history == await store.history("u") == [("i2", 102), ("i3", 103), ("i4", 104)]
            assert seq == await client.get("rt:retired:seq") == b"12"
            assert await store.history_and_get("nobody", "rt:none") == ([], None)
        finally:
            await client.aclose()

    asyncio.run(scenario())
