"""Locust scenario for a running sidrec service: the traffic mix of a live catalog.

    recommend ~76%   POST /v1/recommend for a known user (k=10)
    filtered   ~2%   the same with exclude_items (a popular item) and, where the bundle keeps
                     item fields, a filter on one field of a random catalog item
    events    ~14%   POST /v1/events: one interaction (item by training popularity, or one of
                     the items this run ingested), with an event_id as a real client sends
    ingest     ~3%   POST /v1/items: a brand-new item id whose title and text are a real
                     catalog item's (so its content lands where that item's does)
    similar    ~2%   GET /v1/items/{id}/similar (k=10) of a popular item
    history    ~2%   GET /v1/users/{id}/history
    retire     ~1%   DELETE /v1/items/{id} of an item this run ingested (never a bundle item)
    erase      ~1%   DELETE /v1/users/{id}: a throwaway user given one event, then forgotten
                     (the pool users keep their histories)

Items come from the bundle's items.jsonl (--bundle). The bundle holds no users, so a pool of
--user-pool users named "lt-user-<i>" gets a history of 5..50 popularity-drawn items before the
test starts; recommendations then run the whole model path, not the no-history fallback.

Run it through `python -m loadtests.run_loadtest` (starts the service, checks the results), or
by hand against a service on this machine:
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 20 -r 20 -t 30s \
        --bundle runs/ml-100k/bundle
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from locust import FastHttpUser, between, events, task
from locust.env import Environment

log = logging.getLogger("sidrec.loadtest")

SEED_BATCH = 500  # events per seeding request (the service takes up to SIDREC_MAX_BATCH)
MAX_INGESTED = 1000  # newly ingested item ids kept as event targets
USER_PREFIX = "lt-user-"
ITEM_PREFIX = "lt-item-"
GONE_PREFIX = "lt-gone-"  # users created only to be erased


@dataclass
class BundleItem:
    item_id: str
    title: str
    text: str
    popularity: int
    fields: dict[str, str]


class Catalog:
    """The bundle's items, drawn by training popularity (+1, so never-seen items still appear)."""

    def __init__(self, bundle: Path) -> None:
        self.items: list[BundleItem] = []
        with (bundle / "items.jsonl").open(encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                self.items.append(
                    BundleItem(
                        r["item_id"], r["title"], r["text"], r["popularity"], r.get("fields", {})
                    )
                )
        if not self.items:
            raise ValueError(f"{bundle / 'items.jsonl'} has no items")
        self.weights = [item.popularity + 1 for item in self.items]
        # Items ingested during this run (this process's users), to send events about; those
        # retired since are refused by /v1/events (422), which is then not a failure.
        self.ingested: list[str] = []
        self.retired: set[str] = set()

    def popular_items(self, n: int, rng: random.Random) -> list[BundleItem]:
        return rng.choices(self.items, weights=self.weights, k=n)

    def event_item(self, rng: random.Random) -> str:
        if self.ingested and rng.random() < 0.1:
            return rng.choice(self.ingested)
        return self.popular_items(1, rng)[0].item_id


catalog: Catalog | None = None


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--bundle", default="", env_var="SIDREC_BUNDLE", help="sidrec bundle folder"
    )
    parser.add_argument("--api-key", default="", env_var="SIDREC_API_KEY", help="X-API-Key to send")
    parser.add_argument("--user-pool", type=int, default=500, help="users with a seeded history")
    parser.add_argument("--think-ms", type=float, default=50.0, help="mean pause between tasks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the seeded histories")


@events.init.add_listener
def _load_bundle(environment: Environment, **_: Any) -> None:
    global catalog
    options = environment.parsed_options
    if options is None:  # Locust run as a library without options: nothing to set up
        return
    if not options.bundle:
        raise SystemExit("loadtests/locustfile.py needs --bundle (or SIDREC_BUNDLE)")
    catalog = Catalog(Path(options.bundle))
    SidrecUser.pool = options.user_pool
    SidrecUser.api_key = options.api_key
    pause = options.think_ms / 1000.0
    SidrecUser.wait_time = between(0.5 * pause, 1.5 * pause)


@events.test_start.add_listener
def _seed_histories(environment: Environment, **_: Any) -> None:
    """Give every pool user a history before traffic starts (not counted in the stats)."""
    options = environment.parsed_options
    assert catalog is not None and options is not None
    rng = random.Random(options.seed)
    now = int(time.time())
    batch: list[dict[str, Any]] = []
    headers = {"X-API-Key": options.api_key} if options.api_key else {}
    started = time.perf_counter()
    sent = 0
    with requests.Session() as http:
        for i in range(options.user_pool):
            length = rng.randint(5, 50)
            for j, item in enumerate(catalog.popular_items(length, rng)):
                # One event an hour, ending now; a fixed event_id makes a re-run a no-op retry.
                event_id = f"lt-seed-{options.seed}-{i}-{j}"
                ts = now - (length - j) * 3600
                user = f"{USER_PREFIX}{i}"
                batch.append(
                    {"user_id": user, "item_id": item.item_id, "ts": ts, "event_id": event_id}
                )
            if len(batch) >= SEED_BATCH or i == options.user_pool - 1:
                r = http.post(
                    f"{environment.host}/v1/events", json=batch, headers=headers, timeout=60
                )
                if r.status_code != 200:
                    log.error("seeding histories failed: %s %s", r.status_code, r.text[:500])
                    environment.process_exit_code = 2
                    if environment.runner is not None:
                        environment.runner.quit()
                    return
                sent += len(batch)
                batch = []
    took = time.perf_counter() - started
    log.info("seeded %d events for %d users in %.1f s", sent, options.user_pool, took)


class SidrecUser(FastHttpUser):
    pool = 500
    api_key = ""
    wait_time = between(0.025, 0.075)

    def on_start(self) -> None:
        self.rng = random.Random()
        # the write key also grants reads (recommend, history: personal data, docs/service.md)
        self.key_headers = {"X-API-Key": self.api_key} if self.api_key else {}

    def some_user(self) -> str:
        return f"{USER_PREFIX}{self.rng.randrange(self.pool)}"

    @task(76)
    def recommend(self) -> None:
        body = {"user_id": self.some_user(), "k": 10}
        with self.client.post(
            "/v1/recommend", json=body, headers=self.key_headers, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif not r.json()["items"]:
                r.failure("no items recommended")

    @task(2)
    def recommend_filtered(self) -> None:
        assert catalog is not None
        body: dict[str, Any] = {
            "user_id": self.some_user(),
            "k": 10,
            "exclude_items": [catalog.popular_items(1, self.rng)[0].item_id],
        }
        source = self.rng.choice(catalog.items)
        if source.fields:
            name = self.rng.choice(sorted(source.fields))
            body["filter"] = {name: [source.fields[name]]}
        with self.client.post(
            "/v1/recommend",
            json=body,
            headers=self.key_headers,
            name="/v1/recommend (filtered)",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif body["exclude_items"][0] in {i["item_id"] for i in r.json()["items"]}:
                r.failure("an excluded item was recommended")

    @task(2)
    def similar(self) -> None:
        assert catalog is not None
        item_id = catalog.popular_items(1, self.rng)[0].item_id
        with self.client.get(
            f"/v1/items/{item_id}/similar?k=10",
            name="/v1/items/[item_id]/similar",
            headers=self.key_headers,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif item_id in {i["item_id"] for i in r.json()["items"]}:
                r.failure("an item is listed as similar to itself")

    @task(1)
    def retire(self) -> None:
        assert catalog is not None
        if len(catalog.ingested) < 10:
            return
        item_id = catalog.ingested.pop(self.rng.randrange(len(catalog.ingested)))
        catalog.retired.add(item_id)
        with self.client.delete(
            f"/v1/items/{item_id}",
            name="/v1/items/[item_id]",
            headers=self.key_headers,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(14)
    def event(self) -> None:
        assert catalog is not None
        body = {
            "user_id": self.some_user(),
            "item_id": catalog.event_item(self.rng),
            "event_id": uuid.uuid4().hex,
        }
        with self.client.post(
            "/v1/events", json=body, headers=self.key_headers, catch_response=True
        ) as r:
            if r.status_code == 422 and body["item_id"] in catalog.retired:
                r.success()  # retired by another simulated client meanwhile: refused, rightly
            elif r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif r.json()["accepted"] != 1:
                r.failure(f"event not accepted: {r.text[:200]}")

    @task(3)
    def ingest(self) -> None:
        assert catalog is not None
        source = self.rng.choice(catalog.items)
        item_id = f"{ITEM_PREFIX}{uuid.uuid4().hex[:12]}"
        body = {"item_id": item_id, "title": source.title, "text": source.text}
        with self.client.post(
            "/v1/items", json=body, headers=self.key_headers, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            if r.json()["items"][0]["item_id"] != item_id:
                r.failure(f"wrong item acknowledged: {r.text[:200]}")
                return
        if len(catalog.ingested) < MAX_INGESTED:
            catalog.ingested.append(item_id)

    @task(2)
    def history(self) -> None:
        user = self.some_user()
        with self.client.get(
            f"/v1/users/{user}/history",
            name="/v1/users/[user_id]/history",
            headers=self.key_headers,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif r.json()["user_id"] != user:
                r.failure(f"history of the wrong user: {r.text[:200]}")

    @task(1)
    def erase(self) -> None:
        assert catalog is not None
        user = f"{GONE_PREFIX}{uuid.uuid4().hex[:12]}"
        body = {"user_id": user, "item_id": catalog.event_item(self.rng), "event_id": "gone"}
        with self.client.post(
            "/v1/events", json=body, headers=self.key_headers, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
        with self.client.delete(
            f"/v1/users/{user}",
            name="/v1/users/[user_id]",
            headers=self.key_headers,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif (r.json()["history_events"], r.json()["event_ids"]) != (1, 1):
                r.failure(f"not everything erased: {r.text[:200]}")
