"""The README's main job, second half: serve a bundle and show a real HTTP exchange.

Starts `sidrec serve` as a child process (in-process history store unless SIDREC_REDIS_URL is
set) with the training data's histories loaded into its store (`sidrec serve --histories DIR`
for the in-process store, `sidrec histories load` into Redis first), then: recommendations for
a user the model was trained on, an event appended, a brand-new item ingested from its text,
and that item showing up for a user whose history is about the same thing.

Only HTTP and the `sidrec` command connect it to the service: the offline side never imports
`sidrec.service` (docs/internals.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sidrec.bundle import load_bundle

console = Console()

DEMO_K = 20  # one page of recommendations
NEW_ITEM = {
    "item_id": "new-toy-story-5",
    "title": "Toy Story 5",
    "fields": {
        "year": "2026",
        "genres": "Animation, Children's, Comedy, Adventure",
        "plot": "Woody, Buzz and the toys face a new rival when a tablet arrives in the kids' "
        "room; an animated family comedy adventure about toys coming to life.",
    },
}


def _call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _wait_ready(base: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sidrec serve exited with code {process.returncode}")
        try:
            status, body = _call(base, "GET", "/readyz")
            if status == 200:
                console.print(f"service ready: {body}")
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"service at {base} not ready after {timeout:.0f}s")


def _show(title: str, answer: dict[str, Any], titles: dict[str, str], mark: str = "") -> None:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("title")
    table.add_column("score", justify="right")
    table.add_column("SID")
    for i, item in enumerate(answer["items"], 1):
        name = titles.get(item["item_id"], "")
        style = "bold green" if item["item_id"] == mark else None
        table.add_row(
            str(i), item["item_id"], name, f"{item['score']:.3f}", str(item["sid"]), style=style
        )
    console.print(table)


def _load_into_redis(histories: Path, bundle_dir: Path, env: dict[str, str]) -> None:
    """SIDREC_REDIS_URL is set: the service reads Redis, so the histories go there first, with
    the command a user runs (its progress and events/s lines show here)."""
    command = [sys.executable, "-m", "sidrec.cli", "histories", "load", "--data", str(histories)]
    command += ["--bundle", str(bundle_dir)]
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"sidrec histories load exited with code {done.returncode}")


def run_demo(
    bundle_dir: Path,
    port: int = 8000,
    keep_serving: bool = False,
    histories: Path | None = None,
    user: str = "1",
) -> bool:
    """Run the exchange; True when the ingested item was recommended to its look-alike user.

    `histories`: the data folder the bundle was trained on, loaded into the service's store
    so that `user` (one of its users) gets recommendations from their history."""
    bundle = load_bundle(bundle_dir)
    items = bundle.items()
    titles = {r.item_id: r.title for r in items}
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SIDREC_BUNDLE": str(bundle_dir), "SIDREC_PORT": str(port)}
    env.setdefault("SIDREC_HOST", "127.0.0.1")
    if histories is not None and env.get("SIDREC_REDIS_URL"):
        _load_into_redis(histories, bundle_dir, env)
    elif histories is not None:  # `sidrec serve` reads the folder into its in-process store
        env["SIDREC_HISTORIES"] = str(histories)
    process = subprocess.Popen([sys.executable, "-m", "sidrec.cli", "serve"], env=env)
    try:
        _wait_ready(base, process)
        console.rule(f"1. recommendations for user {user} (history kept by the service)")
        _, stored = _call(base, "GET", f"/v1/users/{user}/history")
        newest = [titles.get(e["item_id"], e["item_id"]) for e in stored["events"][::-1][:3]]
        if newest:
            console.print(
                f"user {user}: {len(stored['events'])} events in the store; "
                f"newest: {'; '.join(newest)}"
            )
        status, answer = _call(base, "POST", "/v1/recommend", {"user_id": user, "k": 5})
        console.print(
            f"POST /v1/recommend -> {status} (fallback={answer.get('fallback')}, "
            f"history_len={answer.get('history_len')})"
        )
        _show(f"user {user}" + ("" if newest else " before any event"), answer, titles)

        console.rule("2. an event appended")
        seen = {e["item_id"] for e in stored["events"]}
        watched = next((r for r in items if r.item_id not in seen), items[0])
        event = {"user_id": user, "item_id": watched.item_id, "event_id": "demo-1"}
        status, answer = _call(base, "POST", "/v1/events", event)
        console.print(f"POST /v1/events {event} -> {status} {answer}")
        status, answer = _call(base, "POST", "/v1/recommend", {"user_id": user, "k": 5})
        _show(f"user {user} after watching {watched.title}", answer, titles)

        console.rule("3. a brand-new item ingested from its text")
        status, answer = _call(base, "POST", "/v1/items", NEW_ITEM)
        console.print(f"POST /v1/items -> {status} {answer}")
        if status != 200:
            return False
        sid = answer["items"][0]["sid"]
        titles[NEW_ITEM["item_id"]] = NEW_ITEM["title"]

        console.rule("4. the new item for a user whose history is about the same thing")
        # Its look-alikes: catalogue items sharing the longest SID prefix with it.
        history = _same_topic(items, sid)
        for i, item_id in enumerate(history):
            _call(
                base,
                "POST",
                "/v1/events",
                {"user_id": "demo-fan", "item_id": item_id, "ts": 1_700_000_000 + i},
            )
        console.print("history of demo-fan: " + "; ".join(titles[i] for i in history))
        status, answer = _call(base, "POST", "/v1/recommend", {"user_id": "demo-fan", "k": 100})
        ranked = [it["item_id"] for it in answer["items"]]
        rank = ranked.index(NEW_ITEM["item_id"]) + 1 if NEW_ITEM["item_id"] in ranked else None
        _show(
            f"demo-fan, top {DEMO_K} (new item in green)",
            {"items": answer["items"][:DEMO_K]},
            titles,
            mark=NEW_ITEM["item_id"],
        )
        where = f"rank {rank} of {len(titles) - len(history)}" if rank else "not in the top 100"
        console.print(
            f"new item for demo-fan: [bold]{where}[/] "
            "(ingested seconds ago from its text, never seen in training)"
        )
        found = rank is not None and rank <= DEMO_K
        if keep_serving:
            console.print(f"serving on {base}; Ctrl-C to stop")
            process.wait()
        return found
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


def _same_topic(items: list, sid: list[int], size: int = 8) -> list[str]:
    def shared_prefix(other: tuple[int, ...]) -> int:
        n = 0
        for a, b in zip(other[:-1], sid[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    ranked = sorted(items, key=lambda r: (-shared_prefix(r.sid), -r.popularity))
    return [r.item_id for r in ranked[:size]]
