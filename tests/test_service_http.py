"""The HTTP layer under a hostile client (issue 12), against a real service (uvicorn subprocess,
real Redis): oversized bodies on a keep-alive connection, the read and write keys (checked
before the body is read), limits on overrides, error bodies and path ids, and the OpenAPI
agreeing with what the service does."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import RedisServer, Service

from sidrec.bundle import load_bundle

WRITE_KEY = "write-key-1"
READ_KEY = "read-key-1"
MAX_BODY = 64 * 1024
MAX_K = 500
MAX_BATCH = 100


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path, shared_redis: RedisServer
) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("http") / "service.log"
    svc = Service(
        bundle_dir,
        log,
        redis_url=shared_redis.url,
        key_prefix="http-test:",
        api_key=WRITE_KEY,
        read_api_key=READ_KEY,
        max_body_bytes=MAX_BODY,
        max_k=MAX_K,
        max_batch=MAX_BATCH,
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def item_ids(bundle_dir: Path) -> list[str]:
    return [r.item_id for r in load_bundle(bundle_dir).items()]


@pytest.fixture(scope="module")
def max_len(bundle_dir: Path) -> int:
    return int(load_bundle(bundle_dir).model["max_len"])


READ = {"X-API-Key": READ_KEY}
WRITE = {"X-API-Key": WRITE_KEY}


def requests_counted(service: Service, route: str, method: str, status: str) -> float:
    text = service.get("/metrics").text
    prefix = "sidrec_http_requests_total{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix) :].rsplit("} ", 1)
            if {f'route="{route}"', f'method="{method}"', f'status="{status}"'} <= set(
                labels.split(",")
            ):
                return float(value)
    return 0.0


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length from a raw socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head, body


# --- 1. an oversized body ---------------------------------------------------------------------


def test_oversized_body_leaves_the_keep_alive_connection_usable(
    service: Service, item_ids: list[str]
) -> None:
    before = requests_counted(service, "/v1/recommend", "POST", "413")
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    big = json.dumps({"user_id": "u", "history": [item_ids[0]] * 20_000}).encode()
    assert len(big) > MAX_BODY
    headers = {"Content-Type": "application/json", **READ}
    for _ in range(3):
        conn.request("POST", "/v1/recommend", body=big, headers=headers)
        first = conn.getresponse()
        body = json.loads(first.read())
        assert first.status == 413 and body["error"] == "body_too_large"
        assert "SIDREC_MAX_BODY_BYTES" in body["detail"]
        assert first.getheader("connection", "").lower() != "close"
        sock = conn.sock
        # The next requests ride the same connection: no reset, no reconnect.
        for n in range(5):
            small = json.dumps({"user_id": f"keep-{n}", "k": 2}).encode()
            conn.request("POST", "/v1/recommend", body=small, headers=headers)
            answer = conn.getresponse()
            assert answer.status == 200, answer.read()
            assert len(json.loads(answer.read())["items"]) == 2
            assert conn.sock is sock
    conn.close()
    # Counted under its route like any other answer.
    assert requests_counted(service, "/v1/recommend", "POST", "413") == before + 3
    assert "Traceback" not in service.log() and "Exception in ASGI" not in service.log()


def test_oversized_body_awaiting_100_continue_gets_413_and_a_clean_close(
    service: Service,
) -> None:
    """A client that waits for "100 Continue" never sends the body: the connection cannot be
    reused (the server would read the next request as the body), so it is closed, cleanly."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-API-Key: " + WRITE_KEY.encode() + b"\r\n"
            b"Expect: 100-continue\r\nContent-Length: 10000000\r\n\r\n"
        )
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "body_too_large"
        assert sock.recv(1) == b""  # an orderly close (FIN), not a reset


# --- 2. keys ------------------------------------------------------------------------------


def test_personal_reads_need_the_read_or_write_key(service: Service, item_ids: list[str]) -> None:
    event = {"user_id": "keyed-user", "item_id": item_ids[0]}
    assert service.post("/v1/events", event, headers=WRITE).status_code == 200
    for method, path, body in (
        ("POST", "/v1/recommend", {"user_id": "keyed-user", "k": 3}),
        ("GET", "/v1/users/keyed-user/history", None),
    ):
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = service.http.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"] == "unauthorized"
        for headers in (READ, WRITE):  # the write key grants reads too
            r = service.http.request(method, path, json=body, headers=headers)
            assert r.status_code == 200, (path, headers, r.text)
    history = service.get("/v1/users/keyed-user/history", headers=READ).json()
    assert [e["item_id"] for e in history["events"]] == [item_ids[0]]


def test_the_read_key_does_not_write_and_health_stays_open(
    service: Service, item_ids: list[str]
) -> None:
    event = {"user_id": "u", "item_id": item_ids[0]}
    assert service.post("/v1/events", event, headers=READ).status_code == 401
    assert (
        service.post("/v1/items", {"item_id": "k", "title": "t"}, headers=READ).status_code == 401
    )
    assert service.http.delete("/v1/users/u", headers=READ).status_code == 401  # erasing writes
    for path in ("/healthz", "/readyz", "/metrics", f"/v1/items/{item_ids[0]}"):
        assert service.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/events", b'{"user_id": '),  # not JSON: 400 after the body is read
        ("/v1/events", b'{"user_id": "u"}'),  # invalid: 422 after it is parsed
        ("/v1/items", b"\xff\xfe"),
        ("/v1/recommend", b'{"k": "many"}'),
    ],
)
def test_the_key_is_checked_before_the_body(service: Service, path: str, payload: bytes) -> None:
    r = service.http.post(path, content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text


def test_the_key_is_checked_before_the_body_arrives(service: Service) -> None:
    """Headers only, the declared body never sent: the 401 comes at once, not after a wait for
    a body the service has no business reading."""
    for path in ("/v1/events", "/v1/recommend"):
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 5000\r\n\r\n".encode()
            )
            start = time.monotonic()
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 401"), (path, head)
            assert time.monotonic() - start < 4
            assert json.loads(body)["error"] == "unauthorized"


# --- 3. limits ----------------------------------------------------------------------------


def test_history_override_is_capped_at_the_models_max_len(
    service: Service, item_ids: list[str], max_len: int
) -> None:
    exactly = [item_ids[n % len(item_ids)] for n in range(max_len)]
    r = service.post("/v1/recommend", {"history": exactly, "k": 3}, headers=READ)
    assert r.status_code == 200, r.text
    assert r.json()["history_len"] == max_len

    r = service.post("/v1/recommend", {"history": [*exactly, item_ids[0]]}, headers=READ)
    assert r.status_code == 422, r.text
    body = r.json()
    assert [e["field"] for e in body["errors"]] == ["history"]
    assert str(max_len) in body["detail"] and "max_len" in body["detail"]
    # Far beyond it: refused while parsing, same field.
    r = service.post("/v1/recommend", {"history": ["1"] * 12_000}, headers=READ)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "history", r.text


def test_error_bodies_are_capped(service: Service, max_len: int) -> None:
    unknown = [f"no-such-item-{n}" for n in range(max_len)]
    r = service.post("/v1/recommend", {"history": unknown}, headers=READ)
    body = r.json()
    assert r.status_code == 422 and body["error"] == "unknown_items"
    assert len(body["errors"]) == 50 and body["errors_total"] == max_len
    assert body["errors"][0] == {"field": "history[0]", "problem": "unknown item 'no-such-item-0'"}
    assert len(r.content) < 8_000
    # Thousands of invalid entries (each fails every branch of the id-or-object union).
    r = service.post("/v1/recommend", {"history": [None] * 8_000}, headers=READ)
    body = r.json()
    assert r.status_code == 422 and len(body["errors"]) == 50
    assert body["errors_total"] >= 8_000 and len(r.content) < 16_000
    events = [{"user_id": "u", "item_id": f"ghost-{n}"} for n in range(MAX_BATCH)]
    r = service.post("/v1/events", events, headers=WRITE)
    body = r.json()
    assert r.status_code == 422 and len(body["errors"]) == 50
    assert body["errors_total"] == MAX_BATCH and len(r.content) < 8_000


def test_path_ids_follow_the_id_rules(service: Service, item_ids: list[str]) -> None:
    # Invalid UTF-8: once decoded with replacement, %ff and %fe were both user "\ufffd".
    for raw in ("%ff", "%fe", "a%C3", "%ED%A0%80"):  # the last: a UTF-8-encoded surrogate
        for path in (f"/v1/users/{raw}/history", f"/v1/items/{raw}"):
            r = service.get(path, headers=READ)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"] == "invalid_path"
    # The rules body ids follow: 1..256 characters, no control characters. A line break too:
    # the routes' patterns once stopped at it (an undocumented 404, found by schemathesis).
    for raw in ("x" * 257, "a%00b", "a%7Fb", "a%0Ab", "ab%0A", "%0A"):
        for path, field in (
            (f"/v1/users/{raw}/history", "user_id"),
            (f"/v1/items/{raw}", "item_id"),
        ):
            r = service.get(path, headers=READ)
            assert r.status_code == 422, (path, r.text)
            assert [e["field"] for e in r.json()["errors"]] == [field]
    # "$" matched before a final line break: DELETE /v1/users/nl-user%0A erased "nl-user".
    event = {"user_id": "nl-user", "item_id": item_ids[0]}
    assert service.post("/v1/events", event, headers=WRITE).status_code == 200
    for raw in ("nl-user%0A", "nl-user%0A%0A"):
        r = service.http.delete(f"/v1/users/{raw}", headers=WRITE)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "user_id", r.text
        r = service.http.delete(f"/v1/items/{item_ids[0]}{raw[7:]}", headers=WRITE)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "item_id", r.text
    assert len(service.get("/v1/users/nl-user/history", headers=READ).json()["events"]) == 1
    # Valid UTF-8 and the longest id still work.
    assert service.get("/v1/users/%F0%9F%99%82/history", headers=READ).json()["user_id"] == "🙂"
    assert service.get(f"/v1/users/{'x' * 256}/history", headers=READ).status_code == 200
    assert service.get(f"/v1/items/{item_ids[0]}").status_code == 200


# --- 4. the OpenAPI and the service agree -------------------------------------------------


@pytest.fixture(scope="module")
def openapi(service: Service) -> dict[str, Any]:
    r = service.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def request_schema(openapi: dict[str, Any], path: str) -> dict[str, Any]:
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # The document itself as the root, so "#/components/..." references resolve.
    return {**openapi, **schema}


def schema_accepts(schema: dict[str, Any], body: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def test_request_schemas_match_what_the_service_accepts(
    service: Service, openapi: dict[str, Any], item_ids: list[str], max_len: int, bundle_dir: Path
) -> None:
    known = item_ids[0]
    dim = load_bundle(bundle_dir).manifest["content"]["dim"]
    cases: dict[str, list[Any]] = {
        "/v1/recommend": [
            {},
            None,
            {"user_id": None},
            {"user_id": None, "history": None},
            {"user_id": "u"},
            {"user_id": 0},  # a number id: documented, accepted as "0"
            {"user_id": 2**53},  # past what a JSON double holds exactly
            {"user_id": "u", "history": None},
            {"user_id": None, "history": [known]},
            {"user_id": "u", "k": MAX_K},
            {"user_id": "u", "k": MAX_K + 1},
            {"user_id": "u", "k": 3.0},  # JSON (and JSON Schema): 3.0 is the integer 3
            {"user_id": 7.5},
            {"user_id": "bad\u0001id"},
            {"history": [known] * max_len},
            {"history": [known] * (max_len + 1)},
        ],
        "/v1/events": [
            None,
            {},
            [],
            {"user_id": 7, "item_id": known},
            [{"user_id": "u", "item_id": known}] * MAX_BATCH,
            [{"user_id": "u", "item_id": known}] * (MAX_BATCH + 1),
            {"user_id": "u", "item_id": known, "event_id": "x" * 129},
        ],
        "/v1/items": [
            None,
            {"item_id": "contract-1", "title": "Star Voyage"},
            {"item_id": "contract-2", "content_vector": [1.0, 0.5]},  # wrong size
            {"item_id": "contract-3", "content_vector": [0.5] * dim},
            # float32 overflow: this made a NaN vector and a garbage SID before
            {"item_id": "contract-4", "content_vector": [1e300] + [0.5] * (dim - 1)},
            # Booleans and numeric strings are not numbers (schemathesis, another seed).
            {"item_id": "contract-5", "content_vector": [True] + [0.5] * (dim - 1)},
            {"item_id": "contract-6", "content_vector": ["0.5"] + [0.5] * (dim - 1)},
            {"item_id": "contract-7", "content_vector": [1] + [0.5] * (dim - 1)},
        ],
    }
    for path, bodies in cases.items():
        schema = request_schema(openapi, path)
        headers = WRITE
        for body in bodies:
            r = service.http.post(
                path,
                content=json.dumps(body),
                headers={**headers, "content-type": "application/json"},
            )
            assert r.status_code < 500, r.text
            assert (r.status_code == 200) == schema_accepts(schema, body), (
                path,
                json.dumps(body)[:120],
                r.status_code,
                r.text[:300],
            )
    assert service.post("/v1/recommend", {"user_id": 0}, headers=READ).json()["user_id"] == "0"


def test_openapi_documents_404_metrics_text_and_keys(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    assert "404" in paths["/v1/items/{item_id}"]["get"]["responses"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    # Both keys are set here: reads and writes say so, health and metrics do not.
    scheme = openapi["components"]["securitySchemes"]["apiKey"]
    assert scheme["in"] == "header" and scheme["name"] == "X-API-Key"
    for path, method in (
        ("/v1/recommend", "post"),
        ("/v1/users/{user_id}/history", "get"),
        ("/v1/events", "post"),
        ("/v1/items", "post"),
        ("/v1/users/{user_id}", "delete"),
    ):
        assert paths[path][method]["security"] == [{"apiKey": []}], path
    for path in ("/healthz", "/readyz", "/metrics", "/v1/items/{item_id}"):
        assert "security" not in paths[path]["get"], path


def test_metrics_are_text_and_405_names_the_allowed_methods(service: Service) -> None:
    r = service.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for method, path, allowed in (
        ("GET", "/v1/recommend", {"POST"}),
        ("PUT", "/v1/events", {"POST"}),
        ("PUT", "/v1/items/x", {"GET", "DELETE"}),
        ("POST", "/v1/items/x/similar", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("GET", "/v1/users/x", {"DELETE"}),
    ):
        r = service.http.request(method, path, headers=WRITE)
        assert r.status_code == 405, (method, path)
        assert r.json()["error"] == "method_not_allowed"
        allow = {m.strip() for m in r.headers["allow"].split(",")}
        assert allowed <= allow and method not in allow, (path, allow)
