"""The item table and the search index over it: one row numbering for both.

Rows: 0 = padding (never returned), 1..n = the bundle's items, n+1.. = items ingested while
running, in the order this process learnt of them (so row numbers are local to a process; item
ids are what crosses process boundaries). The table keeps the raw vectors the user encoder
reads; the index holds their L2-normalised copies (or, for a "dot" bundle, the raw rows) times
each row's score scale, with one more column: minus the row's score offset. Items without a
trained id get the bundle's `model.new_item_score_scale` and `model.new_item_score_offset`
(docs/bundle.md), trained ones 1 and 0. Every query gets a trailing 1, so the inner product
FAISS computes, indexed(v) . u * scale - offset, is the score the offline evaluator ranks by,
exactly and in one search: no re-scoring after it.

Rows are append-only, because neither a flat GPU index nor an HNSW graph can overwrite a
vector in place. When an item's vector changes (re-ingested with new content) it gets a new row
and its old row is marked dead; a retired item's row dies the same way. Searches over-fetch by
the number of dead rows and drop them. Once dead rows pass a quarter of the table, a background
thread compacts it: it copies the live rows, builds a fresh index over them (no FAISS index
kind here can remove rows in place: HNSW cannot at all, and a flat index's remove_ids shifts
every row number anyway) and swaps both in under the lock, replaying what changed meanwhile.
Row numbers change at a swap, so the service's calls (`resolve`, `rank_batch`, `similar`,
`sid_of`) take and return item ids and use rows only under the lock; the row-level calls
(`search`, `search_batch`, `gather`) are for benches and tests on a table nobody compacts.

The index kind is a setting (SIDREC_INDEX): "flat" is exact; "hnsw" (IndexHNSWFlat, inner
product) is approximate and sub-linear, for catalogs where a scan of every row costs too much;
"torch" is exact too, a matrix product and torch.topk over rows held on the torch device
(SIDREC_DEVICE: the GPU where PyTorch sees one; service/torch_engine.py). All take new rows
with `add`, so items ingested at run time are searchable at once.
`loadtests/serving_bench.py` measures HNSW's recall@10 against flat and both search times;
`loadtests/gpu_bench.py` times flat and torch on the CPU and the GPU.

A bundle with a content term (`model.new_item_content_weight`, docs/bundle.md) adds
W * cos(the history's mean content vector, its recent events weighing more where the bundle
gives a half-life, and the item's) to the score of each item without a
trained id (and W_r to the rarely trained ones', `model.rare_item_content_weight`), as the
offline evaluator does. Those rows (few: the catalog's untrained, rarest and ingested items)
are also held in a second, exact index whose rows carry W * their unit content
vector after the score columns; a query gets the history's mean content after its 1, and its
hits from the main index skip those rows, whose full score comes from the second index. The
main index keeps d + 1 columns, so warm search costs what it did.

FAISS and PyTorch are imported when an index of theirs is built, so this module loads with
either one alone (gpu_bench on a GPU machine without FAISS).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from sidrec.content_term import recency_weights

log = logging.getLogger("sidrec.service")


def normalized(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _per_row(values: np.ndarray | None, n_rows: int, default: float, name: str) -> np.ndarray:
    # per-row values [n_rows] (None: all `default`) -> float32 [n_rows]
    if values is None:
        return np.full(n_rows, default, np.float32)
    values = np.asarray(values, np.float32)
    if values.shape != (n_rows,):
        raise ValueError(f"{name} must be [{n_rows}], got {values.shape}")
    return values


def augmented(queries: np.ndarray) -> np.ndarray:
    """float32 [B, d] queries -> [B, d + 1] with a trailing 1: the column that meets the index
    rows' -offset, so the inner product subtracts each row's score offset. One array per
    batch (no per-query work)."""
    queries = np.asarray(queries, np.float32)
    out = np.empty((queries.shape[0], queries.shape[1] + 1), np.float32)
    out[:, :-1] = queries
    out[:, -1] = 1.0
    return out


def gpu_count() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def set_search_threads(threads: int) -> None:
    """OpenMP threads FAISS may use for the searches of the calling thread; 0 = leave its
    default (every core). OpenMP keeps this per thread: a thread started later, or one that
    never called this, still gets the default. Without FAISS (the torch index alone) there
    is nothing to set."""
    if not threads:
        return
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def search_threads() -> int:
    """The OpenMP threads FAISS would use for a search from the calling thread."""
    import faiss

    return int(faiss.omp_get_max_threads())


IndexKind = Literal["flat", "hnsw", "torch"]

# (item id, score, SID): what the id-level searches return.
Hit = tuple[str, float, list[int]]


class Resolved(NamedTuple):
    """A history's items as the table holds them (ItemTable.resolve)."""

    vectors: np.ndarray  # float32 [n, d], raw rows of the known items, in order
    known: np.ndarray  # bool [N]: which of the N ids are in the table
    rows: np.ndarray  # int64 [n]: their rows
    layout: int  # ItemTable.layout when read: with rows, names the vectors exactly
    # float32 [C]: the content term's query, the known items' mean unit content vector
    # (ItemTable.content_query); None where the table has no content term
    content: np.ndarray | None = None


# Compaction starts when dead rows reach this share of the table (and at least COMPACT_MIN_DEAD):
# a search over-fetches by the dead rows, so a quarter bounds that overhead; a rebuild costs a
# copy of the live rows (and for HNSW a graph build), paid once per that many changes.
COMPACT_DEAD_SHARE = 0.25
COMPACT_MIN_DEAD = 16
# Each re-search of a filtered query fetches this many times more candidates than the last.
OVERFETCH_GROWTH = 4


class VectorIndex(Protocol):
    """The two calls ItemTable makes on an index: FAISS's, which TorchTopK has too."""

    ntotal: int

    def add(self, x: np.ndarray) -> None: ...

    def search(
        self, x: np.ndarray, k: int, params: Any = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class IndexSpec:
    """Which index holds the rows, and its knobs (SIDREC_INDEX, SIDREC_HNSW_*)."""

    kind: IndexKind = "flat"
    # Links per node of the HNSW graph: more = better recall per search step, more memory.
    hnsw_m: int = 32
    # Candidate list while inserting: a better graph for a slower build (and slower ingest).
    hnsw_ef_construction: int = 100
    # Candidate list while searching: the recall / latency knob. A search asking for more
    # rows than this (k + excluded + dead) widens it to that many, else HNSW returns fewer.
    hnsw_ef_search: int = 128
    # Where the torch index keeps its rows: SIDREC_DEVICE (auto | cpu | cuda). FAISS's flat
    # index follows ItemTable's use_gpu instead.
    device: str = "auto"

    def build(self, d: int) -> VectorIndex:
        if self.kind == "torch":
            from .torch_engine import TorchTopK, torch_device

            return TorchTopK(d, torch_device(self.device))
        import faiss

        if self.kind == "flat":
            return faiss.IndexFlatIP(d)
        index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.hnsw_ef_construction
        index.hnsw.efSearch = self.hnsw_ef_search
        return index

    def describe(self) -> str:
        if self.kind == "flat":
            return "IndexFlatIP"
        if self.kind == "torch":
            return "exact inner product, torch.topk"
        return (
            f"IndexHNSWFlat(M={self.hnsw_m}, efConstruction={self.hnsw_ef_construction}, "
            f"efSearch={self.hnsw_ef_search})"
        )


class ItemTable:
    def __init__(
        self,
        vectors: np.ndarray,  # float32 [n + 1, d] raw, row 0 padding
        item_ids: list[str],  # [n], rows 1..n
        sids: np.ndarray,  # int64 [n + 1, L + 1]
        codes_per_layer: int,
        use_gpu: bool = True,
        index: IndexSpec | None = None,
        scales: np.ndarray | None = None,  # float32 [n + 1] score scale per row, default 1
        offsets: np.ndarray | None = None,  # float32 [n + 1] subtracted from scores, default 0
        scoring: str = "cosine",  # the bundle's: "cosine" indexes unit rows, "dot" raw ones
        content: np.ndarray | None = None,  # float32 [n + 1, C] content vectors, row 0 zero
        content_weights: np.ndarray | None = None,  # float32 [n + 1] content-term weight
        content_half_life: float | None = None,  # the term's history recency (ContentTerm)
    ) -> None:
        if scoring not in ("cosine", "dot"):
            raise ValueError(f"scoring must be cosine or dot, not {scoring!r}")
        self.scoring = scoring
        n_rows, self.d = vectors.shape
        if len(item_ids) != n_rows - 1 or len(sids) != n_rows:
            raise ValueError("vectors, item ids and SIDs disagree on the number of items")
        self.num_bundle_items = n_rows - 1
        self.codes_per_layer = codes_per_layer
        self._capacity = max(16, 2 * n_rows)
        self.vectors = np.zeros((self._capacity, self.d), np.float32)  # [capacity, d]
        self.vectors[:n_rows] = vectors
        self.sids = np.zeros((self._capacity, sids.shape[1]), np.int64)  # [capacity, L + 1]
        self.sids[:n_rows] = sids
        scales = _per_row(scales, n_rows, 1.0, "scales")
        offsets = _per_row(offsets, n_rows, 0.0, "offsets")
        self.scales = np.ones(self._capacity, np.float32)  # [capacity]
        self.scales[:n_rows] = scales
        self.offsets = np.zeros(self._capacity, np.float32)  # [capacity]
        self.offsets[:n_rows] = offsets
        # The content term (module docstring): unit content vectors of every row (what a
        # history's mean is taken over) and each row's term weight (0: no term).
        self.content: np.ndarray | None = None
        self.content_half_life = content_half_life
        self.content_weights = np.zeros(self._capacity, np.float32)  # [capacity]
        if content is not None:
            content = np.asarray(content, np.float32)
            if content.shape[0] != n_rows:
                raise ValueError(f"content must have {n_rows} rows, got {content.shape}")
            self.content = np.zeros((self._capacity, content.shape[1]), np.float32)
            self.content[:n_rows] = normalized(content)
            self.content_weights[:n_rows] = _per_row(content_weights, n_rows, 0.0, "weights")
        elif content_weights is not None and np.any(np.asarray(content_weights) != 0):
            raise ValueError("content weights need the rows' content vectors")
        self.alive = np.zeros(self._capacity, bool)
        self.alive[1:n_rows] = True
        self.size = n_rows
        self.item_ids: list[str] = ["", *item_ids]  # by row
        self.row_of: dict[str, int] = {item_id: row for row, item_id in enumerate(self.item_ids)}
        del self.row_of[""]
        self.dead = 0
        # code_counts[l, c] = live items whose layer-l code is c: codebook usage without a scan.
        layers = sids.shape[1] - 1
        self.code_counts = np.zeros((layers, codes_per_layer), np.int64)
        for layer in range(layers):
            self.code_counts[layer] = np.bincount(sids[1:n_rows, layer], minlength=codes_per_layer)[
                :codes_per_layer
            ]
        self.index_spec = index or IndexSpec()
        self.on_gpu = False
        self._library = "faiss-cpu"
        self._use_gpu = use_gpu
        self.index: VectorIndex = self._new_index()
        # row 0's zero vector keeps positions == rows
        self.index.add(self._index_rows(vectors, scales, offsets))
        # The rows with a content term, by position in term_index (None: no term anywhere).
        self.term_index: VectorIndex | None = None
        self.term_rows: list[int] = []
        if self.content is not None:
            self.term_index, self.term_rows = self._term_index(np.arange(n_rows))
        # FAISS indexes are not safe to search while another thread adds to them; reentrant
        # because similar() searches from inside its own critical section.
        self.lock = threading.RLock()
        # Bumped when compaction renumbers the rows. Between bumps a row's vector never
        # changes (a replaced item gets a new row), so (layout, rows) names the vectors.
        self.layout = 0
        self._compacting = False
        # Item ids changed while a compaction builds its index (None: none running).
        self._touched: set[str] | None = None
        self._compact_lock = threading.Lock()
        self.compactions = 0
        # Called (on the compaction thread) after each swap, e.g. to update gauges.
        self.on_compacted: Callable[[], None] | None = None

    def _new_index(self) -> VectorIndex:
        # d + 1: the last column holds -offset (rows) and 1 (queries); see _index_rows.
        index = self.index_spec.build(self.d + 1)
        if self.index_spec.kind == "torch":
            device = index.device  # type: ignore[attr-defined]
            self.on_gpu = device.type == "cuda"
            self._library = f"torch-{device.type}"
        # FAISS has no GPU HNSW: an HNSW index stays on the CPU whatever the device.
        elif self._use_gpu and self.index_spec.kind == "flat" and gpu_count() > 0:
            import faiss

            if not hasattr(self, "_gpu_resources"):
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.on_gpu = True
            self._library = "faiss-gpu"
        return index

    @property
    def content_dim(self) -> int:
        """C, the content vectors' width; 0 without a content term."""
        return 0 if self.content is None else self.content.shape[1]

    def _term_index(self, rows: np.ndarray) -> tuple[VectorIndex, list[int]]:
        """An exact index over those of `rows` with a content-term weight: [index row, W *
        unit content] per row (see _index_rows), and their rows by position."""
        rows = np.asarray(rows, np.int64)
        rows = rows[self.content_weights[rows] != 0]
        kind: IndexKind = "torch" if self.index_spec.kind == "torch" else "flat"
        index = IndexSpec(kind, device=self.index_spec.device).build(self.d + 1 + self.content_dim)
        if len(rows):
            index.add(self._term_rows(rows))
        return index, rows.tolist()

    def _term_rows(self, rows: np.ndarray) -> np.ndarray:
        # rows int64 [m] -> float32 [m, d + 1 + C]: the index row, then W * unit content
        assert self.content is not None
        base = self._index_rows(self.vectors[rows], self.scales[rows], self.offsets[rows])
        term = self.content[rows] * self.content_weights[rows, None]
        return np.ascontiguousarray(np.concatenate([base, term], axis=1), np.float32)

    def content_query(self, rows: np.ndarray) -> np.ndarray:
        """rows int64 [n] of a history, oldest first -> float32 [C]: its mean unit content
        vector, the events weighted by the term's half-life (recency_weights), unit length
        (zeros for no rows): what the content term's cosine is taken with. Under the lock
        (rows are renumbered by compaction)."""
        assert self.content is not None
        if len(rows) == 0:
            return np.zeros(self.content_dim, np.float32)
        # a sum by matrix product (BLAS) is several times faster than .mean(axis=0) here,
        # and the scale is normalised away
        weights = recency_weights(len(rows), self.content_half_life)
        return normalized(weights @ self.content[rows])

    def _indexed(self, vectors: np.ndarray) -> np.ndarray:
        # [m, d] raw -> the rows the index ranks by inner product with the user vector
        if self.scoring == "dot":
            return np.asarray(vectors, np.float32)
        return normalized(vectors)

    def _index_rows(
        self, vectors: np.ndarray, scales: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray:
        """raw [m, d], scales [m], offsets [m] -> the index's rows float32 [m, d + 1]:
        [indexed(v) * scale, -offset], so that against a query [u, 1] (augmented) the inner
        product is indexed(v) . u * scale - offset: the score, offset included."""
        m = len(vectors)
        out = np.empty((m, self.d + 1), np.float32)
        np.multiply(
            self._indexed(vectors), np.asarray(scales, np.float32)[:, None], out=out[:, :-1]
        )
        np.negative(np.asarray(offsets, np.float32), out=out[:, -1])
        return out

    @property
    def live_items(self) -> int:
        return self.size - 1 - self.dead

    @property
    def compacting(self) -> bool:
        return self._compacting

    @property
    def rows_held(self) -> int:
        """Rows in the index and the table, dead ones included (row 0 too)."""
        return self.size

    @property
    def index_kind(self) -> str:
        return f"{self._library} {self.index_spec.describe()}"

    def codebook_usage(self) -> list[float]:
        return [float(u) for u in (self.code_counts > 0).mean(axis=1)]

    def row(self, item_id: str) -> int | None:
        return self.row_of.get(item_id)

    def upsert(
        self,
        item_id: str,
        sid: np.ndarray,
        vector: np.ndarray,
        scale: float = 1.0,
        offset: float = 0.0,
        content: np.ndarray | None = None,
        content_weight: float = 0.0,
    ) -> bool:
        """Add an item or replace its SID, vector, score scale and score offset (its score is
        the cosine, or the dot product, times `scale`, minus `offset`), content vector [C]
        and content-term weight (plus weight * the cosine of the history's mean content and
        its own; tables without a content term take neither). Returns True if the item is
        new here."""
        sid = np.asarray(sid, np.int64)
        vector = np.asarray(vector, np.float32)
        unit = None
        if self.content is not None:
            unit = np.zeros(self.content_dim, np.float32)
            if content is not None:
                unit = normalized(np.asarray(content, np.float32).reshape(-1))
        elif content_weight:
            raise ValueError("this table has no content term")
        with self.lock:
            old = self.row_of.get(item_id)
            unchanged = (
                old is not None
                and np.array_equal(self.sids[old], sid)
                and np.array_equal(self.vectors[old], vector)
                and self.scales[old] == np.float32(scale)
                and self.offsets[old] == np.float32(offset)
                and self.content_weights[old] == np.float32(content_weight)
                and (self.content is None or np.array_equal(self.content[old], unit))
            )
            if unchanged:
                return False  # e.g. our own ingest coming back through the stream
            if self._touched is not None:
                self._touched.add(item_id)
            if old is not None:
                self._kill(old)
            if self.size == self._capacity:
                self._grow()
            row = self.size
            self.vectors[row] = vector
            self.sids[row] = sid
            self.scales[row] = scale
            self.offsets[row] = offset
            self.content_weights[row] = content_weight
            if self.content is not None:
                self.content[row] = unit
            self.alive[row] = True
            one = slice(row, row + 1)
            self.index.add(self._index_rows(vector[None, :], self.scales[one], self.offsets[one]))
            if content_weight and self.term_index is not None:
                self.term_index.add(self._term_rows(np.array([row])))
                self.term_rows.append(row)
            self.item_ids.append(item_id)
            self.row_of[item_id] = row
            self.size += 1
            self._count_codes(sid, +1)
            self._maybe_compact()
            return old is None

    def retire(self, item_id: str) -> bool:
        """Drop an item: it is no longer found or returned. False if it was not here."""
        with self.lock:
            row = self.row_of.pop(item_id, None)
            if row is None:
                return False
            if self._touched is not None:
                self._touched.add(item_id)
            self._kill(row)
            self._maybe_compact()
            return True

    def _kill(self, row: int) -> None:
        self.alive[row] = False
        self.dead += 1
        self._count_codes(self.sids[row], -1)

    def _maybe_compact(self) -> None:
        # Called under the lock after a row died or was added.
        if self._compacting or self.dead < max(COMPACT_MIN_DEAD, COMPACT_DEAD_SHARE * self.size):
            return
        self._compacting = True
        threading.Thread(target=self.compact, name="sidrec-compact", daemon=True).start()

    def compact(self) -> None:
        """Rebuild the table and index from the live rows, then swap them in.

        The copy and the swap hold the lock; the index build (the slow part: an HNSW graph over
        every live row) does not, so searches and ingests go on meanwhile. Items changed during
        the build are replayed at the swap from their current rows. One at a time: a second
        call (by hand, beside the background one) waits for the first."""
        with self._compact_lock:
            self._compact()

    def _compact(self) -> None:
        try:
            with self.lock:
                self._compacting = True
                keep = np.concatenate([[0], np.flatnonzero(self.alive[: self.size])])
                vectors = self.vectors[keep]
                sids = self.sids[keep]
                scales = self.scales[keep]
                offsets = self.offsets[keep]
                weights = self.content_weights[keep]
                content = None if self.content is None else self.content[keep]
                item_ids = [self.item_ids[r] for r in keep]
                self._touched = set()
            index = self._new_index()
            index.add(self._index_rows(vectors, scales, offsets))
            with self.lock:
                touched, self._touched = self._touched, None
                row_of = {item_id: row for row, item_id in enumerate(item_ids) if row}
                alive = np.ones(len(keep), bool)
                alive[0] = False
                # Changed meanwhile: the copied row is stale (kill it), the current one (if
                # any) is appended like a fresh upsert.
                appended = [self.row_of[i] for i in touched if i in self.row_of]
                for item_id in touched:
                    row = row_of.pop(item_id, None)
                    if row is not None:
                        alive[row] = False
                size = len(keep) + len(appended)
                capacity = max(16, 2 * size)

                def fresh(copied: np.ndarray, current: np.ndarray) -> np.ndarray:
                    out = np.zeros((capacity, *copied.shape[1:]), copied.dtype)
                    out[: len(keep)] = copied
                    out[len(keep) : size] = current[appended]
                    return out

                new_vectors = fresh(vectors, self.vectors)
                new_sids = fresh(sids, self.sids)
                new_scales = fresh(scales, self.scales)
                new_offsets = fresh(offsets, self.offsets)
                new_weights = fresh(weights, self.content_weights)
                new_content = None if content is None else fresh(content, self.content)
                new_alive = fresh(alive, self.alive)
                if appended:
                    tail = slice(len(keep), size)
                    index.add(
                        self._index_rows(new_vectors[tail], new_scales[tail], new_offsets[tail])
                    )
                for n, row in enumerate(appended):
                    item_ids.append(self.item_ids[row])
                    row_of[self.item_ids[row]] = len(keep) + n
                self.vectors, self.sids, self.scales, self.offsets, self.alive = (
                    new_vectors,
                    new_sids,
                    new_scales,
                    new_offsets,
                    new_alive,
                )
                self.content_weights, self.content = new_weights, new_content
                if self.content is not None:  # few rows: rebuilt here, under the lock
                    live = np.flatnonzero(new_alive[:size])
                    self.term_index, self.term_rows = self._term_index(live)
                self.item_ids, self.row_of, self.index = item_ids, row_of, index
                self.layout += 1
                self.size, self._capacity = size, capacity
                self.dead = int(size - 1 - new_alive[:size].sum())
                self.compactions += 1
                log.info("item table compacted: %d live rows of %d", size - 1 - self.dead, size)
            if self.on_compacted is not None:
                self.on_compacted()
        except Exception:  # the old table keeps serving; the next change tries again
            log.exception("item table compaction failed")
            with self.lock:
                self._touched = None
                self._compacting = False
            return
        with self.lock:
            self._compacting = False
            # Rows that died during a slow build (an HNSW graph) may be past the share
            # again already: go on without waiting for the next change.
            self._maybe_compact()

    def _count_codes(self, sid: np.ndarray, delta: int) -> None:
        layers = self.code_counts.shape[0]
        self.code_counts[np.arange(layers), sid[:layers]] += delta

    def _grow(self) -> None:
        self._capacity *= 2

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((self._capacity, *a.shape[1:]), a.dtype)
            out[: self.size] = a[: self.size]
            return out

        self.vectors, self.sids, self.scales, self.offsets, self.alive = (
            grown(self.vectors),
            grown(self.sids),
            grown(self.scales),
            grown(self.offsets),
            grown(self.alive),
        )
        self.content_weights = grown(self.content_weights)
        if self.content is not None:
            self.content = grown(self.content)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """rows int64 [N] -> raw vectors float32 [N, d] (a copy).

        No lock: a row's vector is written once, before the row is handed out, and never
        again (a changed item gets a new row); _grow copies into a new array and then swaps
        the attribute, so either array holds every row that existed when `rows` was made.
        """
        vectors = self.vectors
        return vectors[rows]

    def search(
        self,
        query: np.ndarray,  # float32 [d], L2-normalised
        k: int,
        exclude_rows: set[int],
        content_query: np.ndarray | None = None,  # float32 [C], see content_query
    ) -> list[tuple[int, float]]:
        """Top-k live rows by score, best first, skipping exclude_rows."""
        content = None if content_query is None else content_query[None, :]
        return self.search_batch(query[None, :], [k], [exclude_rows], content)[0]

    def search_batch(
        self,
        queries: np.ndarray,  # float32 [B, d], L2-normalised
        ks: list[int],  # [B]
        exclude_rows: list[set[int]],  # [B]
        content_queries: np.ndarray | None = None,  # float32 [B, C] (None: zeros)
    ) -> list[list[tuple[int, float]]]:
        """search() for B queries in one FAISS call: per query, top-k live rows, best first,
        with their scores (offsets and content term included)."""
        with self.lock:
            return self._rank_rows(queries, content_queries, ks, exclude_rows, None)

    # --- id-level calls: what the service uses (rows stay inside the lock) ----------------

    def sid_of(self, item_id: str) -> list[int] | None:
        with self.lock:
            row = self.row_of.get(item_id)
            return None if row is None else self.sids[row].tolist()

    def resolve(self, item_ids: list[str]) -> Resolved:
        """item ids -> their raw vectors, rows and which ids are known (see Resolved)."""
        with self.lock:
            rows = [self.row_of.get(i) for i in item_ids]
            known = np.array([r is not None for r in rows], bool)
            found = np.array([r for r in rows if r is not None], np.int64)
            content = None if self.content is None else self.content_query(found)
            return Resolved(self.vectors[found], known, found, self.layout, content)

    def _search(self, queries: np.ndarray, fetch: int) -> tuple[list[list[int]], list[list[float]]]:
        # queries: float32 [B, d + 1], already augmented (a trailing 1 per row)
        params = None
        if self.index_spec.kind == "hnsw":
            import faiss

            params = faiss.SearchParametersHNSW(efSearch=max(self.index_spec.hnsw_ef_search, fetch))
        scores, rows = self.index.search(
            np.ascontiguousarray(queries, np.float32), fetch, params=params
        )
        return rows.tolist(), scores.tolist()

    def _rank_rows(
        self,
        queries: np.ndarray,  # float32 [B, d]
        content_queries: np.ndarray | None,  # float32 [B, C] or None (zeros)
        ks: list[int],  # [B]
        excluded: list[set[int]],  # [B] rows
        accepts: list[Callable[[str], bool] | None] | None,  # [B], None = any item
    ) -> list[list[tuple[int, float]]]:
        """Per query, the top-k (row, score) of the live rows not excluded that `accept`
        takes, best first; under the lock. A query short of k is searched again with
        OVERFETCH_GROWTH times more candidates until k qualify or every row was read. With a
        content term, the rows that have one come from the term index with their full score
        and are skipped among the main index's hits; the two lists are merged."""
        accepts = accepts or [None] * len(ks)
        main = augmented(queries)  # once; each re-search takes its rows
        n_term = len(self.term_rows) if self.term_index is not None else 0
        term = None
        if n_term:
            content = np.zeros((len(ks), self.content_dim), np.float32)
            if content_queries is not None:
                content[:] = content_queries
            term = np.ascontiguousarray(np.concatenate([main, content], axis=1))
        most = max(k + len(ex) for k, ex in zip(ks, excluded, strict=True))
        fetch = most + self.dead + 1
        # the main index's hits skip the term rows: fetch past twice their share at once (a
        # query short of k after that is searched again)
        fetch = min(self.size, fetch + min(n_term, 2 * fetch * n_term // self.size + max(ks)))
        term_fetch = min(n_term, most + self.dead + 1)
        # every row has a term (a warm term): the term index holds the whole table
        whole = n_term >= self.size - 1
        out: list[list[tuple[int, float]]] = [[] for _ in ks]
        pending = list(range(len(ks)))
        while pending:
            if whole:
                rows, scores = [[] for _ in pending], [[] for _ in pending]
            else:
                rows, scores = self._search(main[pending], fetch)
            if term is not None:
                assert self.term_index is not None
                term_scores, positions = self.term_index.search(term[pending], term_fetch)
            short = []
            for j, q in enumerate(pending):
                hits = self._hits(rows[j], scores[j], ks[q], excluded[q], accepts[q], n_term > 0)
                missing = len(hits) < ks[q] and fetch < self.size and not whole
                if term is not None:
                    found = [self.term_rows[p] if p >= 0 else -1 for p in positions[j].tolist()]
                    more = self._hits(
                        found, term_scores[j].tolist(), ks[q], excluded[q], accepts[q], False
                    )
                    missing |= len(more) < ks[q] and term_fetch < n_term
                    hits = sorted(hits + more, key=lambda hit: -hit[1])[: ks[q]]
                out[q] = hits
                if missing:
                    short.append(q)
            pending = short
            fetch = min(self.size, fetch * OVERFETCH_GROWTH)
            term_fetch = min(n_term, term_fetch * OVERFETCH_GROWTH)
        return out

    def _hits(
        self,
        rows: list[int],
        scores: list[float],
        k: int,
        excluded: set[int],
        accept: Callable[[str], bool] | None,
        skip_terms: bool,
    ) -> list[tuple[int, float]]:
        # the first k of rows (best first) that are live, not excluded, taken by accept and,
        # with skip_terms, without a content term
        hits: list[tuple[int, float]] = []
        alive, weights = self.alive, self.content_weights
        for row, score in zip(rows, scores, strict=True):
            if row <= 0 or not alive[row] or row in excluded:
                continue
            if skip_terms and weights[row] != 0:
                continue
            if accept is not None and not accept(self.item_ids[row]):
                continue
            hits.append((row, score))
            if len(hits) == k:
                break
        return hits

    def rank_batch(
        self,
        queries: np.ndarray,  # float32 [B, d], L2-normalised
        ks: list[int],  # [B]
        exclude_ids: list[set[str]],  # [B]
        accepts: list[Callable[[str], bool] | None] | None = None,  # [B], None = any item
        content_queries: np.ndarray | None = None,  # float32 [B, C], see content_query
    ) -> list[list[Hit]]:
        """Per query, the top-k live items that are not excluded and that `accept` takes.

        A filter can reject most candidates, so a query short of k is searched again with
        more candidates until k qualify or the whole index was read: fewer than k hits means
        fewer than k items qualify. Scores include the rows' offsets and content term."""
        with self.lock:
            excluded = [{self.row_of[i] for i in ex if i in self.row_of} for ex in exclude_ids]
            out = self._rank_rows(queries, content_queries, ks, excluded, accepts)
            return [
                [(self.item_ids[row], score, self.sids[row].tolist()) for row, score in hits]
                for hits in out
            ]

    def similar(
        self, item_id: str, k: int, accept: Callable[[str], bool] | None = None
    ) -> list[Hit] | None:
        """The k items nearest to `item_id`'s row (its unit vector against every row, the
        recommend score), itself excluded; None if the item is not here.

        The query goes through rank_batch, which gives it the trailing 1 like a user's: so the
        candidates' score offsets apply here too (a new item drops by its offset in similar
        items as in recommendations, and the scores returned are the same kind of score), and
        its own content vector stands in for a history's mean in the content term."""
        with self.lock:
            row = self.row_of.get(item_id)
            if row is None:
                return None
            query = normalized(self.vectors[row][None, :])
            content = None if self.content is None else self.content[row][None, :]
            return self.rank_batch(query, [k], [{item_id}], [accept], content)[0]
