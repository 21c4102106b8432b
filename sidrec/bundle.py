"""The model bundle: what `sidrec export` writes and `sidrec serve` loads (docs/bundle.md).

Torch-free on purpose: the service imports this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.content_term import ContentTerm
from sidrec.item_features import ItemFeatures

FORMAT = 1
MANIFEST = "manifest.json"
# Every bundle has these; the manifest may list more (e.g. tokenizer side files).
REQUIRED_FILES = (
    "user_encoder.onnx",
    "item_vectors.npy",
    "items.jsonl",
    "sid_codebooks.npz",
    "content_encoder.onnx",
    "tokenizer.json",
)
# The graph that makes a new item's vector: one of these, the first preferred. A model with a
# content tower reads the SID and the content vector (item_vector.onnx); others read the SID
# only (sid_to_vector.onnx).
NEW_ITEM_GRAPHS = ("item_vector.onnx", "sid_to_vector.onnx")
# The PyTorch weights, for SIDREC_ENGINE=torch only: bundles exported before it have none and
# still serve with ONNX Runtime.
TORCH_WEIGHTS = "model.pt"


class BundleError(RuntimeError):
    """The bundle is missing, incomplete or altered. The message names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the folder into `manifest["files"]` and write manifest.json."""
    files = sorted(p for p in bundle_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    missing = [name for name in REQUIRED_FILES if not (bundle_dir / name).is_file()]
    if not any((bundle_dir / name).is_file() for name in NEW_ITEM_GRAPHS):
        missing.append(" or ".join(NEW_ITEM_GRAPHS))
    if missing:
        raise BundleError(f"{bundle_dir}: cannot write a manifest, missing {', '.join(missing)}")
    manifest = {**manifest, "format": FORMAT, "files": {p.name: sha256_of(p) for p in files}}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    row: int
    sid: tuple[int, ...]
    title: str
    text: str
    popularity: int
    # The item's short catalog fields ({"genres": "Comedy|Drama", "year": "1995"}), what
    # recommend's `filter` reads; bundles exported before this have none.
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def content_quantized(self) -> bool:
        """Whether content_encoder.onnx is the int8 graph (docs/bundle.md, content.precision;
        absent in older bundles: fp32)."""
        return self.manifest["content"].get("precision") == "int8"

    @property
    def new_item_graph(self) -> str:
        """The file name of the graph for new items' vectors (NEW_ITEM_GRAPHS)."""
        return next(name for name in NEW_ITEM_GRAPHS if self.lists(name))

    def lists(self, name: str) -> bool:
        """Whether manifest.json lists the file (so load_bundle checked its sha256)."""
        return name in self.manifest.get("files", {})

    def item_vectors(self) -> np.ndarray:
        """float32 [n + 1, d], raw vectors, row 0 padding."""
        return np.load(self.file("item_vectors.npy"))

    @property
    def content_term(self) -> ContentTerm:
        """The content term's weights (docs/bundle.md; none for bundles without one)."""
        return ContentTerm.from_record(self.model)

    @property
    def item_features(self) -> ItemFeatures | None:
        """The genres and years a new item's vector reads beside its content vector (docs/
        bundle.md, model.new_item_content_features); None: the content vector alone."""
        record = self.model.get("new_item_content_features")
        return ItemFeatures.from_record(record) if record else None

    @property
    def new_item_content_dim(self) -> int:
        """Numbers the new-item graph's content input holds per item."""
        features = self.item_features
        return int(self.manifest["content"]["dim"]) + (features.dim if features else 0)

    def item_content(self) -> np.ndarray | None:
        """float32 [n + 1, C'] the unit vectors the content term reads (the content vectors,
        extended with the items' genres and years where content_term.features), row 0 zeros,
        for a bundle with a content term; None for one without."""
        if not self.content_term.active:
            return None
        if not self.lists("item_content.npy"):
            raise BundleError(f"{self.path}: a content term without item_content.npy")
        return np.load(self.file("item_content.npy"))

    def items(self) -> list[ItemRecord]:
        """Rows 1..n in order."""
        records = []
        with self.file("items.jsonl").open(encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                records.append(
                    ItemRecord(
                        item_id=str(obj["item_id"]),
                        row=int(obj["row"]),
                        sid=tuple(int(c) for c in obj["sid"]),
                        title=obj.get("title", ""),
                        text=obj.get("text", ""),
                        popularity=int(obj.get("popularity", 0)),
                        fields={str(k): str(v) for k, v in obj.get("fields", {}).items()},
                    )
                )
        return records


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Open a bundle folder, checking every file's sha256 against manifest.json.

    Raises BundleError naming the first file that is missing or differs.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: not found; is {path} a sidrec bundle?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{manifest_path}: bundle format {manifest.get('format')!r}, this sidrec reads {FORMAT}"
        )
    files: dict[str, str] = manifest.get("files", {})
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{manifest_path}: does not list required file {name}")
    if not any(name in files for name in NEW_ITEM_GRAPHS):
        raise BundleError(
            f"{manifest_path}: does not list required file {' or '.join(NEW_ITEM_GRAPHS)}"
        )
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"{file_path}: listed in manifest.json but missing")
        if verify and sha256_of(file_path) != expected:
            raise BundleError(
                f"{file_path}: sha256 differs from manifest.json (altered or partial)"
            )
    return Bundle(path=path, manifest=manifest)
