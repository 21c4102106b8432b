"""Cold start and the shared catalog: items ingested by text are recommended at once, by every
service process on the same Redis, survive restarts and bundle changes; Redis outages give
503 and heal without a restart."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import THEMES, RedisServer, Service

from sidrec.bundle import ItemRecord, load_bundle
from sidrec.sid_codebook import Codebooks, CodePaths

SCIFI = "Sci-Fi|Adventure"
# A film that is not in the bundle, written the way the catalog's sci-fi films are.
NEW_ITEM = {
    "item_id": "new-scifi-1",
    "title": "Nebula Odyssey 7 (2031)",
    "fields": {"genres": SCIFI, "plot": THEMES[SCIFI][2]},
}
# The session's bundle is hybrid-tower (conftest.BUNDLE_VARIANT): a new film's vector comes from
# its content tower, scored at the bundle's new-item scale, so on this small test model it
# lands inside its theme's block rather than surely at its top; K leaves room for the float
# rounding of other platforms, which moves k-means and training.
K = 40


def neighbours(bundle_dir: Path, sid: list[int], count: int = 10) -> list[str]:
    """Trained bundle items that share the longest SID prefix (SIDs are content codes)."""
    items = [json.loads(line) for line in (bundle_dir / "items.jsonl").read_text().splitlines()]
    for prefix in range(len(sid) - 1, 0, -1):
        found = [
            i["item_id"] for i in items if i["sid"][:prefix] == sid[:prefix] and i["popularity"]
        ]
        if len(found) >= 3:
            return found[:count]
    raise AssertionError(f"no bundle item shares a SID prefix with {sid}")


def theme_items(bundle_dir: Path, genres: str, count: int = 10) -> list[str]:
    label = genres.replace("|", ", ")
    items = [json.loads(line) for line in (bundle_dir / "items.jsonl").read_text().splitlines()]
    return [i["item_id"] for i in items if f"Genres: {label}." in i["text"]][:count]


def ranked(service: Service, user_id: str, k: int) -> list[str]:
    r = service.post("/v1/recommend", {"user_id": user_id, "k": k})
    assert r.status_code == 200, r.text
    return [i["item_id"] for i in r.json()["items"]]


def add_history(service: Service, user_id: str, item_ids: list[str]) -> None:
    events = [
        {"user_id": user_id, "item_id": i, "ts": 1_300_000_000 + 600 * n}
        for n, i in enumerate(item_ids)
    ]
    assert service.post("/v1/events", events).status_code == 200


@pytest.fixture(scope="module")
def redis_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-pair"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path, redis_pair: RedisServer
) -> Iterator[tuple[Service, Service]]:
    """Two service processes sharing one Redis."""
    folder = tmp_path_factory.mktemp("pair")
    a = Service(bundle_dir, folder / "a.log", redis_url=redis_pair.url)
    b = Service(bundle_dir, folder / "b.log", redis_url=redis_pair.url)
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def test_cold_item_is_recommended_in_the_very_next_request(
    pair: tuple[Service, Service], bundle_dir: Path
) -> None:
    a, _ = pair
    r = a.post("/v1/items", NEW_ITEM)
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["status"] == "created"
    bundle_ids = {i.item_id for i in load_bundle(bundle_dir).items()}
    assert item["item_id"] not in bundle_ids

    fan = neighbours(bundle_dir, item["sid"])
    add_history(a, "scifi-fan", fan)
    top = ranked(a, "scifi-fan", K)  # the very next request, no wait
    assert NEW_ITEM["item_id"] in top, (item["sid"], fan, top)
    # It is there because of its content: of fans of each theme, the sci-fi fan gets it highest.
    rank_for_fan = {}
    for theme in THEMES:
        add_history(a, f"fan-{theme}", theme_items(bundle_dir, theme))
        rank_for_fan[theme] = ranked(a, f"fan-{theme}", 1000).index(NEW_ITEM["item_id"])
    assert min(rank_for_fan, key=rank_for_fan.__getitem__) == SCIFI, rank_for_fan


def test_item_ingested_through_one_process_is_recommended_by_the_other(
    pair: tuple[Service, Service], bundle_dir: Path
) -> None:
    a, b = pair
    item = {**NEW_ITEM, "item_id": "new-scifi-2", "title": "Comet Frontier 8 (2032)"}
    r = a.post("/v1/items", item)
    assert r.status_code == 200, r.text
    sid = r.json()["items"][0]["sid"]
    # B learns of it from the catalog stream (or from Redis on first mention): within moments.
    deadline = time.monotonic() + 5
    while b.get(f"/v1/items/{item['item_id']}").status_code != 200:
        assert time.monotonic() < deadline, "item never reached the second process"
        time.sleep(0.05)
    assert b.get(f"/v1/items/{item['item_id']}").json()["sid"] == sid
    add_history(b, "scifi-fan-b", neighbours(bundle_dir, sid))
    assert item["item_id"] in ranked(b, "scifi-fan-b", K)
    # Events naming it are accepted by B too (it checks Redis for items it has not seen yet).
    assert b.post("/v1/events", {"user_id": "x", "item_id": item["item_id"]}).status_code == 200


def test_two_processes_never_hand_out_the_same_sid(pair: tuple[Service, Service]) -> None:
    a, b = pair
    vector = [0.0] * 384
    vector[7] = 1.0  # one content vector -> one code tuple for all of them
    sids = []
    for n in range(6):
        service = a if n % 2 else b
        r = service.post("/v1/items", {"item_id": f"twin-{n}", "content_vector": vector})
        assert r.status_code == 200, r.text
        sids.append(tuple(r.json()["items"][0]["sid"]))
    assert len({s[:-1] for s in sids}) == 1
    assert len(set(sids)) == 6


@pytest.fixture(scope="module")
def sum_pair(
    tmp_path_factory: pytest.TempPathFactory, sum_run: tuple[Path, Path]
) -> Iterator[tuple[Service, Service]]:
    """Two service processes on one Redis of their own, serving the hybrid-sum bundle."""
    folder = tmp_path_factory.mktemp("sum-pair")
    redis = RedisServer(folder / "redis")
    redis.start()
    a = Service(sum_run[0], folder / "a.log", redis_url=redis.url)
    b = Service(sum_run[0], folder / "b.log", redis_url=redis.url)
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()
    redis.stop()


@pytest.mark.parametrize("bundle", ["content-tower", "hybrid-sum"])
def test_items_sharing_a_sid_keep_distinct_vectors_and_their_order(
    bundle: str, request: pytest.FixtureRequest
) -> None:
    a, b = request.getfixturevalue("pair" if bundle == "content-tower" else "sum_pair")
    # Five texts whose content vectors differ a little: one code tuple for all of them (the
    # dedup digit tells them apart), and the content tower or the hybrid's content part
    # gives each its own vector.
    ids = [f"near-twin-{n}" for n in range(5)]
    for n, item_id in enumerate(ids):
        vector = [0.0] * 384
        vector[11] = 1.0
        vector[200 + n] = 0.02
        r = a.post("/v1/items", {"item_id": item_id, "content_vector": vector})
        assert r.status_code == 200, r.text
    sids = [tuple(a.get(f"/v1/items/{i}").json()["sid"]) for i in ids]
    assert len({s[:-1] for s in sids}) == 1 and len(set(sids)) == 5

    def scores(service: Service) -> dict[str, float]:
        r = service.post("/v1/recommend", {"user_id": "twin-watcher", "k": 1000,
                                           "history": ids[:1]})  # fmt: skip
        assert r.status_code == 200, r.text
        return {i["item_id"]: i["score"] for i in r.json()["items"] if i["item_id"] in ids}

    before = scores(a)
    assert len(before) == 4  # the one in the history is excluded
    assert len({round(v, 6) for v in before.values()}) == 4, before  # no two share a vector
    b.stop()
    b.start()
    after = scores(b)
    assert sorted(after, key=after.__getitem__) == sorted(before, key=before.__getitem__)
    for item_id, score in before.items():
        assert after[item_id] == pytest.approx(score, abs=1e-5)


def test_new_items_read_the_paths_the_bundles_untrained_items_read(
    sum_pair: tuple[Service, Service], sum_run: tuple[Path, Path]
) -> None:
    """An item without a trained id reads the SID rows of its own path or of the nearest path
    trained items have, as validation chose for the bundle (docs/bundle.md,
    model.new_item_codes); the service must compute the same paths for an ingested item. A
    copy of an untrained catalog item whose two paths differ, ingested under a new id,
    scores exactly as the bundle's row, and its SID is its own free assignment."""
    a, _ = sum_pair
    bundle_dir, checkpoint = sum_run
    bundle = load_bundle(bundle_dir)
    assert bundle.model["new_item_codes"] in ("own", "nearest-trained-path")
    codebooks = Codebooks.load(bundle_dir / "sid_codebooks.npz")
    layers = codebooks.layers
    records = bundle.items()
    content = np.load(checkpoint.parent.parent / "content_vectors.npy")  # row r at r - 1
    paths = CodePaths(np.array([r.sid[:layers] for r in records if r.popularity > 0]))
    untrained = [r for r in records if r.popularity == 0]
    vectors = content[[r.row - 1 for r in untrained]]
    nearest = codebooks.assign(vectors, within=paths)
    moved = [
        (r, v)
        for r, v, near in zip(untrained, vectors, nearest, strict=True)
        if list(near) != list(r.sid[:layers])
    ][:6]
    assert moved, "no untrained item's two paths differ: the test could not tell them apart"
    for r, vector in moved:
        copy = {"item_id": f"copy-{r.item_id}", "content_vector": vector.tolist()}
        answer = a.post("/v1/items", {**copy, "fields": r.fields})  # the genres it may read
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"][0]["sid"][:layers] == list(r.sid[:layers])  # its own SID
    history = [r.item_id for r in records if r.popularity > 0][:5]
    answer = a.post("/v1/recommend", {"user_id": "path-watcher", "k": 1000, "history": history})
    assert answer.status_code == 200, answer.text
    scores = {i["item_id"]: i["score"] for i in answer.json()["items"]}
    for r, _ in moved:
        assert scores[f"copy-{r.item_id}"] == pytest.approx(scores[r.item_id], abs=1e-4)


def _ingested_copies_scores(
    bundle_dir: Path,
    checkpoint: Path,
    log: Path,
    copies_of: Callable[[ItemRecord], dict[str, dict[str, str]]],
) -> tuple[list[ItemRecord], dict[str, float]]:
    """Start a service on bundle_dir, ingest for each of six untrained bundle items the copies
    copies_of(record) names ({item id: fields}), each with the item's own content vector,
    and return those items and a warm history's scores over the top 1,000."""
    records = load_bundle(bundle_dir).items()
    content = np.load(checkpoint.parent.parent / "content_vectors.npy")  # row r at r - 1
    untrained = [r for r in records if r.popularity == 0][:6]
    assert untrained
    service = Service(bundle_dir, log)
    service.start()
    try:
        for r in untrained:
            vector = content[r.row - 1].tolist()
            for item_id, fields in copies_of(r).items():
                answer = service.post(
                    "/v1/items", {"item_id": item_id, "content_vector": vector, "fields": fields}
                )
                assert answer.status_code == 200, answer.text
        history = [r.item_id for r in records if r.popularity > 0][:5]
        answer = service.post("/v1/recommend", {"user_id": "copies", "k": 1000, "history": history})
        assert answer.status_code == 200, answer.text
        return untrained, {i["item_id"]: i["score"] for i in answer.json()["items"]}
    finally:
        service.stop()


def test_an_ingested_item_reads_its_content_neighbours_in_the_bundles_graph(
    tmp_path: Path, neighbours_run: tuple[Path, Path]
) -> None:
    """A bundle whose content part is the content neighbours' (docs/bundle.md,
    model.new_item_content_part): the exported graph holds the trained items' content
    vectors and id rows, so a copy of an untrained catalog item ingested under a new id scores
    as the bundle's own row, which the offline table computed. The copy carries the item's
    fields, which a content term calibration kept may read (its genres)."""
    bundle = load_bundle(neighbours_run[0])
    assert bundle.model["new_items"] == "sid+content"
    assert bundle.model["new_item_content_part"] == "neighbours"
    assert bundle.item_features is None
    untrained, scores = _ingested_copies_scores(
        *neighbours_run, tmp_path / "service.log", lambda r: {f"copy-{r.item_id}": r.fields}
    )
    for r in untrained:
        assert scores[f"copy-{r.item_id}"] == pytest.approx(scores[r.item_id], abs=1e-4)


def test_an_ingested_item_reads_its_genres_beside_its_content_vector(
    tmp_path: Path, features_run: tuple[Path, Path]
) -> None:
    """A bundle whose content part was fitted on the content vector and the items' genres
    and years (docs/bundle.md, model.new_item_content_features): the service extends an
    ingested item's content vector with the genres and year its fields give, as the offline
    table did. A copy of an untrained catalog item ingested with its fields scores as the
    bundle's own row; the same vector under another theme's genres gets another vector."""
    bundle = load_bundle(features_run[0])
    features = bundle.item_features
    themes = [theme.replace("|", ", ") for theme in THEMES]  # as the generic layout reads them
    assert features is not None
    assert set(features.genres) == {g.lower() for theme in THEMES for g in theme.split("|")}
    assert bundle.new_item_content_dim == bundle.manifest["content"]["dim"] + features.dim

    def copies_of(r: ItemRecord) -> dict[str, dict[str, str]]:
        assert r.fields["genres"] in themes
        other = next(g for g in themes if g != r.fields["genres"])
        return {f"copy-{r.item_id}": r.fields, f"recast-{r.item_id}": {"genres": other}}

    untrained, scores = _ingested_copies_scores(*features_run, tmp_path / "service.log", copies_of)
    for r in untrained:
        assert scores[f"copy-{r.item_id}"] == pytest.approx(scores[r.item_id], abs=1e-4)
        assert abs(scores[f"recast-{r.item_id}"] - scores[r.item_id]) > 1e-3


def test_restart_keeps_every_ingested_item(pair: tuple[Service, Service]) -> None:
    a, b = pair
    before = {
        item_id: a.get(f"/v1/items/{item_id}").json()["sid"]
        for item_id in ("new-scifi-1", "new-scifi-2", "twin-0", "twin-5")
    }
    b.stop()
    b.start()
    ready = b.get("/readyz").json()
    assert ready["status"] == "ready"
    for item_id, sid in before.items():
        r = b.get(f"/v1/items/{item_id}")
        assert r.status_code == 200 and r.json()["sid"] == sid
    assert "new-scifi-1" in ranked(b, "scifi-fan", K)


def test_new_bundle_version_rederives_ingested_items(
    pair: tuple[Service, Service], bundle_dir: Path, tmp_path: Path, start_service: Any
) -> None:
    """A retrained bundle has its own SIDs and vectors: ingested items are derived again from
    the content vectors kept in Redis, under the new version's keys."""
    a, _ = pair
    retrained = tmp_path / "bundle-v2"
    shutil.copytree(bundle_dir, retrained, symlinks=True)
    manifest = json.loads((retrained / "manifest.json").read_text())
    manifest["version"] += "-v2"
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    redis_url = a.env["SIDREC_REDIS_URL"]
    c = start_service(bundle=retrained, redis_url=redis_url)
    assert c.get("/readyz").json()["model_version"].endswith("-v2")
    got = c.get("/v1/items/new-scifi-1")
    assert got.status_code == 200
    # Same codebooks here, so the same codes; the dedup digit is handed out again under v2.
    assert got.json()["sid"][:-1] == a.get("/v1/items/new-scifi-1").json()["sid"][:-1]


def test_redis_outage_gives_503_and_heals_without_restart(
    redis_server: RedisServer, start_service: Any, bundle_dir: Path
) -> None:
    service = start_service(redis_url=redis_server.url, redis_timeout_s=0.5)
    item_id = load_bundle(bundle_dir).items()[0].item_id
    assert service.post("/v1/events", {"user_id": "o", "item_id": item_id}).status_code == 200

    redis_server.stop()
    r = service.post("/v1/events", {"user_id": "o", "item_id": item_id})
    assert r.status_code == 503, r.text
    assert "Redis" in r.json()["detail"]
    assert service.post("/v1/recommend", {"user_id": "o"}).status_code == 503
    ingest = service.post("/v1/items", {"item_id": "during-outage", "title": "Star Voyage 99"})
    assert ingest.status_code == 503
    ready = service.get("/readyz")
    assert ready.status_code == 503 and any("redis" in x for x in ready.json()["reasons"])
    assert service.get("/healthz").status_code == 200  # alive, just not ready
    # A history override needs no store: still served.
    override = service.post("/v1/recommend", {"history": [item_id], "k": 3})
    assert override.status_code == 200

    redis_server.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 15
    while service.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, service.get("/readyz").text
        time.sleep(0.2)
    assert service.post("/v1/events", {"user_id": "o", "item_id": item_id}).status_code == 200
    # Nothing was acknowledged during the outage, so nothing half-stored shows up.
    assert service.get("/v1/items/during-outage").status_code == 404
    # Writes work again and are visible at once.
    r = service.post("/v1/items", {"item_id": "after-outage", "title": "Star Voyage 100"})
    assert r.status_code == 200, r.text
    assert service.get("/v1/items/after-outage").status_code == 200


def every_ranked(service: Service, user_id: str) -> list[str]:
    return ranked(service, user_id, 1000)  # the whole catalog: SIDREC_MAX_K's default


def test_similar_items_of_an_item_ingested_a_moment_ago_on_every_worker(
    pair: tuple[Service, Service], bundle_dir: Path
) -> None:
    a, b = pair
    item = {**NEW_ITEM, "item_id": "new-scifi-similar", "title": "Orbit Command 9 (2033)"}
    assert a.post("/v1/items", item).status_code == 200
    scifi = set(theme_items(bundle_dir, SCIFI, 30))
    for service in (a, b):  # B at once: it asks Redis for an item it has not seen yet
        r = service.get(f"/v1/items/{item['item_id']}/similar", params={"k": 10})
        assert r.status_code == 200, r.text
        ids = [i["item_id"] for i in r.json()["items"]]
        assert len(ids) == 10 and item["item_id"] not in ids
        # Its content is sci-fi: its nearest items are mostly the catalog's sci-fi films.
        assert len(scifi & set(ids)) >= 6, ids


def test_retired_item_leaves_every_worker_at_once_and_stays_retired(
    pair: tuple[Service, Service], bundle_dir: Path
) -> None:
    a, b = pair
    item = {**NEW_ITEM, "item_id": "new-scifi-retired", "title": "Rocket Voyage 3 (2034)"}
    assert a.post("/v1/items", item).status_code == 200
    bundle_item = theme_items(bundle_dir, SCIFI, 3)[2]
    add_history(a, "retire-fan", [*theme_items(bundle_dir, SCIFI, 2), bundle_item])
    deadline = time.monotonic() + 5
    while b.get(f"/v1/items/{item['item_id']}").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert item["item_id"] in every_ranked(b, "retire-fan")

    r = a.http.delete(f"/v1/items/{item['item_id']}")
    assert r.status_code == 200 and r.json()["status"] == "retired", r.text
    assert b.http.delete(f"/v1/items/{bundle_item}").status_code == 200
    # The very next request, on either worker: neither item is returned or known.
    for service in (a, b):
        for gone in (item["item_id"], bundle_item):
            assert service.get(f"/v1/items/{gone}").status_code == 404
            assert service.get(f"/v1/items/{gone}/similar").status_code == 404
        top = every_ranked(service, "retire-fan")
        assert item["item_id"] not in top and bundle_item not in top
        near = service.get(f"/v1/items/{theme_items(bundle_dir, SCIFI, 1)[0]}/similar",
                           params={"k": 1000}).json()["items"]  # fmt: skip
        assert not {item["item_id"], bundle_item} & {i["item_id"] for i in near}
        # The history entry of the retired item is ignored when encoding the user.
        body = service.post("/v1/recommend", {"user_id": "retire-fan"}).json()
        assert body["history_len"] == 2
        # Events naming a retired item are refused like unknown ones; retiring again is a 404.
        event = {"user_id": "x", "item_id": bundle_item}
        assert service.post("/v1/events", event).status_code == 422
        assert service.http.delete(f"/v1/items/{bundle_item}").status_code == 404

    # A restarted worker finds both retired (the bundle item from Redis's retired set).
    b.stop()
    b.start()
    for gone in (item["item_id"], bundle_item):
        assert b.get(f"/v1/items/{gone}").status_code == 404
    assert bundle_item not in every_ranked(b, "retire-fan")

    # Ingested again, it is back: at once where it was sent, within moments elsewhere.
    back = {"item_id": bundle_item, "title": "Star Voyage returns", "fields": {"genres": SCIFI}}
    assert b.post("/v1/items", back).status_code == 200
    assert b.get(f"/v1/items/{bundle_item}").status_code == 200
    deadline = time.monotonic() + 5
    while a.get(f"/v1/items/{bundle_item}").status_code != 200:
        assert time.monotonic() < deadline, "re-ingested item never came back on the other worker"
        time.sleep(0.05)
    assert a.get(f"/v1/items/{bundle_item}/similar").status_code == 200


def test_retiring_half_the_catalog_compacts_and_answers_stay_right(
    pair: tuple[Service, Service], bundle_dir: Path
) -> None:
    """Half the bundle retired through two workers: both compact their tables (rows held
    back near the live items), answer only live items, and a restart keeps it so."""
    a, b = pair
    bundle_ids = [i.item_id for i in load_bundle(bundle_dir).items()]
    retired = bundle_ids[::2]
    for n, item_id in enumerate(retired):
        r = (a if n % 2 else b).http.delete(f"/v1/items/{item_id}")
        assert r.status_code in (200, 404), r.text  # 404: retired by an earlier test
    live_before = a.get("/readyz").json()["index_items"]
    add_history(a, "half-fan", bundle_ids[1:20:2])
    for service in (a, b):
        top = every_ranked(service, "half-fan")
        assert not set(top) & set(retired)
        fallback = service.post("/v1/recommend", {"user_id": "nobody-half", "k": 50}).json()
        assert not {i["item_id"] for i in fallback["items"]} & set(retired)
        deadline = time.monotonic() + 10
        while True:  # compaction runs in the background
            ready = service.get("/readyz").json()
            if ready["index_rows"] <= ready["index_items"] / 0.75 + 2:
                break
            assert time.monotonic() < deadline, ready
            time.sleep(0.05)
        assert ready["index_items"] == live_before
        rows = re.search(r"^sidrec_index_rows (\S+)", service.get("/metrics").text, re.M)
        assert rows is not None and float(rows.group(1)) == ready["index_rows"]
    b.stop()
    b.start()
    ready = b.get("/readyz").json()
    assert ready["index_items"] == live_before
    assert ready["index_rows"] <= live_before / 0.75 + 2
    assert not set(every_ranked(b, "half-fan")) & set(retired)


def bundle_with_offset(bundle_dir: Path, folder: Path, offset: float) -> Path:
    """The session's bundle with manifest.json's model.new_item_score_offset set (the other
    files linked, not copied: their sha256 in the manifest still holds)."""
    folder.mkdir()
    for path in bundle_dir.iterdir():
        if path.name != "manifest.json":
            (folder / path.name).symlink_to(path.resolve())
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["model"]["new_item_score_offset"] = offset
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_new_item_score_offset_lowers_new_items_by_exactly_the_offset(
    bundle_dir: Path, tmp_path: Path, start_service: Any
) -> None:
    """model.new_item_score_offset is subtracted from the score of every item without a trained
    id (ingested ones and the bundle's untrained rows), in recommendations and similar items,
    and the score returned includes it; trained items' scores do not move. Two services on
    in-process stores: the same bundle with offset 0 and with a large one."""
    bundle = load_bundle(bundle_dir)
    records = bundle.items()
    untrained = [r for r in records if r.popularity == 0]
    assert untrained, "the pipeline withholds some items from training (cold_fraction)"
    # A copy of an untrained bundle item under a new id: its vector is the new-item path's for
    # the same text, so (cosine) it is that item's nearest neighbour, first in its similar items.
    source = untrained[0]
    twin = {"item_id": "twin-of-" + source.item_id, "title": source.title, "fields": source.fields}
    new_ids = {NEW_ITEM["item_id"], twin["item_id"]} | {r.item_id for r in untrained}

    def scores(service: Service) -> tuple[list[list[int]], dict[str, float], list[Any]]:
        r = service.post("/v1/items", [NEW_ITEM, twin])
        assert r.status_code == 200, r.text
        assert [i["status"] for i in r.json()["items"]] == ["created", "created"]
        add_history(service, "offset-fan", neighbours(bundle_dir, r.json()["items"][0]["sid"]))
        rec = service.post("/v1/recommend", {"user_id": "offset-fan", "k": 1000})  # every item
        assert rec.status_code == 200, rec.text
        similar = service.get(f"/v1/items/{source.item_id}/similar", params={"k": 1000})
        assert similar.status_code == 200, similar.text
        return (
            [i["sid"] for i in r.json()["items"]],
            {i["item_id"]: i["score"] for i in rec.json()["items"]},
            similar.json()["items"],
        )

    zero = start_service(bundle=bundle_with_offset(bundle_dir, tmp_path / "offset-0", 0.0))
    sids0, rec0, similar0 = scores(zero)
    # Larger than the spread of every score here, so each new item falls behind every trained one.
    values = [*rec0.values(), *(i["score"] for i in similar0)]
    offset = float(np.ceil(2 * (max(values) - min(values)) + 1))
    big = start_service(bundle=bundle_with_offset(bundle_dir, tmp_path / "offset-big", offset))
    sids1, rec1, similar1 = scores(big)
    assert sids0 == sids1  # same bundle, same SIDs and vectors: only the offset differs

    # Recommendations: new items drop by exactly the offset, trained ones keep their score.
    assert rec0.keys() == rec1.keys() and NEW_ITEM["item_id"] in rec0
    for item_id, score in rec0.items():
        want = score - offset if item_id in new_ids else score
        assert rec1[item_id] == pytest.approx(want, abs=1e-4), item_id
    # With 0 the new film is among the top K (as in test_cold_item_is_recommended_...); with the
    # offset it falls out of the top K, behind every trained item.
    assert NEW_ITEM["item_id"] in ranked(zero, "offset-fan", K)
    top = ranked(big, "offset-fan", K)
    assert NEW_ITEM["item_id"] not in top and not new_ids & set(top)

    # Similar items query with the item's unit vector and a trailing 1: offsets apply there too.
    by_id0 = {i["item_id"]: i["score"] for i in similar0}
    by_id1 = {i["item_id"]: i["score"] for i in similar1}
    assert by_id0.keys() == by_id1.keys()
    for item_id, score in by_id0.items():
        want = score - offset if item_id in new_ids else score
        assert by_id1[item_id] == pytest.approx(want, abs=1e-4), item_id
    if bundle.model.get("scoring", "cosine") == "cosine":
        assert similar0[0]["item_id"] == twin["item_id"], similar0[:3]  # first with 0 ...
    assert not new_ids & {i["item_id"] for i in similar1[:10]}  # ... gone from the top 10
