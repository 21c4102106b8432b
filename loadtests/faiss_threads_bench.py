"""What SIDREC_FAISS_THREADS changes: batched searches on the item table from several threads at
once, as the rank threads make them, with FAISS's OpenMP threads per searching thread set to
each listed value in turn (0 = FAISS's default, every core).

The table is synthetic and shaped like a bundle (`--items`, `--dim`); each search is
`ItemTable.rank_batch` over `--batch` users with `--history` items excluded each, what one rank
thread does after the encoder. Settings alternate round by round, so a change in the machine's
load falls on all of them; prints per setting and batch size the median and p99 of one batch
and the batches done per second by all threads together.

    python -m loadtests.faiss_threads_bench --items 3883 --dim 50 --batch 1,4,16 --faiss 0,1
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from service.retrieval import ItemTable, search_threads, set_search_threads


def table(items: int, dim: int, seed: int) -> ItemTable:
    rng = np.random.default_rng(seed)
    vectors = np.zeros((items + 1, dim), np.float32)
    vectors[1:] = rng.normal(size=(items, dim))
    sids = np.zeros((items + 1, 4), np.int64)
    return ItemTable(vectors, [f"i{r}" for r in range(1, items + 1)], sids, 8, use_gpu=False)


def one_round(
    items: ItemTable, faiss: int, batch: int, threads: int, history: int, seconds: float, seed: int
) -> list[float]:
    """Every thread searching batches for `seconds`: the seconds each batch took."""
    spent: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()
    seen_threads: list[int] = []  # OpenMP threads each searching thread got

    def search(worker: int) -> None:
        set_search_threads(faiss)
        seen_threads.append(search_threads())
        rng = np.random.default_rng(seed + worker)
        mine: list[float] = []
        while not stop.is_set():
            queries = rng.normal(size=(batch, items.d)).astype(np.float32)
            seen = [{f"i{r}" for r in rng.integers(1, items.size, history)} for _ in range(batch)]
            started = time.perf_counter()
            items.rank_batch(queries, [10] * batch, seen)
            mine.append(time.perf_counter() - started)
        with lock:
            spent.extend(mine)

    workers = [threading.Thread(target=search, args=(w,)) for w in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    if faiss and set(seen_threads) != {faiss}:
        raise RuntimeError(f"searching threads saw {set(seen_threads)} OpenMP threads, not {faiss}")
    return spent


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3883)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--history", type=int, default=200)
    p.add_argument("--batch", default="1,4,16", help="users per search, comma-separated")
    p.add_argument("--faiss", default="0,1", help="OpenMP threads per searching thread")
    p.add_argument("--threads", type=int, default=2, help="threads searching at once")
    p.add_argument("--seconds", type=float, default=2.0, help="per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every setting")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    items = table(args.items, args.dim, args.seed)
    batches = [int(b) for b in args.batch.split(",")]
    settings = [int(f) for f in args.faiss.split(",")]
    spent: dict[tuple[int, int], list[float]] = {}
    for r in range(args.rounds):
        for batch in batches:
            order = settings if r % 2 == 0 else settings[::-1]
            for faiss in order:
                spent.setdefault((faiss, batch), []).extend(
                    one_round(
                        items, faiss, batch, args.threads, args.history, args.seconds, args.seed + r
                    )
                )
    out = {}
    for (faiss, batch), s in sorted(spent.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = f"faiss {faiss or 'default'}, batch {batch}"
        out[name] = {
            "p50_ms": float(np.median(s) * 1e3),
            "p99_ms": float(np.percentile(s, 99) * 1e3),
            "batches_per_s": len(s) / (args.rounds * args.seconds),
        }
        row = out[name]
        print(
            f"{name:24s} p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms  "
            f"{row['batches_per_s']:8.1f} batches/s"
        )
    return out


if __name__ == "__main__":
    main()
