"""Micro-batching: concurrent /v1/recommend requests share one ONNX Runtime run and one FAISS
search, on a small pool of rank threads.

Opportunistic, never waiting: a request is handed to an idle rank thread at once; while every
thread is busy, later requests queue, and the next free thread takes all of them (up to
MAX_BATCH). At low load every batch has one request and nothing changes; under load the
per-run costs (thread hand-off, ORT call set-up, FAISS call) are paid once per batch and ORT's
per-user time falls (1.38 -> 1.07 ms at batch 4-8 on the ML-1M model, 2-core box, one ORT
thread). ORT and FAISS release the GIL, so with one rank thread per core the model's compute
uses every core while the event loop parses the next requests; one thread alone left a 2-core
worker computing on one core (docs/serving-benchmark.md). Histories of different lengths are
right-padded to the longest in the batch and masked: the model was trained that way and the
padding cannot reach the last real position (causal attention, absolute positions from the
oldest item).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .retrieval import Hit, ItemTable, Resolved, set_search_threads
from .runtime import Engine
from .user_cache import UserVectorCache

log = logging.getLogger("sidrec.service")

MAX_BATCH = 32  # beyond this the padded [B, N, N] attention tensors stop fitting in cache

Hits = list[Hit]


@dataclass
class _Job:
    # Item ids, not rows: the table renumbers its rows when it compacts, so rows are looked
    # up in the batch thread, under the table's lock. Ids no longer in the table (retired
    # meanwhile) are left out of the history.
    item_ids: list[str]  # [N] history, oldest first
    timestamps: np.ndarray  # int64 [N]
    query_time: int
    k: int
    exclude_ids: set[str]
    future: asyncio.Future[Hits]
    loop: asyncio.AbstractEventLoop
    accept: Callable[[str], bool] | None = field(default=None)


class RankBatcher:
    """`await rank(...)` from the event loop; `threads` daemon threads run the batches."""

    def __init__(
        self,
        runtime: Engine,
        table: ItemTable,
        max_batch: int = MAX_BATCH,
        threads: int = 1,
        cache: UserVectorCache | None = None,
        search_threads: int = 0,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.runtime = runtime
        self.table = table
        self.max_batch = max_batch
        self.cache = cache  # None: every request runs the encoder
        # FAISS's OpenMP threads per rank thread (0: FAISS's default, every core). The rank
        # threads already fill the cores, so one each keeps a batched search from waking more
        # threads than there are cores (docs/serving-benchmark.md, "FAISS threads per rank thread").
        self.search_threads = search_threads
        # A C-level queue: put() hands the job to a waiting thread directly. With
        # threading.Condition (inside queue.Queue too) the woken thread then waited for the
        # lock its notifier still held (docs/serving-benchmark.md has the measurement).
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: stop
        self._stop_lock = threading.Lock()  # nothing is queued behind the stop markers
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"sidrec-rank-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    async def rank(
        self,
        item_ids: list[str],
        timestamps: np.ndarray,
        query_time: int,
        k: int,
        exclude_ids: set[str],
        accept: Callable[[str], bool] | None = None,
    ) -> Hits:
        """Top-k (item id, score, SID) for one history, best first, without exclude_ids and
        only items `accept` takes (None: any)."""
        loop = asyncio.get_running_loop()
        max_len = self.runtime.max_len  # the model saw at most max_len items: the most recent
        future: asyncio.Future[Hits] = loop.create_future()
        job = _Job(
            item_ids[-max_len:],
            timestamps[-max_len:],
            query_time,
            k,
            exclude_ids,
            future,
            loop,
            accept,
        )
        with self._stop_lock:
            if self._stopped:
                raise RuntimeError("the rank batcher is stopped")
            self._queue.put(job)
        return await job.future

    def stop(self) -> None:
        with self._stop_lock:
            self._stopped = True
            for _ in self._threads:
                self._queue.put(None)  # after every job: each thread serves what came first
        deadline = time.monotonic() + 10
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        set_search_threads(self.search_threads)  # OpenMP's setting is per thread
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:  # everything that queued meanwhile, up to a batch
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # this thread's stop marker: serve the batch, then stop
                    stop = True
                    break
                jobs.append(job)
            try:
                outcome: list[Hits] | BaseException = self._run(jobs)
            except Exception as e:  # every request of the batch gets the error, the thread lives
                log.exception("rank batch of %d failed", len(jobs))
                outcome = e
            self._resolve(jobs, outcome)

    def _run(self, jobs: list[_Job]) -> list[Hits]:
        started = time.perf_counter()
        found = [self.table.resolve(j.item_ids) for j in jobs]
        users = np.empty((len(jobs), self.table.d), np.float32)  # [B, d]
        keys: list[bytes | None] = [None] * len(jobs)
        todo = []  # jobs whose vector the encoder computes
        for i, (job, got) in enumerate(zip(jobs, found, strict=True)):
            if self.cache is not None and len(got.rows):
                keys[i] = key = self.cache.key(
                    got.layout, got.rows, job.timestamps[got.known], job.query_time
                )
                cached = self.cache.get(key)
                if cached is not None:
                    users[i] = cached
                    continue
            todo.append(i)
        gathered = time.perf_counter()
        if todo:
            users[todo] = self._encode([jobs[i] for i in todo], [found[i] for i in todo])
            if self.cache is not None:
                for i in todo:
                    key = keys[i]
                    if key is not None:
                        self.cache.put(key, users[i])
        encoded = time.perf_counter()
        content = None  # the content term's queries (ItemTable), where the table has one
        if found and found[0].content is not None:
            content = np.stack([got.content for got in found])  # [B, C]
        hits = self.table.rank_batch(
            users,
            [j.k for j in jobs],
            [j.exclude_ids for j in jobs],
            [j.accept for j in jobs],
            content,
        )
        retrieved = time.perf_counter()
        for _ in jobs:  # each request of the batch spent these times in these stages
            metrics.STAGE_LATENCY.labels(stage="gather").observe(gathered - started)
            metrics.STAGE_LATENCY.labels(stage="encode").observe(encoded - gathered)
            metrics.STAGE_LATENCY.labels(stage="retrieve").observe(retrieved - encoded)
        return hits

    def _encode(self, jobs: list[_Job], found: list[Resolved]) -> np.ndarray:
        """The user encoder over jobs' histories, right-padded to the longest -> [B, d]."""
        b, n = len(jobs), max(1, max(len(got.rows) for got in found))
        vectors = np.zeros((b, n, self.table.d), np.float32)  # zero = padding
        stamps = np.zeros((b, n), np.int64)
        mask = np.zeros((b, n), np.bool_)
        for i, (job, got) in enumerate(zip(jobs, found, strict=True)):
            vectors[i, : len(got.rows)] = got.vectors
            stamps[i, : len(got.rows)] = job.timestamps[got.known]
            mask[i, : len(got.rows)] = True
        mask[:, 0] |= ~mask.any(axis=1)  # every item retired meanwhile: one padding step
        return self.runtime.encode_users(
            vectors, stamps, mask, np.array([j.query_time for j in jobs], np.int64)
        )

    @staticmethod
    def _resolve(jobs: list[_Job], outcome: list[Hits] | BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for i, job in enumerate(jobs):
            fut = job.future

            def settle(fut: asyncio.Future[Hits] = fut, i: int = i) -> None:
                if fut.done():  # the client went away and the request was cancelled
                    return
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome[i])

            by_loop.setdefault(job.loop, []).append(settle)
        # One wake-up of each event loop per batch, not one per request.
        for loop, settles in by_loop.items():
            with suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(lambda s=settles: [f() for f in s])
