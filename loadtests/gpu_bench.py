"""GPU benchmark: a /v1/recommend batch's model work (vector gather + user encode + top-k) on
the CPU path and on PyTorch, CPU and CUDA, at batch sizes 1 to 256.

    python -m loadtests.gpu_bench --bundle runs/ml-1m-bench/bundle
    python -m loadtests.gpu_bench --catalogs 100000,1000000        # no bundle: random weights

One run prints one table (markdown), the command and the machine at its top. Paths (rows):

cpu path    the service's default, SIDREC_ENGINE=onnx SIDREC_INDEX=flat: user_encoder.onnx under
            ONNX Runtime's CPU provider, FAISS IndexFlatIP on the CPU. Where FAISS is not
            installed (a GPU machine's image), torch.topk on the CPU stands in for it (the same
            exact ranking) and the row says so.
torch cpu   SIDREC_ENGINE=torch SIDREC_INDEX=torch SIDREC_DEVICE=cpu: the bundle's model.pt
            under PyTorch on the CPU, torch.topk over the item rows on the CPU.
torch cuda  the same with SIDREC_DEVICE=cuda: model and item rows on the GPU. "not available",
            with the reason, where PyTorch sees no GPU.

The objects timed are the service's own: service.runtime.OrtUserEncoder (what the onnx engine
runs), service.torch_engine.TorchModel (what the torch engine runs) and service.retrieval's
ItemTable with its FAISS or torch index (search_batch, the batcher's call). Each user has a
--history-len item history (distinct random catalog items, ten minutes apart, the most recent
model.max_len kept as the batcher does) and asks for the top --k with its history excluded.
A batch is timed from the item rows to the hits: gather (numpy, host), encode (host -> device
copies, the model, the user vectors back), top-k (scores, torch.topk or FAISS, rows back,
excluded rows dropped). Per path and batch size: --warmup untimed batches, then --repeats
repeats of --iters batches; each repeat gives p50 and p99 batch time and users/s (batch size x
batches / time), and the table shows the median of each over the repeats. Ratios are against
the cpu path at the same batch size: users/s over its users/s, and its p50 over this p50.
Each path's first batch is also checked against the cpu path's: the largest difference of a
user vector, and the share of top-k rows both return.

Catalogs (--catalogs): "bundle" = the bundle's item table; a number = that many random item
vectors, with the bundle's model (or, without --bundle, a model of --d/--blocks/... with random
weights: the shapes, not the weights, set the time). It needs numpy and PyTorch; ONNX Runtime
and FAISS where present (a bundle-less run also needs the onnx package to export the random
model). It runs from a plain checkout without `pip install` (a GPU machine): the source folders
are mapped to the sidrec packages as pyproject.toml maps them. Redis, FastAPI and pydantic are
not used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _map_source_packages() -> None:
    """Without an install, `import sidrec` finds REPO/sidrec (from the checkout's root) but not
    sidrec.model (model/) or sidrec.service (service/): add REPO to the package's search path,
    as pyproject's package-dir does for an installed copy."""
    if importlib.util.find_spec("sidrec") is None:
        sys.path.insert(0, str(REPO))
    import sidrec

    if importlib.util.find_spec("sidrec.service") is None:
        sidrec.__path__.append(str(REPO))


_map_source_packages()

from sidrec.bundle import MANIFEST, TORCH_WEIGHTS, sha256_of  # noqa: E402
from sidrec.service.retrieval import IndexSpec, ItemTable  # noqa: E402

BATCH_SIZES = "1,8,32,64,128,256"
PATHS = ("cpu path", "torch cpu", "torch cuda")
COLUMNS = (
    "path",
    "catalog",
    "batch",
    "gather p50 ms",
    "encode p50 ms",
    "top-k p50 ms",
    "p50 ms",
    "p99 ms",
    "users/s",
    "users/s vs cpu",
    "p50 vs cpu",
    "max abs diff",
    "top-k agree",
    "note",
)


class NotAvailable(Exception):
    """A path this machine cannot run; the message is the reason the table prints."""


@dataclass
class Row:
    path: str
    catalog: str
    batch: int | None  # None: the path cannot run here
    gather_p50: float | None = None
    encode_p50: float | None = None
    topk_p50: float | None = None
    p50: float | None = None
    p99: float | None = None
    users_per_s: float | None = None
    speedup: float | None = None  # users/s over the cpu path's
    p50_ratio: float | None = None  # the cpu path's p50 over this p50
    max_abs_diff: float | None = None  # user vectors, first batch, against the cpu path
    topk_agree: float | None = None  # share of the cpu path's top-k rows also returned
    note: str = ""

    def cells(self) -> list[str]:
        def num(x: float | None, fmt: str) -> str:
            return "" if x is None else format(x, fmt)

        return [
            self.path,
            self.catalog,
            "" if self.batch is None else str(self.batch),
            num(self.gather_p50, ".3f"),
            num(self.encode_p50, ".3f"),
            num(self.topk_p50, ".3f"),
            num(self.p50, ".3f"),
            num(self.p99, ".3f"),
            num(self.users_per_s, ".0f"),
            num(self.speedup, ".2f"),
            num(self.p50_ratio, ".2f"),
            num(self.max_abs_diff, ".1e"),
            num(self.topk_agree, ".3f"),
            self.note,
        ]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Model:
    """The files a path loads: user_encoder.onnx (cpu path) and model.pt (torch paths)."""

    d: int
    max_len: int
    onnx: Path | None
    weights: Path | None
    item_vectors: np.ndarray | None  # float32 [n + 1, d], the bundle's; None without one
    source: str
    missing: dict[str, str] = field(default_factory=dict)  # file -> why it cannot be used


def bundle_model(folder: Path) -> Model:
    """What the benchmark reads from a bundle, each file checked against manifest.json. Only
    these files need to be there: a GPU machine can be sent a bundle without its 90 MB
    content encoder."""
    manifest = json.loads((folder / MANIFEST).read_text())
    listed: dict[str, str] = manifest["files"]

    def checked(name: str) -> Path:
        path = folder / name
        if name not in listed:
            raise NotAvailable(f"bundle has no {name} (exported before `sidrec export` wrote it)")
        if sha256_of(path) != listed[name]:
            raise NotAvailable(f"{path}: sha256 differs from manifest.json")
        return path

    model = Model(
        d=int(manifest["model"]["d"]),
        max_len=int(manifest["model"]["max_len"]),
        onnx=None,
        weights=None,
        item_vectors=np.load(checked("item_vectors.npy")),
        source=f"bundle {manifest['version']}",
    )
    for name in ("user_encoder.onnx", TORCH_WEIGHTS):
        try:
            path = checked(name)
        except NotAvailable as e:
            model.missing[name] = str(e)
            continue
        if name == TORCH_WEIGHTS:
            model.weights = path
        else:
            model.onnx = path
    return model


def random_model(args: argparse.Namespace, folder: Path) -> Model:
    """A model of the given shape with random weights, saved as model.pt and, where the onnx
    package is installed, exported as user_encoder.onnx."""
    import torch

    from sidrec.model.hstu import HSTU
    from sidrec.model.item_embedding import ItemEmbedding
    from sidrec.model.weights import save_weights

    torch.manual_seed(args.seed)
    # The user encoder reads item vectors, not item ids: a small id table is enough.
    items = ItemEmbedding("id", num_items=16, d=args.d)
    hstu = HSTU(args.d, args.blocks, args.heads, args.d, args.d, padded_len=args.padded_len)
    model = Model(
        d=args.d,
        max_len=args.max_len,
        onnx=None,
        weights=folder / TORCH_WEIGHTS,
        item_vectors=None,
        source=(
            f"random weights: d={args.d}, {args.blocks} blocks, {args.heads} heads, "
            f"max_len={args.max_len}"
        ),
    )
    save_weights(items, hstu, None, model.weights)
    try:
        from sidrec.offline.onnx_export import export_user_encoder

        export_user_encoder(hstu, args.d, folder / "user_encoder.onnx", args.max_len)
        model.onnx = folder / "user_encoder.onnx"
    except ImportError as e:
        model.missing["user_encoder.onnx"] = f"cannot export the random model to ONNX ({e})"
    return model


def catalog_vectors(model: Model, catalog: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """(label, raw item vectors float32 [n + 1, d] with row 0 the zero padding row)."""
    if catalog == "bundle":
        if model.item_vectors is None:
            raise SystemExit("--catalogs bundle needs --bundle")
        return f"bundle {len(model.item_vectors) - 1:,}", model.item_vectors
    n = int(catalog)
    vectors = rng.normal(0.0, model.d**-0.5, size=(n + 1, model.d)).astype(np.float32)
    vectors[0] = 0.0
    return f"random {n:,}", vectors


@dataclass
class Histories:
    rows: np.ndarray  # int64 [U, N] item rows, oldest first
    timestamps: np.ndarray  # int64 [U, N]
    query_time: np.ndarray  # int64 [U]
    exclude: list[set[int]]  # [U] each user's rows


def make_histories(n_items: int, users: int, length: int, rng: np.random.Generator) -> Histories:
    rows = np.stack(
        [rng.choice(n_items, size=length, replace=length > n_items) + 1 for _ in range(users)]
    ).astype(np.int64)
    start = 1_600_000_000 + rng.integers(0, 10**7, size=(users, 1))
    timestamps = (start + 600 * np.arange(length)[None, :]).astype(np.int64)
    return Histories(rows, timestamps, timestamps[:, -1] + 600, [set(r) for r in rows.tolist()])


Encode = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class BenchPath:
    """One row kind: an encoder and an item table, or the reason it cannot run here."""

    name: str
    encode: Encode | None = None
    table: ItemTable | None = None
    note: str = ""
    unavailable: str = ""


def item_table(vectors: np.ndarray, spec: IndexSpec) -> ItemTable:
    n = len(vectors) - 1
    sids = np.zeros((n + 1, 2), np.int64)  # SIDs play no part in a search
    return ItemTable(vectors, [str(r) for r in range(1, n + 1)], sids, 1, False, spec)


def cuda_reason() -> str:
    """Why PyTorch cannot use a GPU here; "" where it can."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if torch.cuda.is_available():
        return ""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def build_path(name: str, model: Model, vectors: np.ndarray, threads: int) -> BenchPath:
    if name == "cpu path":
        if model.onnx is None:
            return BenchPath(name, unavailable=model.missing.get("user_encoder.onnx", "no ONNX"))
        try:
            from sidrec.service.runtime import CPU, OrtUserEncoder, session_options
        except ImportError as e:
            return BenchPath(name, unavailable=f"ONNX Runtime is not installed ({e})")
        encoder = OrtUserEncoder(model.onnx, session_options(threads), [CPU])
        if importlib.util.find_spec("faiss") is not None:
            return BenchPath(name, encoder.encode_users, item_table(vectors, IndexSpec("flat")))
        table = item_table(vectors, IndexSpec("torch", device="cpu"))
        note = "FAISS not installed: torch.topk on the CPU stands in (same exact ranking)"
        return BenchPath(name, encoder.encode_users, table, note=note)
    device = "cuda" if name == "torch cuda" else "cpu"
    if model.weights is None:
        return BenchPath(name, unavailable=model.missing.get(TORCH_WEIGHTS, "no model.pt"))
    if device == "cuda" and (reason := cuda_reason()):
        return BenchPath(name, unavailable=reason)
    try:
        import torch

        from sidrec.service.torch_engine import TorchModel, torch_device
    except ImportError as e:
        return BenchPath(name, unavailable=f"PyTorch is not installed ({e})")
    torch_model = TorchModel(model.weights, torch_device(device))
    table = item_table(vectors, IndexSpec("torch", device=device))
    note = f"torch {torch.__version__}"
    if device == "cuda":
        note += f", {torch.cuda.get_device_name()}"
    return BenchPath(name, torch_model.encode_users, table, note=note)


@dataclass
class Timing:
    gather: list[float] = field(default_factory=list)  # ms per batch
    encode: list[float] = field(default_factory=list)
    topk: list[float] = field(default_factory=list)

    def total(self) -> np.ndarray:
        return np.add(np.add(self.gather, self.encode), self.topk)


def run_batch(
    path: BenchPath, h: Histories, users: np.ndarray, k: int, timing: Timing | None
) -> tuple[np.ndarray, list[list[tuple[int, float]]]]:
    assert path.encode is not None and path.table is not None
    b, n = len(users), h.rows.shape[1]
    mask = np.ones((b, n), np.bool_)
    rows, stamps = h.rows[users], h.timestamps[users]
    excluded = [h.exclude[u] for u in users]
    started = time.perf_counter()
    vectors = path.table.gather(rows.reshape(-1)).reshape(b, n, -1)  # [B, N, d]
    gathered = time.perf_counter()
    user_vectors = path.encode(vectors, stamps, mask, h.query_time[users])  # [B, d]
    encoded = time.perf_counter()
    hits = path.table.search_batch(user_vectors, [k] * b, excluded)
    searched = time.perf_counter()
    if timing is not None:
        timing.gather.append(1000 * (gathered - started))
        timing.encode.append(1000 * (encoded - gathered))
        timing.topk.append(1000 * (searched - encoded))
    return user_vectors, hits


def measure(
    path: BenchPath, catalog: str, batch: int, h: Histories, args: argparse.Namespace
) -> tuple[Row, np.ndarray, list[list[tuple[int, float]]]]:
    """Row with the medians over repeats, and the first batch's user vectors and hits."""
    users_total = len(h.rows)
    cursor = 0

    def next_users() -> np.ndarray:
        nonlocal cursor
        picked = (cursor + np.arange(batch)) % users_total
        cursor = (cursor + batch) % users_total
        return picked

    first_users = np.arange(batch) % users_total
    first = run_batch(path, h, first_users, args.k, None)
    for _ in range(args.warmup):
        run_batch(path, h, next_users(), args.k, None)
    per_repeat: list[dict[str, float]] = []
    for _ in range(args.repeats):
        timing = Timing()
        for _ in range(args.iters):
            run_batch(path, h, next_users(), args.k, timing)
        total = timing.total()
        per_repeat.append(
            {
                "gather": float(np.median(timing.gather)),
                "encode": float(np.median(timing.encode)),
                "topk": float(np.median(timing.topk)),
                "p50": float(np.percentile(total, 50)),
                "p99": float(np.percentile(total, 99)),
                "users_per_s": 1000 * batch * len(total) / float(total.sum()),
            }
        )

    def median(key: str) -> float:
        return float(np.median([r[key] for r in per_repeat]))

    row = Row(
        path.name,
        catalog,
        batch,
        gather_p50=median("gather"),
        encode_p50=median("encode"),
        topk_p50=median("topk"),
        p50=median("p50"),
        p99=median("p99"),
        users_per_s=median("users_per_s"),
        note=path.note,
    )
    return row, *first


def agreement(
    hits: list[list[tuple[int, float]]], reference: list[list[tuple[int, float]]]
) -> float:
    same = sum(
        len({r for r, _ in a} & {r for r, _ in b}) for a, b in zip(hits, reference, strict=True)
    )
    return same / max(1, sum(len(b) for b in reference))


def machine_lines(args: argparse.Namespace) -> list[str]:
    lines = [f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs"]
    try:
        import torch

        cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else cuda_reason()
        lines.append(f"torch {torch.__version__}; CUDA: {cuda}")
    except ImportError:
        lines.append("torch: not installed")
    for name in ("onnxruntime", "faiss"):
        if importlib.util.find_spec(name) is None:
            lines.append(f"{name}: not installed")
        else:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
    lines.append(f"threads: {args.threads or 'library defaults'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench",
        description="Gather + user encode + top-k per batch: ONNX Runtime + FAISS on the CPU "
        "against PyTorch on the CPU and CUDA.",
    )
    p.add_argument("--bundle", type=Path, help="bundle folder (else a random-weight model)")
    p.add_argument(
        "--catalogs",
        help="comma list: 'bundle' and/or item counts; default: bundle with --bundle, "
        "else 100000,1000000",
    )
    p.add_argument("--batch-sizes", default=BATCH_SIZES)
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    p.add_argument("--history-len", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--users", type=int, default=512, help="distinct histories drawn")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per row")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed batches per repeat")
    p.add_argument(
        "--threads", type=int, default=0, help="ORT / torch / FAISS CPU threads (0 = defaults)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d", type=int, default=50, help="random model: item vector size")
    p.add_argument("--blocks", type=int, default=2, help="random model: HSTU blocks")
    p.add_argument("--heads", type=int, default=1, help="random model: attention heads")
    p.add_argument("--max-len", type=int, default=200, help="random model: longest history")
    p.add_argument("--padded-len", type=int, default=211, help="random model: padded length")
    p.add_argument("--out", type=Path, help="also write table.md and results.json here")
    args = p.parse_args(argv)
    if args.catalogs is None:
        args.catalogs = "bundle" if args.bundle else "100000,1000000"
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {', '.join(sorted(unknown))}; known: {', '.join(PATHS)}")
    return args


def set_threads(threads: int) -> None:
    if not threads:
        return
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "$ python -m loadtests.gpu_bench " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(command.rstrip(), flush=True)
    set_threads(args.threads)
    header = machine_lines(args)
    rng = np.random.default_rng(args.seed)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    wanted = [p for p in PATHS if p in args.paths.split(",")]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        model = bundle_model(args.bundle) if args.bundle else random_model(args, Path(tmp))
        header.append(f"model: {model.source}")
        print("\n".join(header), flush=True)
        length = min(args.history_len, model.max_len)  # the batcher keeps the most recent
        for catalog in args.catalogs.split(","):
            label, vectors = catalog_vectors(model, catalog.strip(), rng)
            h = make_histories(len(vectors) - 1, max(args.users, max(batch_sizes)), length, rng)
            reference: dict[int, tuple[Row, np.ndarray, list[list[tuple[int, float]]]]] = {}
            for name in wanted:
                # One path at a time: a 10^6-item table is held once, not once per path.
                path = build_path(name, model, vectors, args.threads)
                if path.unavailable:
                    note = f"not available: {path.unavailable}"
                    rows.append(Row(path.name, label, None, note=note))
                    print(f"{path.name} on {label}: {note}", file=sys.stderr, flush=True)
                    continue
                for batch in batch_sizes:
                    row, users, hits = measure(path, label, batch, h, args)
                    if path.name == "cpu path":
                        reference[batch] = (row, users, hits)
                    elif batch in reference:
                        base, base_users, base_hits = reference[batch]
                        assert base.users_per_s and row.users_per_s and base.p50 and row.p50
                        row.speedup = row.users_per_s / base.users_per_s
                        row.p50_ratio = base.p50 / row.p50
                        row.max_abs_diff = float(np.abs(users - base_users).max())
                        row.topk_agree = agreement(hits, base_hits)
                    rows.append(row)
                    print(
                        f"{path.name} on {label}, batch {batch}: p50 {row.p50:.3f} ms, "
                        f"{row.users_per_s:.0f} users/s",
                        file=sys.stderr,
                        flush=True,
                    )
                del path  # its item rows (GPU memory too) go before the next path's arrive
    table = markdown(rows)
    print()
    print(table)
    print(
        f"\nk={args.k}, histories of {length} items, {args.repeats} repeats x {args.iters} "
        f"batches (+{args.warmup} warm-up) per row; medians over repeats; ratios against the "
        "cpu path at the same batch size (users/s: >1 = more users per second; p50: >1 = faster)."
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(
            command + "\n\n" + "\n".join(header) + "\n\n" + table + "\n"
        )
        results: dict[str, Any] = {
            "command": command,
            "machine": header,
            "rows": [asdict(r) for r in rows],
        }
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
