"""What the content term costs a request: the item table's work for one `/v1/recommend` (the
history's rows and, with the term, its mean content vector; then the top-k search) on one
table without the term and one with it, side by side in one process, interleaved.

The tables are synthetic and shaped like a bundle (`--items`, `--dim`, `--content-dim`,
`--term-share`: the share of items that carry the term, the untrained ones and, with a rarely
trained items' term, the rarest); latency depends on those shapes, not on what was learnt.
Prints the median and p90 per request of each and their ratio.

    python -m loadtests.content_term_bench --items 3883 --term-share 0.05 --history 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.retrieval import ItemTable


def tables(
    items: int, dim: int, content_dim: int, term_share: float, seed: int
) -> tuple[ItemTable, ItemTable]:
    """(without the term, with it): the same rows, ids and scores apart from the term."""
    rng = np.random.default_rng(seed)
    vectors = np.zeros((items + 1, dim), np.float32)
    vectors[1:] = rng.normal(size=(items, dim))
    content = np.zeros((items + 1, content_dim), np.float32)
    content[1:] = rng.normal(size=(items, content_dim))
    ids = [f"i{r}" for r in range(1, items + 1)]
    sids = np.zeros((items + 1, 4), np.int64)
    weights = np.zeros(items + 1, np.float32)
    rows = rng.choice(np.arange(1, items + 1), max(1, int(term_share * items)), replace=False)
    weights[rows] = 1.0
    plain = ItemTable(vectors, ids, sids, 8, use_gpu=False, scoring="dot")
    term = ItemTable(vectors, ids, sids, 8, use_gpu=False, scoring="dot", content=content,
                     content_weights=weights)  # fmt: skip
    return plain, term


def one_request(table: ItemTable, history: list[str], query: np.ndarray, k: int) -> float:
    """Seconds for what the rank thread does with a user vector in hand: resolve the history
    (rows, and the term's mean content) and search."""
    started = time.perf_counter()
    got = table.resolve(history)
    content = None if got.content is None else got.content[None]
    table.rank_batch(query, [k], [set(history)], None, content)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3883)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--content-dim", type=int, default=384)
    p.add_argument("--term-share", type=float, default=0.05)
    p.add_argument("--history", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    plain, term = tables(args.items, args.dim, args.content_dim, args.term_share, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    seconds: dict[str, list[float]] = {"without term": [], "with term": []}
    for n in range(args.requests + args.requests // 10):  # the first tenth warms up
        history = [f"i{r}" for r in rng.integers(1, args.items + 1, args.history)]
        query = rng.normal(size=(1, args.dim)).astype(np.float32)
        pair = (("without term", plain), ("with term", term))
        for name, table in pair if n % 2 else pair[::-1]:  # alternate which goes first
            spent = one_request(table, history, query, args.k)
            if n >= args.requests // 10:
                seconds[name].append(spent)
    out = {
        name: {"p50_us": float(np.median(v) * 1e6), "p90_us": float(np.percentile(v, 90) * 1e6)}
        for name, v in seconds.items()
    }
    for name, row in out.items():
        print(f"{name:13s} p50 {row['p50_us']:7.1f} us  p90 {row['p90_us']:7.1f} us")
    ratio = out["with term"]["p50_us"] / out["without term"]["p50_us"]
    print(f"with / without, p50: {ratio:.2f}x ({len(term.term_rows)} rows with the term)")
    return out


if __name__ == "__main__":
    main()
