"""HTTP contract of every route against one real service (uvicorn subprocess + real Redis):
successes, each client mistake with its status and named field, and malformed input that must
never produce a 500."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, Service

from sidrec.bundle import load_bundle

API_KEY = "test-key-123"
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path, shared_redis: RedisServer
) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("api") / "service.log"
    svc = Service(
        bundle_dir,
        log,
        redis_url=shared_redis.url,
        key_prefix="api-test:",
        api_key=API_KEY,
        max_body_bytes=64 * 1024,
        max_k=500,
        history_len=50,
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def catalog(bundle_dir: Path) -> list[Any]:
    return load_bundle(bundle_dir).items()


def assert_error(r: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and body["detail"], body
    assert body["request_id"] == r.headers["x-request-id"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def test_health_and_ready_name_the_provider(service: Service, bundle_dir: Path) -> None:
    assert service.get("/healthz").json() == {"status": "ok"}
    ready = service.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["reasons"] == []
    assert body["provider"] == "CPUExecutionProvider"
    assert body["store"] == "redis"
    assert body["model_version"] == load_bundle(bundle_dir).version
    assert body["index_items"] >= len(load_bundle(bundle_dir).items())


def test_recommend_without_history_falls_back_to_popular(
    service: Service, bundle_dir: Path
) -> None:
    r = service.post("/v1/recommend", {"user_id": "nobody-ever", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] == "popular" and body["history_len"] == 0
    popular = load_bundle(bundle_dir).manifest["popular"]
    assert [i["item_id"] for i in body["items"]] == popular[:5]
    assert body["request_id"] == r.headers["x-request-id"]


def test_events_then_recommend_uses_history_and_drops_seen(
    service: Service, catalog: list[Any]
) -> None:
    user = "api-user-1"
    seen = [r.item_id for r in catalog[:5]]
    events = [{"user_id": user, "item_id": i, "ts": 1_100_000_000 + n} for n, i in enumerate(seen)]
    r = service.post("/v1/events", events, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 5 and r.json()["duplicates"] == 0

    history = service.get(f"/v1/users/{user}/history").json()
    assert [e["item_id"] for e in history["events"]] == seen
    assert [e["ts"] for e in history["events"]] == sorted(e["ts"] for e in history["events"])

    r = service.post("/v1/recommend", {"user_id": user, "k": 20})
    body = r.json()
    assert r.status_code == 200 and body["fallback"] is None and body["history_len"] == 5
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 20 and not set(ids) & set(seen)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(len(i["sid"]) == len(catalog[0].sid) for i in body["items"])

    keep = service.post("/v1/recommend", {"user_id": user, "k": 500, "exclude_seen": False})
    assert set(seen) <= {i["item_id"] for i in keep.json()["items"]}


def test_history_override_and_anonymous_request(service: Service, catalog: list[Any]) -> None:
    history = [catalog[0].item_id, {"item_id": catalog[1].item_id, "ts": 1_200_000_000}]
    r = service.post("/v1/recommend", {"history": history, "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] is None and r.json()["history_len"] == 2


def test_event_ids_make_retries_idempotent(service: Service, catalog: list[Any]) -> None:
    event = {"user_id": "retry-user", "item_id": catalog[3].item_id, "event_id": "evt-1"}
    first = service.post("/v1/events", event, headers=AUTH).json()
    again = service.post("/v1/events", [event, {**event, "event_id": "evt-2"}], headers=AUTH)
    assert first["duplicates"] == 0
    assert again.json() == {**again.json(), "accepted": 2, "duplicates": 1}
    assert len(service.get("/v1/users/retry-user/history").json()["events"]) == 2


def test_erase_user_removes_history_and_event_ids(service: Service, catalog: list[Any]) -> None:
    user = "erase/me 1"  # a slash and a space: ids in paths are whole path tails
    path = "/v1/users/erase%2Fme%201"
    events = [
        {"user_id": user, "item_id": catalog[n].item_id, "ts": 1_300_000_000 + n, "event_id": n}
        for n in range(3)
    ]
    assert service.post("/v1/events", events, headers=AUTH).json()["duplicates"] == 0
    other = {"user_id": "erase-bystander", "item_id": catalog[0].item_id}
    assert service.post("/v1/events", other, headers=AUTH).status_code == 200

    assert_error(service.http.delete(path), 401)  # the write key, like every write
    assert len(service.get(f"{path}/history").json()["events"]) == 3  # nothing erased
    r = service.http.delete(path, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "user_id": user,
        "history_events": 3,
        "event_ids": 3,
        "request_id": r.headers["x-request-id"],
    }
    assert service.get(f"{path}/history").json()["events"] == []
    rec = service.post("/v1/recommend", {"user_id": user, "k": 3}).json()
    assert rec["fallback"] == "popular" and rec["history_len"] == 0
    # The remembered event ids went too: the same events again are stored, not duplicates.
    assert service.post("/v1/events", events, headers=AUTH).json()["duplicates"] == 0
    assert len(service.get("/v1/users/erase-bystander/history").json()["events"]) == 1

    # Erasing a user the store does not know (or twice) is no error.
    again = service.http.delete("/v1/users/never-was-here", headers=AUTH)
    assert again.status_code == 200
    assert again.json()["history_events"] == again.json()["event_ids"] == 0
    assert_error(service.http.delete("/v1/users/bad%01id", headers=AUTH), 422, "user_id")
    assert_error(service.http.delete("/v1/users/" + "x" * 300, headers=AUTH), 422, "user_id")
    for raw in ("%00", "%ff", "..%2F..", ""):
        assert service.http.delete(f"/v1/users/{raw}", headers=AUTH).status_code < 500, raw

    # A user id may end in "/history": the route (and its metrics label) is the DELETE one.
    assert service.http.delete("/v1/users/u/history", headers=AUTH).json()["user_id"] == (
        "u/history"
    )
    metrics = service.get("/metrics").text
    assert 'method="DELETE",route="/v1/users/{user_id}",status="200"' in metrics
    assert 'method="DELETE",route="/v1/users/{user_id}/history"' not in metrics
    spec = service.get("/openapi.json").json()["paths"]["/v1/users/{user_id}"]["delete"]
    assert spec["security"] == [{"apiKey": []}]
    assert {"200", "401", "422", "503"} <= set(spec["responses"])


def test_history_is_capped(service: Service, catalog: list[Any]) -> None:
    events = [
        {"user_id": "cap-user", "item_id": catalog[n % 10].item_id, "ts": n} for n in range(70)
    ]
    assert service.post("/v1/events", events, headers=AUTH).status_code == 200
    kept = service.get("/v1/users/cap-user/history").json()["events"]
    assert len(kept) == 50 and kept[0]["ts"] == 20 and kept[-1]["ts"] == 69  # newest 50


def test_item_ingest_get_and_update(service: Service, catalog: list[Any]) -> None:
    body = {"item_id": "api-new-1", "title": "Orbit Siege 9 (2040)", "fields": {"genres": "Sci-Fi"}}
    r = service.post("/v1/items", body, headers=AUTH)
    assert r.status_code == 200, r.text
    (created,) = r.json()["items"]
    assert created["status"] == "created" and created["item_id"] == "api-new-1"
    assert len(created["sid"]) == len(catalog[0].sid)
    record = service.get("/v1/items/api-new-1").json()
    assert record["sid"] == created["sid"] and record["source"] == "ingested"
    assert record["text"].startswith("Orbit Siege 9 (2040). Genres: Sci-Fi.")

    # Same content again: same SID (the dedup digit is not handed out twice), "updated".
    again = service.post("/v1/items", body, headers=AUTH).json()["items"][0]
    assert again["status"] == "updated" and again["sid"] == created["sid"]
    # New content: new text, possibly a new SID.
    changed = {**body, "title": "Love Letters 9 (2040)", "fields": {"genres": "Romance"}}
    service.post("/v1/items", changed, headers=AUTH)
    assert service.get("/v1/items/api-new-1").json()["title"] == "Love Letters 9 (2040)"

    bundle_item = service.get(f"/v1/items/{catalog[0].item_id}").json()
    assert bundle_item["source"] == "bundle" and bundle_item["sid"] == list(catalog[0].sid)
    assert bundle_item["title"] == catalog[0].title


def test_reingesting_a_bundle_item_with_its_own_text_keeps_its_sid(
    service: Service, bundle_dir: Path
) -> None:
    item = load_bundle(bundle_dir).items()[0]
    # The template leaves a finished sentence alone, so the bundle's own text as the title
    # embeds to exactly the text the bundle's SID was built from.
    r = service.post("/v1/items", {"item_id": item.item_id, "title": item.text}, headers=AUTH)
    assert r.status_code == 200, r.text
    got = r.json()["items"][0]
    assert got["status"] == "updated" and got["sid"] == list(item.sid)


def test_batch_ingest_with_precomputed_vector(service: Service, bundle_dir: Path) -> None:
    dim = load_bundle(bundle_dir).manifest["content"]["dim"]
    vec = [0.0] * dim
    vec[3] = 1.0
    r = service.post(
        "/v1/items",
        [{"item_id": "vec-1", "content_vector": vec}, {"item_id": "vec-2", "content_vector": vec}],
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    a, b = r.json()["items"]
    # Same vector -> same codes -> different dedup digits, never the same SID.
    assert a["sid"][:-1] == b["sid"][:-1] and a["sid"][-1] != b["sid"][-1] and b["collided"]


def test_write_routes_need_the_api_key(service: Service, catalog: list[Any]) -> None:
    event = {"user_id": "u", "item_id": catalog[0].item_id}
    assert_error(service.post("/v1/events", event), 401)
    assert_error(service.post("/v1/events", event, headers={"X-API-Key": "wrong"}), 401)
    assert_error(service.post("/v1/items", {"item_id": "x", "title": "t"}), 401)
    # Reads, health and metrics stay open.
    assert service.post("/v1/recommend", {"user_id": "u"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", f"/v1/items/{catalog[0].item_id}"):
        assert service.get(path).status_code == 200, path
    # Only the write key is set here: the OpenAPI asks for a key on writes only.
    paths = service.get("/openapi.json").json()["paths"]
    assert paths["/v1/events"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in paths["/v1/recommend"]["post"]
    assert "security" not in paths["/v1/users/{user_id}/history"]["get"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"user_id": "u", "k": 0}, 422, "k"),
        ({"user_id": "u", "k": 501}, 422, "k"),  # over SIDREC_MAX_K
        ({"user_id": "u", "k": "ten"}, 422, "k"),
        ({"user_id": "u", "k": 2.5}, 422, "k"),
        ({"user_id": "u", "k": True}, 422, "k"),
        ({"user_id": "u", "exclude_seen": "yes"}, 422, "exclude_seen"),
        ({"user_id": ""}, 422, "user_id"),
        ({"user_id": True}, 422, "user_id"),
        ({"user_id": "a" * 300}, 422, "user_id"),
        ({"user_id": "bad\x00id"}, 422, "user_id"),
        ({"k": 3}, 422, "body"),
        ({"user_id": "u", "kk": 3}, 422, "kk"),
        ({"user_id": "u", "history": "1"}, 422, "history"),
        ({"user_id": "u", "history": [{"item_id": "1", "ts": -5}]}, 422, "history[0].ts"),
        ({"user_id": "u", "query_time": "now"}, 422, "query_time"),
        ({"user_id": "u", "exclude_items": "1"}, 422, "exclude_items"),
        ({"user_id": "u", "exclude_items": [None]}, 422, "exclude_items[0]"),
        ({"user_id": "u", "filter": {"genres": []}}, 422, "filter.genres"),
        ({"user_id": "u", "filter": {"genres": "Western"}}, 422, "filter.genres"),
        ({"user_id": "u", "filter": {}}, 422, "filter"),
        ({"user_id": "u", "filter": {"colour": ["red"]}}, 422, "filter.colour"),  # unknown field
        ([1, 2, 3], 422, "body"),
    ],
)
def test_recommend_client_mistakes(service: Service, body: Any, status: int, field: str) -> None:
    assert_error(service.post("/v1/recommend", body), status, field)


def test_unknown_items_are_listed(service: Service, catalog: list[Any]) -> None:
    history = [catalog[0].item_id, "no-such-item", "nor-this"]
    body = assert_error(service.post("/v1/recommend", {"user_id": "u", "history": history}), 422)
    assert body["error"] == "unknown_items"
    assert {e["field"] for e in body["errors"]} == {"history[1]", "history[2]"}
    assert "no-such-item" in body["detail"] and "nor-this" in body["detail"]

    events = [{"user_id": "u", "item_id": catalog[0].item_id}, {"user_id": "u", "item_id": "ghost"}]
    body = assert_error(service.post("/v1/events", events, headers=AUTH), 422, "[1].item_id")
    assert "ghost" in body["detail"]
    # Nothing of a rejected batch is stored.
    assert service.get("/v1/users/u/history").json()["events"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"item_id": "1"}, "user_id"),
        ({"user_id": "u", "item_id": "1", "ts": "yesterday"}, "ts"),
        ({"user_id": "u", "item_id": "1", "ts": 2**62}, "ts"),
        ({"user_id": "u", "item_id": "1", "rating": 5}, "rating"),
        ([{"user_id": "u", "item_id": "1"}, {"user_id": "u"}], "[1].item_id"),
        ([], "body"),
        ("just a string", "body"),
        (None, "body"),
    ],
)
def test_event_client_mistakes(service: Service, body: Any, field: str) -> None:
    assert_error(service.post("/v1/events", body, headers=AUTH), 422, field)


def test_event_batch_limit(service: Service, catalog: list[Any]) -> None:
    big = [{"user_id": "u", "item_id": catalog[0].item_id}] * 1001
    body = assert_error(service.post("/v1/events", big, headers=AUTH), 422, "body")
    assert "1000" in body["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "no id"}, "item_id"),
        ({"item_id": "x"}, "body"),  # no text at all
        ({"item_id": "x", "content_vector": [1.0, 2.0]}, "content_vector"),
        ({"item_id": "x", "content_vector": [0.0] * 384}, "content_vector"),
        ({"item_id": "x", "fields": ["genres"]}, "fields"),
        ({"item_id": "x", "title": 5}, "title"),
        ([{"item_id": "d", "title": "a"}, {"item_id": "d", "title": "b"}], "[1].item_id"),
        ([{"item_id": "ok", "title": "a"}, {"item_id": "y"}], "[1]"),
    ],
)
def test_item_client_mistakes(service: Service, body: Any, field: str) -> None:
    assert_error(service.post("/v1/items", body, headers=AUTH), 422, field)
    # A rejected batch stores nothing.
    assert service.get("/v1/items/ok").status_code == 404


def test_not_found_and_bad_method(service: Service) -> None:
    assert_error(service.get("/v1/items/does-not-exist"), 404, "item_id")
    assert_error(service.get("/v2/anything"), 404)
    assert_error(service.get("/v1/recommend"), 405)


def test_invalid_json_and_body_limits(service: Service) -> None:
    headers = {"content-type": "application/json"}
    body = assert_error(
        service.post("/v1/recommend", content=b'{"user_id": "u",', headers=headers), 400, "body"
    )
    assert "JSON" in body["detail"]
    assert_error(
        service.post("/v1/events", content=b"\xff\xfe\x00garbage", headers={**headers, **AUTH}), 400
    )
    huge = json.dumps({"user_id": "u", "history": ["1"] * 40_000}).encode()
    assert_error(service.post("/v1/recommend", content=huge, headers=headers), 413)

    # Chunked, no Content-Length: the limit must hold while the body streams in. A raw socket,
    # because the server answers before the body ends and HTTP clients insist on sending it all.
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        head = "POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b'"1",' * 1024
        for _ in range(20):  # 80 KiB > the 64 KiB limit; the final chunk is never sent
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        reply = b""
        while not reply.endswith(b"}"):  # headers and the JSON body may come in two reads
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413"), reply[:300]
    assert "SIDREC_MAX_BODY_BYTES" in reply


def test_request_id_is_echoed_or_made(service: Service) -> None:
    r = service.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = service.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


MALFORMED: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b"{}",
    b"0",
    b'"string"',
    b"[" * 5000 + b"]" * 5000,
    b'{"user_id": {"nested": [1, 2, {"x": null}]}}',
    b'{"user_id": "u", "k": 1e309}',
    b'{"user_id": "u", "k": 99999999999999999999999999999}',
    b'{"user_id": "u", "k": NaN}',
    b'{"user_id": "u", "history": [null]}',
    b'{"user_id": "u", "history": [{"item_id": null}]}',
    b'{"user_id": "u", "history": [[1, 2]]}',
    b'{"user_id": "u", "query_time": -1}',
    b'{"user_id": "u", "query_time": 1e20}',
    b'{"user_id": "\\ud800"}',
    '{"user_id": "ユーザー🙂", "k": 1}'.encode(),
    b'{"user_id": "u"}{"user_id": "v"}',
    b'{"item_id": "x", "content_vector": [NaN, Infinity]}',
    b'{"item_id": "x", "content_vector": "abc"}',
    b'{"item_id": "x", "fields": {"a": {"b": 1}}}',
    b'{"item_id": "x", "title": "' + b"t" * 3000 + b'"}',
    b'{"user_id": "u", "item_id": "1", "event_id": ""}',
    b'{"user_id": "u", "item_id": 1.5}',
    b"\x00\x01\x02",
]


@pytest.mark.parametrize("route", ["/v1/recommend", "/v1/events", "/v1/items"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_malformed_input_never_500(service: Service, route: str, content_type: str | None) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["content-type"] = content_type
    for payload in MALFORMED:
        r = service.http.post(route, content=payload, headers=headers)
        assert r.status_code < 500, (route, payload[:80], r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")


def test_odd_ids_in_paths_never_500(service: Service) -> None:
    for raw in ("%00", "a%2Fb", "..%2F..", "%F0%9F%99%82", "x" * 2000, "%ff", "%20"):
        for path in (f"/v1/items/{raw}", f"/v1/users/{raw}/history", f"/v1/items/{raw}/similar"):
            assert service.get(path).status_code < 500, path
        assert service.http.delete(f"/v1/items/{raw}", headers=AUTH).status_code < 500, raw


def fields_of(bundle_dir: Path) -> dict[str, dict[str, str]]:
    items = [json.loads(line) for line in (bundle_dir / "items.jsonl").open()]
    if not any(i.get("fields") for i in items):
        pytest.skip("the bundle has no item fields (exported before items.jsonl kept them)")
    return {i["item_id"]: i["fields"] for i in items}


def test_recommend_filter_and_exclude_items(service: Service, bundle_dir: Path) -> None:
    """Items of another theme than the user's rank low: a filter on them needs over-fetch to
    fill k, and says when fewer than k qualify."""
    fields = fields_of(bundle_dir)
    scifi = [i for i, f in fields.items() if "Sci-Fi" in f["genres"]]
    western = [i for i, f in fields.items() if f["genres"] == "Western"]
    user = "filter-user"
    events = [
        {"user_id": user, "item_id": i, "ts": 1_100_000_000 + n} for n, i in enumerate(scifi[:8])
    ]
    assert service.post("/v1/events", events, headers=AUTH).status_code == 200

    def ask(**extra: Any) -> dict[str, Any]:
        r = service.post("/v1/recommend", {"user_id": user, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    plain = ask(k=20)
    assert not {i["item_id"] for i in plain["items"]} & set(western)  # they rank low
    assert plain["fewer_than_k"] is False
    got = ask(k=20, filter={"genres": ["western"]})  # any case; one value of "a|b" matches
    ids = [i["item_id"] for i in got["items"]]
    assert len(ids) == 20 and set(ids) <= set(western) and got["fewer_than_k"] is False
    scores = [i["score"] for i in got["items"]]
    assert scores == sorted(scores, reverse=True)
    every = ask(k=100, filter={"genres": ["Western", "Adventure"]})
    assert {i["item_id"] for i in every["items"]} == set(western) | set(scifi[8:])
    assert every["fewer_than_k"] is True  # 52 qualify
    skip = ids[:5]
    fewer = ask(k=20, filter={"genres": ["Western"]}, exclude_items=[*skip, "no-such-item"])
    assert [i["item_id"] for i in fewer["items"]] == ids[5:] + [
        i["item_id"] for i in fewer["items"][15:]
    ]
    assert not set(skip) & {i["item_id"] for i in fewer["items"]}
    # Without a history the popular list is filtered the same way.
    fallback = service.post(
        "/v1/recommend", {"user_id": "nobody-filtered", "k": 5, "filter": {"genres": ["Western"]}}
    ).json()
    assert fallback["fallback"] == "popular"
    assert {i["item_id"] for i in fallback["items"]} <= set(western)
    # An unknown field is named, with the fields there are.
    body = assert_error(ask_raw(service, user, {"Genre": ["Western"]}), 422, "filter.Genre")
    assert "genres" in body["detail"]


def ask_raw(service: Service, user: str, filter_: dict[str, Any]) -> Any:
    return service.post("/v1/recommend", {"user_id": user, "filter": filter_})


def test_similar_items_and_retiring_need_the_right_things(
    service: Service, catalog: list[Any]
) -> None:
    item = catalog[10].item_id
    r = service.get(f"/v1/items/{item}/similar", params={"k": 5})  # open, like item reads
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["item_id"] == item and len(body["items"]) == 5 and body["fewer_than_k"] is False
    assert item not in [i["item_id"] for i in body["items"]]
    assert_error(service.get(f"/v1/items/{item}/similar", params={"k": 0}), 422, "k")
    assert_error(service.get(f"/v1/items/{item}/similar", params={"k": 501}), 422, "k")
    assert_error(service.get("/v1/items/no-such-item/similar"), 404, "item_id")
    # Retiring needs the write key; an unknown item is a 404 naming it.
    assert_error(service.http.delete(f"/v1/items/{item}"), 401)
    missing = assert_error(service.http.delete("/v1/items/no-such-item", headers=AUTH), 404)
    assert "no-such-item" in missing["detail"]
    paths = service.get("/openapi.json").json()["paths"]
    assert paths["/v1/items/{item_id}"]["delete"]["security"] == [{"apiKey": []}]
    assert "404" in paths["/v1/items/{item_id}"]["delete"]["responses"]
    assert "404" in paths["/v1/items/{item_id}/similar"]["get"]["responses"]
    (k,) = [
        p for p in paths["/v1/items/{item_id}/similar"]["get"]["parameters"] if p["name"] == "k"
    ]
    assert k["schema"]["maximum"] == 500  # SIDREC_MAX_K
    # Metrics name the route templates, never the ids.
    metrics = service.get("/metrics").text
    assert 'route="/v1/items/{item_id}/similar"' in metrics
    assert 'method="DELETE",route="/v1/items/{item_id}"' in metrics
    assert f"/v1/items/{item}" not in metrics


def reingest_bundle_items(bundle_dir: Path, log_path: Path, redis: RedisServer, prefix: str) -> Any:
    """Re-ingest every item of `bundle_dir` with its own text through a real service
    (SIDREC_CONTENT_THREADS=2, the content encoder's own ORT threads): the first 20 one per
    request, then all in one batch. Checks each gets the bundle's SID both ways; returns the
    content vectors the service stored, float32 [n, 384] in items.jsonl order."""
    import base64

    import numpy as np
    import redis as redis_py

    items = load_bundle(bundle_dir).items()
    svc = Service(bundle_dir, log_path, redis_url=redis.url, key_prefix=prefix)
    svc.env["SIDREC_CONTENT_THREADS"] = "2"
    svc.start()
    try:
        # The bundle's text as the title embeds to exactly that text (see above).
        singles = [
            svc.post("/v1/items", {"item_id": item.item_id, "title": item.text}).json()["items"][0]
            for item in items[:20]
        ]
        r = svc.post("/v1/items", [{"item_id": i.item_id, "title": i.text} for i in items])
        assert r.status_code == 200, r.text
        batch = r.json()["items"]
    finally:
        svc.stop()
    assert [s["sid"] for s in singles] == [list(i.sid) for i in items[:20]]
    assert [b["sid"] for b in batch] == [list(i.sid) for i in items]
    client = redis_py.Redis.from_url(redis.url)
    stored = client.hmget(f"{prefix}{{catalog}}:items", [i.item_id for i in items])
    return np.stack(
        [
            np.frombuffer(base64.b64decode(json.loads(raw)["content_vector"]), "<f4")
            for raw in stored
        ]
    )


def test_service_content_vectors_and_sids_match_the_offline_pipeline(
    tmp_path: Path, bundle_dir: Path, shared_redis: RedisServer
) -> None:
    """Every bundle item re-ingested with its own text gets the content vector the offline
    pipeline computed for that text (sentence-transformers; tolerance 1e-5 per component of
    an L2-normalised 384-d vector) and the bundle's own SID, one item per request and all in
    one batch."""
    import numpy as np

    from sidrec.offline import content

    texts = [item.text for item in load_bundle(bundle_dir).items()]
    offline = content.encode_texts(texts, None, progress=False)  # [n, 384]
    served = reingest_bundle_items(
        bundle_dir, tmp_path / "service.log", shared_redis, "content-parity:"
    )
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-5)


def test_int8_bundle_service_ingests_the_vectors_its_sids_were_built_from(
    tmp_path: Path, int8_bundle_dir: Path, shared_redis: RedisServer
) -> None:
    """A run with --content-precision int8: the bundle carries the int8 graph, and the
    service, running it one text per run, gives every re-ingested bundle item the very vector
    the offline run encoded (and built the SIDs from) and the bundle's SID, alone or in a
    batch."""
    import numpy as np
    import onnx

    bundle = load_bundle(int8_bundle_dir)
    assert bundle.manifest["content"]["precision"] == "int8"
    assert bundle.manifest["content"]["model"] == "all-MiniLM-L6-v2/int8"
    ops = {n.op_type for n in onnx.load(str(int8_bundle_dir / "content_encoder.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
    run = int8_bundle_dir.parent / "run"
    assert json.loads((run / "content.json").read_text()) == {"precision": "int8"}
    offline = np.load(run / "content_vectors.npy")[[item.row - 1 for item in bundle.items()]]
    served = reingest_bundle_items(
        int8_bundle_dir, tmp_path / "service.log", shared_redis, "content-int8:"
    )
    # The same graph on the same inputs: equal up to the float order of ORT's threads.
    np.testing.assert_allclose(served, offline, rtol=0, atol=1e-6)
