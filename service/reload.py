"""Hot model reload: a new bundle taken without a restart, by every worker.

POST /v1/admin/reload (write key) names a bundle folder, or none for SIDREC_BUNDLE's current
target (a symlink an operator points at the new export). The worker answering it:
  1. loads the bundle and checks every file's sha256 (sidrec.bundle.load_bundle); a bad
     bundle is refused with a 422 naming the file, counted in
     sidrec_model_reloads_total{outcome="refused"}, and the old model keeps serving;
  2. builds a complete new Services off the request path, in a thread: ONNX sessions, item
     table and index, warm-up runs, a new rank batcher;
  3. loads the catalog's ingested items into it (Catalog.rebuild): their SIDs and vectors
     under the new version come from Redis's derived:<version> hash, or are derived from the
     stored content vectors with the new bundle's codebooks and new-item graph, as ingestion
     does; retired items stay retired (the retired set is applied first). Its stream follower
     starts at the position the rebuild read, so items ingested meanwhile are not missed;
  4. publishes the bundle in Redis: P{catalog}:model = {"path", "manifest_sha256",
     "version", "base"} (base = SIDREC_BUNDLE as configured);
  5. swaps app.state.services (one assignment: a request sees the old model or the new one,
     never a mix), cancels the old stream follower, and stops the old rank batcher after
     DRAIN_S, so requests that already hold the old Services finish on it.
Every worker reads that key every MODEL_CHECK_S (one GET) and, when it names a bundle other
than the one it serves, does steps 1-3 and 5 itself. Only workers started with the same
SIDREC_BUNDLE follow it: a deployment restarted with a new SIDREC_BUNDLE is not sent back to
an older reload's bundle; a worker that (re)starts later follows it before /readyz says ready.
A bundle a worker cannot load (a path only another host has) is logged, counted as refused,
and not tried again until the key changes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson
from fastapi import FastAPI
from redis.exceptions import RedisError

from sidrec.bundle import MANIFEST, Bundle, BundleError, load_bundle, sha256_of

from . import metrics
from .deps import Services
from .runtime import check_engine
from .settings import Settings
from .store import StoreClient, StoreOverloaded

log = logging.getLogger("sidrec.service")

# How often each worker reads the active-bundle key (one GET).
MODEL_CHECK_S = 0.5
# How long a replaced model's rank batcher keeps serving the requests that hold it. A request's
# life is bounded by Redis timeouts of seconds; this is far past any.
DRAIN_S = 30.0


class ReloadRefused(Exception):
    """The bundle cannot be served (missing, altered, incompatible); the old one keeps serving."""


class ReloadBusy(Exception):
    """A reload is already under way in this worker."""


def bundle_folder(path: Path) -> Path:
    """The folder a path names, symlinks resolved (SIDREC_BUNDLE may point at the newest
    export: the folder is fixed once read, so every worker loads the same one)."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def freeze_heap() -> None:
    """Move every object alive now (bundle, item table, catalog, histories) into the
    collector's permanent generation. A full collection otherwise walks them all (125k
    objects, 53 ms on the ML-1M bundle, docs/serving-benchmark.md): a pause every request in
    flight waits on. Unfreezing first lets a replaced model's cycles be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class ActiveModel:
    """What P{catalog}:model holds: the bundle every worker should serve."""

    path: str
    manifest_sha256: str
    version: str
    base: str  # SIDREC_BUNDLE of the worker that published it

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes) -> ActiveModel:
        obj = orjson.loads(raw)
        return cls(
            str(obj["path"]), str(obj["manifest_sha256"]), str(obj["version"]), str(obj["base"])
        )


@dataclass(frozen=True)
class ReloadResult:
    status: Literal["reloaded", "unchanged"]
    model_version: str
    previous_version: str
    bundle: str
    seconds: float


def _open(path: Path) -> Bundle:
    """Resolve and fully verify a bundle folder (blocking: hashes every file)."""
    try:
        folder = bundle_folder(path)
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte, name too long
        raise BundleError(f"{path}: not a usable path ({e})") from e
    try:
        return load_bundle(folder)
    except BundleError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{folder}: cannot be read ({type(e).__name__}: {e})") from e


class Reloader:
    """Builds and swaps this worker's Services; follows the bundle published in Redis."""

    def __init__(
        self,
        app: FastAPI,
        settings: Settings,
        build: Callable[[Bundle], Services],
        announce: Callable[[Services, Services | None], None],
        start_sync: Callable[[Services], asyncio.Task[None]],
        redis: StoreClient | None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.build = build
        self.announce = announce
        self.start_sync = start_sync
        self.redis = redis
        self.key = f"{settings.key_prefix}{{catalog}}:model"
        self.lock = asyncio.Lock()
        self.sync_task: asyncio.Task[None] | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._retired_rankers: list[Services] = []
        # The published bundle last refused here, not tried again until the key changes.
        self.refused: ActiveModel | None = None
        # False until the active-bundle key was read once (and followed): /readyz waits for it.
        self.checked = redis is None
        self.last_error: str | None = None

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def reload(
        self, path: Path | None = None, publish: bool = True, expect_sha: str | None = None
    ) -> ReloadResult:
        """Load, verify and build the bundle at `path` (None: SIDREC_BUNDLE), then swap.

        Raises ReloadRefused (the bundle), ReloadBusy, or RedisError (the catalog could not be
        loaded); the old model serves on in every case."""
        if self.lock.locked():
            raise ReloadBusy("a model reload is already under way in this worker")
        async with self.lock:
            return await self._reload(path or self.settings.bundle, publish, expect_sha)

    async def _reload(self, path: Path, publish: bool, expect_sha: str | None) -> ReloadResult:
        started = time.perf_counter()
        old = self.services
        try:
            bundle = await asyncio.to_thread(_open, path)
            sha = await asyncio.to_thread(sha256_of, bundle.file(MANIFEST))
            if expect_sha is not None and sha != expect_sha:
                raise BundleError(
                    f"{bundle.file(MANIFEST)}: sha256 differs from the one published in Redis "
                    "(the folder changed since it was reloaded)"
                )
            check_engine(bundle, self.settings.engine, self.settings.device, self.settings.index)
        except Exception as e:
            raise self._refused(path, e) from e
        if (str(bundle.path), sha) == (str(old.bundle.path), old.manifest_sha256):
            metrics.MODEL_RELOADS.labels(outcome="unchanged").inc()
            if publish:
                await self._publish(old)
            return ReloadResult(
                "unchanged",
                old.bundle.version,
                old.bundle.version,
                str(bundle.path),
                time.perf_counter() - started,
            )
        try:
            new = await asyncio.to_thread(self.build, bundle)
        except Exception as e:  # any failure to build means this bundle cannot be served
            raise self._refused(path, e) from e
        try:
            # Ingested items under the new version: stored ones reused, the rest derived.
            loaded = await new.catalog.rebuild()
            if publish:  # before the swap: a Redis failure here leaves nothing half done
                await self._publish(new)
        except BaseException:
            await asyncio.to_thread(new.ranker.stop)
            raise
        new.rebuilt = True
        sync_task = self.start_sync(new)  # follows the stream from where rebuild read it
        # The swap: one reference. Requests that already hold `old` finish on it.
        self.app.state.services = new
        self.app.openapi_schema = None  # its limits come from the bundle
        old_task, self.sync_task = self.sync_task, sync_task
        old.catalog.table.on_compacted = None  # the gauges are the new table's now
        self.announce(new, old)
        if old_task is not None:
            old_task.cancel()
        drain = asyncio.create_task(self._drain(old), name="model-drain")
        self._draining.add(drain)
        drain.add_done_callback(self._draining.discard)
        seconds = time.perf_counter() - started
        metrics.MODEL_RELOADS.labels(outcome="reloaded").inc()
        log.info(
            "model reloaded: %s -> %s (%s) in %.1f s, %d ingested items under the new version",
            old.bundle.version,
            new.bundle.version,
            new.bundle.path,
            seconds,
            loaded,
        )
        return ReloadResult(
            "reloaded", new.bundle.version, old.bundle.version, str(new.bundle.path), seconds
        )

    def _refused(self, path: Path, e: Exception) -> ReloadRefused:
        metrics.MODEL_RELOADS.labels(outcome="refused").inc()
        text = str(e) if isinstance(e, BundleError) else f"{path}: {type(e).__name__}: {e}"
        log.error("model reload refused, still serving %s: %s", self.services.bundle.version, text)
        return ReloadRefused(text)

    async def _publish(self, services: Services) -> None:
        if self.redis is None:
            return
        active = ActiveModel(
            str(services.bundle.path),
            services.manifest_sha256,
            services.bundle.version,
            str(self.settings.bundle),
        )
        await self.redis.set(self.key, active.to_json())

    async def _drain(self, old: Services) -> None:
        self._retired_rankers.append(old)
        await asyncio.sleep(DRAIN_S)
        await asyncio.to_thread(old.ranker.stop)
        self._retired_rankers.remove(old)
        del old
        freeze_heap()  # the old model's objects were frozen too: collect them, freeze the new

    async def active(self) -> ActiveModel | None:
        """The bundle published in Redis for this deployment (None: none, or another's)."""
        if self.redis is None:
            return None
        raw = await self.redis.get(self.key)
        if raw is None:
            return None
        try:
            active = ActiveModel.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            self.last_error = f"{self.key}: unreadable ({e})"
            return None
        return active if active.base == str(self.settings.bundle) else None

    async def follow_once(self) -> None:
        active = await self.active()
        current = self.services
        if (
            active is None
            or (active.path, active.manifest_sha256)
            == (str(current.bundle.path), current.manifest_sha256)
            or active == self.refused
        ):
            return
        log.info("model: following the reload to %s (%s)", active.version, active.path)
        try:
            await self.reload(Path(active.path), publish=False, expect_sha=active.manifest_sha256)
        except ReloadRefused as e:
            self.refused = active
            self.last_error = str(e)
        except ReloadBusy:
            pass  # this worker is reloading already; checked again next round

    async def watch(self) -> None:
        """Forever: follow the bundle published in Redis (every MODEL_CHECK_S)."""
        if self.redis is None:
            return
        while True:
            try:
                await self.follow_once()
                self.checked = True
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, StoreOverloaded) as e:
                self.last_error = f"{type(e).__name__}: {e}"
            except Exception as e:  # the watcher must outlive any one failure
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("model: following the published bundle failed")
            await asyncio.sleep(MODEL_CHECK_S)

    async def close(self) -> None:
        tasks = [t for t in (self.sync_task, *self._draining) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        for old in self._retired_rankers:
            await asyncio.to_thread(old.ranker.stop)
        self._retired_rankers.clear()

    def not_ready(self) -> str | None:
        """/readyz's reason while a (re)started worker has not yet read the published bundle."""
        if self.checked:
            return None
        why = f" ({self.last_error})" if self.last_error else ""
        return f"model: the bundle published by the last reload not yet read from Redis{why}"
