"""Hot model reload (POST /v1/admin/reload): every worker of a 2-worker service on a real Redis
takes a new bundle while recommend requests keep coming, with no error; ingested items are
derived again under the new version and retired ones stay retired; a bundle that fails its
sha256 check is refused while the old one serves on; a worker started later follows the
published bundle.

The "new bundle" is the session's bundle copied with another manifest version, re-hashed the
way `sidrec export` hashes it: a new version to the service, no training needed."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import THEMES, RedisServer, Service

from sidrec.bundle import MANIFEST, load_bundle, write_manifest

KEY = "reload-write-key"
HEADERS = {"X-API-Key": KEY}
SCIFI = "Sci-Fi|Adventure"


def bundle_copy(source: Path, dest: Path, version_suffix: str) -> Path:
    """The bundle at `source` as a new version: files hard-linked (copied across file
    systems), manifest.json written again with the new version and every file's sha256."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)
    manifest = json.loads((dest / MANIFEST).read_text())
    (dest / MANIFEST).unlink()  # a hard link: never written through
    manifest["version"] = f"{manifest['version']}{version_suffix}"
    manifest.pop("files", None)
    write_manifest(dest, manifest)
    return dest


def tamper(bundle: Path) -> None:
    """Change items.jsonl after the manifest was written (a new file, not through a link)."""
    target = bundle / "items.jsonl"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data + b"\n")


def versions_by_worker(service: Service, want: int, timeout: float = 20) -> dict[int, str]:
    """/readyz's model_version per answering worker pid, until `want` workers answered."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only workers {seen} answered"
        body = httpx.get(f"{service.url}/readyz", timeout=5).json()  # a new connection each
        seen[body["pid"]] = body["model_version"]
    return seen


def wait_all_on(service: Service, version: str, workers: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = versions_by_worker(service, workers)
        if set(seen.values()) == {version}:
            return
        assert time.monotonic() < deadline, f"workers still on {seen}"
        time.sleep(0.2)


@pytest.fixture
def redis_reload(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_reload_under_load_every_worker_swaps_with_no_error(
    bundle_dir: Path, tmp_path: Path, redis_reload: RedisServer, start_service: Any
) -> None:
    v1 = load_bundle(bundle_dir).version
    v2_dir = bundle_copy(bundle_dir, tmp_path / "bundle-v2", "-v2")
    v2 = load_bundle(v2_dir).version
    service = start_service(redis_url=redis_reload.url, workers=2, api_key=KEY)
    assert set(versions_by_worker(service, 2).values()) == {v1}

    # An ingested item (content vector kept in Redis), one retired ingested item, one retired
    # bundle item, and a user whose history names bundle items and the ingested one.
    new_item = {"item_id": "reload-new", "title": "Nebula Odyssey 9 (2035)",
                "fields": {"genres": SCIFI, "plot": THEMES[SCIFI][2]}}  # fmt: skip
    gone = {**new_item, "item_id": "reload-gone", "title": "Comet Voyage 4 (2036)"}
    for item in (new_item, gone):
        r = service.post("/v1/items", item, headers=HEADERS)
        assert r.status_code == 200, r.text
    sid_v1 = service.get("/v1/items/reload-new").json()["sid"]
    bundle_ids = [i.item_id for i in load_bundle(bundle_dir).items()]
    retired_bundle_item = bundle_ids[-1]
    for item_id in ("reload-gone", retired_bundle_item):
        assert service.http.delete(f"/v1/items/{item_id}", headers=HEADERS).status_code == 200
    events = [{"user_id": "reloader", "item_id": i, "ts": 1_300_000_000 + n}
              for n, i in enumerate([*bundle_ids[:8], "reload-new"])]  # fmt: skip
    assert service.post("/v1/events", events, headers=HEADERS).status_code == 200

    # Load: recommend requests (personal, anonymous with a history, popular fallback) from
    # four threads, before, during and after the reload.
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    versions: Counter[str] = Counter()
    stop = threading.Event()
    bodies = [
        {"user_id": "reloader", "k": 20},
        {"history": bundle_ids[10:15], "k": 10},
        {"user_id": "nobody-yet", "k": 5},
    ]

    def hammer(n: int) -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            i = n
            while not stop.is_set():
                try:
                    r = client.post("/v1/recommend", json=bodies[i % len(bodies)])
                except httpx.HTTPError as e:
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    versions[r.json()["model_version"]] += 1
                    ids = {x["item_id"] for x in r.json()["items"]}
                    if ids & {"reload-gone", retired_bundle_item}:
                        failures.append(f"a retired item was recommended: {ids}")
                i += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        r = service.post("/v1/admin/reload", {"bundle": str(v2_dir)}, headers=HEADERS)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "reloaded"
        assert (body["model_version"], body["previous_version"]) == (v2, v1)
        assert body["bundle"] == str(v2_dir.resolve())
        wait_all_on(service, v2, workers=2)  # the other worker followed through Redis
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert statuses[200] > 20 and set(statuses) == {200}, statuses
    assert versions[v1] > 0 and versions[v2] > 0, versions

    # Ingested items under v2: derived again (kept in Redis under v2's key), same codebooks
    # here so the same codes; retired ones stay retired on every worker.
    derived = redis_reload.client().hkeys(f"sidrec:{{catalog}}:derived:{v2}")
    assert b"reload-new" in derived
    for _ in range(6):  # both workers, whichever answers
        got = service.get("/v1/items/reload-new")
        assert got.status_code == 200 and got.json()["sid"][:-1] == sid_v1[:-1]
        for item_id in ("reload-gone", retired_bundle_item):
            assert service.get(f"/v1/items/{item_id}").status_code == 404
    metrics = service.get("/metrics").text
    assert re.search(rf'^sidrec_model_info\{{[^}}]*version="{re.escape(v2)}"[^}}]*\}} 1\.0$',
                     metrics, re.M), metrics  # fmt: skip
    assert not re.search(rf'version="{re.escape(v1)}"[^}}]*\}} 1\.0$', metrics, re.M)

    # The same bundle again: nothing to do.
    again = service.post("/v1/admin/reload", {"bundle": str(v2_dir)}, headers=HEADERS)
    assert again.status_code == 200 and again.json()["status"] == "unchanged", again.text

    # A worker started later with the same SIDREC_BUNDLE follows the published bundle before
    # it says ready.
    late = start_service(redis_url=redis_reload.url, api_key=KEY)
    assert late.get("/readyz").json()["model_version"] == v2
    assert late.get("/v1/items/reload-new").status_code == 200


def test_bad_bundle_is_refused_and_the_old_one_serves_on(
    bundle_dir: Path, tmp_path: Path, redis_reload: RedisServer, start_service: Any
) -> None:
    v1 = load_bundle(bundle_dir).version
    bad = bundle_copy(bundle_dir, tmp_path / "bundle-bad", "-bad")
    tamper(bad)
    service = start_service(redis_url=redis_reload.url, api_key=KEY)

    r = service.post("/v1/admin/reload", {"bundle": str(bad)}, headers=HEADERS)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_bundle"
    assert body["errors"][0]["field"] == "bundle"
    assert "items.jsonl" in body["detail"] and "sha256" in body["detail"], body
    assert service.get("/readyz").json()["model_version"] == v1
    assert service.post("/v1/recommend", {"user_id": "u", "k": 3}).status_code == 200
    assert redis_reload.client().get("sidrec:{catalog}:model") is None  # never published
    refused = r'^sidrec_model_reloads_total\{outcome="refused"\} 1\.0$'
    assert re.search(refused, service.get("/metrics").text, re.M)

    # Other client mistakes: 4xx naming the field, never a 5xx.
    missing = service.post("/v1/admin/reload", {"bundle": str(tmp_path / "nope")}, headers=HEADERS)
    assert missing.status_code == 422 and "manifest.json" in missing.json()["detail"]
    for wrong in ({"bundle": 5}, {"bundle": ""}, {"bundel": "x"}, [], {"bundle": "a\x00b"}):
        r = service.post("/v1/admin/reload", wrong, headers=HEADERS)
        assert r.status_code == 422, (wrong, r.text)
    r = service.post("/v1/admin/reload", {"bundle": "\u0000" * 3}, headers=HEADERS)
    assert r.status_code == 422
    assert service.post("/v1/admin/reload", {}).status_code == 401
    # No bundle named: SIDREC_BUNDLE, which it already serves.
    same = service.post("/v1/admin/reload", {}, headers=HEADERS)
    assert same.status_code == 200 and same.json()["status"] == "unchanged", same.text


def test_reload_without_redis_swaps_the_one_worker(
    bundle_dir: Path, tmp_path: Path, start_service: Any
) -> None:
    v2_dir = bundle_copy(bundle_dir, tmp_path / "bundle-v2", "-solo")
    service = start_service()
    r = service.post("/v1/items", {"item_id": "solo-new", "title": "Star Command 3 (2031)"})
    assert r.status_code == 200, r.text
    r = service.post("/v1/admin/reload", {"bundle": str(v2_dir)})
    assert r.status_code == 200, r.text
    ready = service.get("/readyz").json()
    assert ready["model_version"].endswith("-solo") and ready["status"] == "ready"
    assert service.get("/v1/items/solo-new").status_code == 200


def test_startup_heap_is_frozen_and_a_replaced_model_is_collected(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up moves the bundle's objects out of the collector's sight (a full collection
    walked them all, a pause for every request in flight); after a reload and its drain the
    old model's objects are released, frozen or not (the lifespan's own reference to the first
    model kept it alive for the app's life before)."""
    from sidrec.service import reload as reload_module
    from sidrec.service.app import create_app
    from sidrec.service.settings import Settings

    monkeypatch.setattr(reload_module, "DRAIN_S", 0.0)
    v2_dir = bundle_copy(bundle_dir, tmp_path / "bundle-v2", "-gc")
    app = create_app(Settings(bundle=bundle_dir, device="cpu", ort_threads=1))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 1000
            old = weakref.ref(app.state.services)
            table = weakref.ref(app.state.services.catalog.table)
            await app.state.reloader.reload(v2_dir)
            assert app.state.services.bundle.version.endswith("-gc")
            for _ in range(100):  # the drain task: stop the old ranker, then refreeze
                if old() is None and table() is None:
                    break
                await asyncio.sleep(0.05)
            assert old() is None and table() is None
            assert gc.get_freeze_count() > 1000

    asyncio.run(run())
