"""Shared fixtures: a real Redis (the redis-server binary), real uvicorn servers in
subprocesses, and a real bundle made by the project's own pipeline.

The bundle: SIDREC_TEST_BUNDLE=DIR uses an existing bundle folder; otherwise one is trained
once per session on a small synthetic catalog (six themes of items with titles, genres and
plots; users who mostly stay within one theme) by `offline.pipeline.Steps` - the same code
`sidrec pipeline` runs - and exported. That takes about a minute on two cores.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

REDIS_BIN = shutil.which("redis-server")
TEST_EPOCHS = 12

# Each theme: genres -> (title words A, title words B, plot). Titles are "A B n (year)".
THEMES: dict[str, tuple[list[str], list[str], str]] = {
    "Sci-Fi|Adventure": (
        ["Star", "Galaxy", "Orbit", "Nebula", "Comet", "Rocket"],
        ["Voyage", "Frontier", "Command", "Odyssey"],
        "A starship crew explores distant planets, fights alien fleets and travels through space.",
    ),
    "Romance|Drama": (
        ["Love", "Heart", "Summer", "Kiss", "Wedding", "Paris"],
        ["Letters", "Promise", "Affair", "Story"],
        "Two lovers meet by chance, fall in love and struggle to stay together.",
    ),
    "Horror|Thriller": (
        ["Blood", "Ghost", "Night", "Shadow", "Scream", "Grave"],
        ["House", "Curse", "Terror", "Ritual"],
        "A haunted house terrorises a family as a demon hunts them through the night.",
    ),
    "Western": (
        ["Dusty", "Outlaw", "Sheriff", "Canyon", "Colt", "Prairie"],
        ["Trail", "Showdown", "Ranch", "Saloon"],
        "A lone gunslinger rides into a frontier town to face cattle rustlers and bandits.",
    ),
    "Animation|Children's": (
        ["Bunny", "Puppy", "Dragon", "Teddy", "Kitten", "Pony"],
        ["Friends", "Party", "Magic", "Adventure"],
        "Cute talking animals go on a colourful cartoon adventure for kids and families.",
    ),
    "War|History": (
        ["Battle", "Trench", "Sniper", "Bomber", "Fortress", "Regiment"],
        ["Front", "Siege", "Command", "Brigade"],
        "Soldiers fight a brutal battle on the front line of the Second World War.",
    ),
}


def write_synthetic_dataset(
    folder: Path, users: int = 600, per_theme: int = 30, seed: int = 0
) -> None:
    """items.csv + interactions.csv in the generic format; 90% of a user's events in one theme."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, str, str, str]] = []
    by_theme: dict[str, list[str]] = {}
    for genres, (words_a, words_b, plot) in THEMES.items():
        for j in range(per_theme):
            item_id = str(len(items) + 1)
            a, b = words_a[j % len(words_a)], words_b[(j // len(words_a)) % len(words_b)]
            title = f"{a} {b} {j // (len(words_a) * len(words_b)) + 1} ({1970 + j})"
            items.append((item_id, title, genres, plot))
            by_theme.setdefault(genres, []).append(item_id)
    with (folder / "items.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "genres", "plot"])
        writer.writerows(items)
    themes = list(by_theme)
    with (folder / "interactions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for u in range(users):
            favourite = themes[u % len(themes)]
            ts = 1_000_000_000 + int(rng.integers(0, 10_000_000))
            for _ in range(int(rng.integers(15, 30))):
                theme = favourite if rng.random() < 0.9 else themes[int(rng.integers(len(themes)))]
                pool = by_theme[theme]
                writer.writerow([f"u{u}", pool[int(rng.integers(len(pool)))], ts])
                ts += int(rng.integers(60, 86_400))


# The variant the session's bundle is exported from: the pipeline's default export.
BUNDLE_VARIANT = "hybrid-tower"
# The run folder (checkpoint etc.) behind the session's bundle, when this session trained it.
_RUN: dict[str, Path] = {}


@contextlib.contextmanager
def sidrec_cache(cache: Path) -> Iterator[None]:
    """SIDREC_CACHE set to `cache` inside the block (MiniLM's export goes there), as before
    after it; for session fixtures, which cannot take monkeypatch."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIDREC_CACHE", str(cache))
        yield


def train_synthetic_bundle(
    root: Path,
    variant: str,
    cache: Path,
    recommended_settings: bool = False,
    content_precision: str | None = None,
) -> Path:
    """Train `variant` on a fresh synthetic data set under root/ (data, run, bundle) with the
    pipeline and export it; returns the bundle. cache: SIDREC_CACHE meanwhile (MiniLM's
    export). recommended_settings: the settings `sidrec pipeline` picks for this data's shape
    (short histories), else TrainConfig's defaults. content_precision: Steps.open's."""
    from sidrec.offline import pipeline  # torch: only in the test process, never the service

    write_synthetic_dataset(root / "data")
    with sidrec_cache(cache):
        steps = pipeline.Steps.open(
            root / "data", root / "run", content_precision=content_precision
        )
        if recommended_settings:
            steps.use_settings(None)
        steps.train(variant, epochs=TEST_EPOCHS, patience=TEST_EPOCHS)
        return steps.export(variant, root / "bundle")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SIDREC_TEST_BUNDLE")
    if given:
        return Path(given)
    root = tmp_path_factory.mktemp("pipeline")
    bundle = train_synthetic_bundle(root, BUNDLE_VARIANT, root / "cache")
    _RUN["run"] = root / "run"
    _RUN["cache"] = root / "cache"
    return bundle


@pytest.fixture(scope="session")
def int8_bundle_dir(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """An id-only bundle whose run encoded the catalog with the int8 content encoder (and
    whose bundle carries that graph); shares bundle_dir's cache, so MiniLM exports once."""
    root = tmp_path_factory.mktemp("pipeline-int8")
    cache = _RUN.get("cache", root / "cache")
    return train_synthetic_bundle(root, "id", cache, content_precision="int8")


@pytest.fixture(scope="session")
def sum_run(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> tuple[Path, Path]:
    """(bundle, checkpoint) of hybrid-sum with the pipeline's short-history defaults: dot
    scoring, a content part for new items, a new-item scale (what `make demo` exports)."""
    root = tmp_path_factory.mktemp("hybrid-sum")
    cache = _RUN.get("cache", root / "cache")
    bundle = train_synthetic_bundle(root, "hybrid-sum", cache, recommended_settings=True)
    return bundle, root / "run" / "hybrid-sum" / "checkpoint.pt"


def _with_content_part(
    tmp_path_factory: pytest.TempPathFactory,
    sum_run: tuple[Path, Path],
    name: str,
    item_features: bool,
) -> tuple[Path, Path]:
    """(bundle, checkpoint) of a copy of sum_run's model given the content neighbours' part
    in place of whichever content part its calibration kept, fitted on the content vectors
    or (item_features) on them extended with the items' genres and years, exported again."""
    import torch

    from sidrec.item_features import ItemFeatures
    from sidrec.offline import pipeline
    from sidrec.offline.new_items import NEW_ITEMS_FILE, attach_content_part
    from sidrec.offline.train import CHECKPOINT_FILE, load_checkpoint

    source = sum_run[1].parent.parent.parent  # root/run/hybrid-sum/checkpoint.pt -> root
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(source / "run", root / "run")
    checkpoint = root / "run" / "hybrid-sum" / CHECKPOINT_FILE
    model, _, ckpt = load_checkpoint(checkpoint)
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    content = np.load(root / "run" / "content_vectors.npy")
    steps = pipeline.Steps.open(source / "data", root / "run")
    record_path = checkpoint.parent / NEW_ITEMS_FILE
    record = json.loads(record_path.read_text())
    record["content_part"]["item_features"] = None
    if item_features:
        fields = steps.data.catalog.fields
        features = ItemFeatures.fit(fields)
        assert features is not None, "the synthetic catalog names its items' genres"
        content = features.extend(content, fields)
        record["content_part"]["item_features"] = features.record()
    record_path.write_text(json.dumps(record))
    attach_content_part(model, trained, content, "neighbours")
    ckpt["state_dict"] = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save(ckpt, checkpoint)
    with sidrec_cache(_RUN.get("cache", source / "cache")):  # MiniLM's export
        bundle = steps.export("hybrid-sum", root / "bundle")
    return bundle, checkpoint


@pytest.fixture(scope="session")
def neighbours_run(
    tmp_path_factory: pytest.TempPathFactory, sum_run: tuple[Path, Path]
) -> tuple[Path, Path]:
    """sum_run's model with the content neighbours' part, exported again."""
    return _with_content_part(tmp_path_factory, sum_run, "neighbours", item_features=False)


@pytest.fixture(scope="session")
def features_run(
    tmp_path_factory: pytest.TempPathFactory, sum_run: tuple[Path, Path]
) -> tuple[Path, Path]:
    """sum_run's model with the content neighbours' part over the content vectors extended
    with the items' genres (sidrec/item_features.py), exported again."""
    return _with_content_part(tmp_path_factory, sum_run, "features", item_features=True)


@pytest.fixture(scope="session")
def checkpoint_path(bundle_dir: Path) -> Path:
    """The trained checkpoint the session's bundle was exported from (skips if unknown)."""
    candidates = [
        bundle_dir.parent / BUNDLE_VARIANT / "checkpoint.pt",  # `sidrec pipeline`: run/bundle
        bundle_dir.parent / "run" / BUNDLE_VARIANT / "checkpoint.pt",  # this file's layout
    ]
    if "run" in _RUN:
        candidates.insert(0, _RUN["run"] / BUNDLE_VARIANT / "checkpoint.pt")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        pytest.skip(f"no checkpoint next to {bundle_dir} (SIDREC_TEST_BUNDLE without its run)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process on a free port, no persistence unless `aof` (then every write is
    fsynced before Redis answers); stop() and start() again keep the port, so a client sees
    the same address come back (empty, or from its append-only file)."""

    def __init__(self, folder: Path, aof: bool = False) -> None:
        if REDIS_BIN is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.folder = folder
        self.port = free_port()
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_BIN is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.folder)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else []
        args += [] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """kill -9: no shutdown, no final save."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)


def free_port_pair() -> int:
    """A free port p whose cluster bus port p + 10000 is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """A real Redis Cluster on loopback: `masters` redis-server processes with cluster mode on,
    joined by `redis-cli --cluster create` (no replicas). `url` names one node."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        if REDIS_BIN is None or shutil.which("redis-cli") is None:
            pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
        self.folder = folder
        self.ports = [free_port_pair() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        assert REDIS_BIN is not None
        for port in self.ports:
            node = self.folder / str(port)
            node.mkdir(parents=True, exist_ok=True)
            args = [REDIS_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            args += ["--appendonly", "no", "--dir", str(node), "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", str(node / "nodes.conf")]
            args += ["--cluster-node-timeout", "5000"]
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            wait_for_ping(port)
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            while client.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, f"cluster node {port} never became ok"
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2)


def wait_for_ping(port: int, timeout: float = 10) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


class Service:
    """`python -m sidrec.service` in a subprocess with SIDREC_* settings, on a free port."""

    def __init__(self, bundle: Path, log_path: Path, **settings: Any) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SIDREC_BUNDLE": str(bundle),
            "SIDREC_PORT": str(self.port),
            "SIDREC_ORT_THREADS": "1",  # two cores, shared with the test and Redis
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for name, value in settings.items():
            self.env[f"SIDREC_{name.upper()}"] = str(value)
        self.proc: subprocess.Popen[bytes] | None = None
        # Idle connections dropped after 2 s, before uvicorn's 5 s keep-alive closes them: at
        # httpx's default (also 5 s) a request sent as the server closes its idle connection
        # fails with "connection reset by peer" (CI, test_service_catalog, on a loaded box).
        self.http = httpx.Client(
            base_url=self.url, timeout=30, limits=httpx.Limits(keepalive_expiry=2.0)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 90) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidrec.service"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = self.http.get("/readyz" if wait_ready else "/healthz")
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=json, **kw)


@pytest.fixture
def start_service(tmp_path: Path, bundle_dir: Path) -> Iterator[Any]:
    """Factory: start_service(**settings) -> a ready Service; all stopped at the end."""
    started: list[Service] = []

    def start(wait_ready: bool = True, bundle: Path | None = None, **settings: Any) -> Service:
        log_path = tmp_path / f"service-{len(started)}.log"
        service = Service(bundle or bundle_dir, log_path, **settings)
        started.append(service)
        return service.start(wait_ready=wait_ready)

    yield start
    for service in started:
        service.stop()
