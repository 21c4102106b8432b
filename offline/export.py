"""Write the bundle the service loads (docs/bundle.md) from a trained checkpoint."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidrec.bundle import TORCH_WEIGHTS, load_bundle, write_manifest
from sidrec.content_term import ContentTerm
from sidrec.item_text import item_text
from sidrec.model.weights import save_weights
from sidrec.offline.content import content_encoder_files
from sidrec.offline.data.dataset import Interactions
from sidrec.offline.new_items import (
    content_part_kind,
    load_content_term,
    load_item_features,
    load_new_item_scale,
)
from sidrec.offline.onnx_export import (
    export_item_vector,
    export_sid_to_vector,
    export_user_encoder,
)
from sidrec.offline.tower import item_table, load_tower
from sidrec.offline.train import load_checkpoint
from sidrec.sid_codebook import Codebooks

POPULAR_LIST = 1000
# items.jsonl keeps an item's fields up to this many characters (see below).
MAX_FILTER_FIELD = 200


def export_bundle(
    checkpoint: Path,
    data: Interactions,
    codebooks: Codebooks,
    out_dir: Path,
    cache_dir: Path,
    metrics: dict[str, Any] | None = None,
    variant_name: str | None = None,
    content: np.ndarray | None = None,
    content_precision: str = "fp32",
) -> Path:
    """Export `checkpoint` (offline/train.py) as a bundle folder; returns its path.

    A content tower saved beside the checkpoint (offline/tower.py) goes into the bundle: its
    table is item_vectors.npy and item_vector.onnx makes new items' vectors; it needs the
    catalog's `content` vectors float32 [n, C], as does a content term (offline/new_items.py),
    whose unit vectors (content vectors, and the items' genres and years where the term reads
    them) go in as item_content.npy. `content_precision` picks the content
    encoder graph, the one the catalog's content vectors (and so the SIDs) were made with.

    The folder is written next to `out_dir` first and renamed into place, so a half-written
    bundle never sits where the service looks.
    """
    model, cfg, ckpt = load_checkpoint(checkpoint)
    if ckpt["num_items"] != data.num_items:
        raise ValueError(
            f"{checkpoint} was trained on {ckpt['num_items']} items, data has {data.num_items}"
        )
    sids = ckpt["sids"]
    if sids is None:
        raise ValueError(f"{checkpoint} has no SIDs; every bundle needs them for new items")
    trained = torch.as_tensor(ckpt["trained"], dtype=torch.bool)
    counts = np.asarray(ckpt["train_counts"])

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tower = load_tower(Path(checkpoint).parent)
    if tower is not None and content is None:
        raise ValueError(f"{checkpoint} has a content tower: export_bundle needs the content")
    term = ContentTerm() if tower is not None else load_content_term(Path(checkpoint).parent)
    features = None if tower is not None else load_item_features(Path(checkpoint).parent)
    if features is not None and model.items.content_dim != codebooks.dim + features.dim:
        raise ValueError(
            f"{checkpoint}: its content part reads {model.items.content_dim} numbers, not the "
            f"content vector's {codebooks.dim} and the item features' {features.dim}"
        )
    if term.active and content is None:
        raise ValueError(f"{checkpoint} has a content term: export_bundle needs the content")
    with torch.no_grad():
        table = model.items.table(trained)  # [n + 1, d]
        if tower is not None:
            # untrained items' score scale and offset are the manifest's new_item_score_*
            table = item_table(table, tower, sids, content, trained).table
    np.save(tmp / "item_vectors.npy", table.numpy().astype(np.float32))
    if term.active:
        assert content is not None
        unit = term.vectors(content, data.catalog.fields)  # [n, C'], unit rows
        rows = np.concatenate([np.zeros_like(unit[:1]), unit])  # row 0: padding
        np.save(tmp / "item_content.npy", rows.astype(np.float32))
    # After table(): it records which SID rows trained items read, and model.pt keeps that.
    save_weights(model.items, model.encoder, torch.as_tensor(sids), tmp / TORCH_WEIGHTS, tower)
    export_user_encoder(model.encoder, cfg.d, tmp / "user_encoder.onnx", cfg.max_len)
    if tower is not None:
        export_item_vector(tower, tmp / "item_vector.onnx")
    else:
        export_sid_to_vector(model.items, tmp / "sid_to_vector.onnx")
    codebooks.save(tmp / "sid_codebooks.npz")

    catalog = data.catalog
    with (tmp / "items.jsonl").open("w", encoding="utf-8") as f:
        for i, item_id in enumerate(catalog.ids):
            row = i + 1
            record = {
                "item_id": item_id,
                "row": row,
                "sid": [int(c) for c in sids[row]],
                "title": catalog.titles[i],
                "text": item_text(catalog.titles[i], catalog.fields[i]),
                "popularity": int(counts[row]),
                # Short fields only (genres, year, ...): what recommend's filter compares.
                # Long ones (a plot) are in `text` already and no one filters on them.
                "fields": {
                    k: v for k, v in catalog.fields[i].items() if len(v) <= MAX_FILTER_FIELD
                },
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    encoder_dir, content_info = content_encoder_files(cache_dir, content_precision)
    for name in ("content_encoder.onnx", "tokenizer.json"):
        shutil.copy2(encoder_dir / name, tmp / name)

    order = np.argsort(-counts[1:], kind="stable")[:POPULAR_LIST]
    popular = [catalog.ids[i] for i in order if counts[i + 1] > 0]
    now = datetime.now(UTC)
    variant = variant_name or cfg.variant
    manifest = {
        "version": f"{data.name}-{variant}-{now:%Y%m%dT%H%M%SZ}",
        "created": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "dataset": {
            "name": data.name,
            "users": len(data.users),
            "items": data.num_items,
            "events": data.num_events,
            "time_source": data.time_source,
            "tie_order": data.tie_order,
        },
        "model": {
            "variant": cfg.variant,
            "fusion": cfg.fusion,
            "d": cfg.d,
            "num_blocks": cfg.num_blocks,
            "num_heads": cfg.num_heads,
            "dqk": cfg.dqk,
            "dv": cfg.dv,
            "max_len": cfg.max_len,
            "padded_len": cfg.padded_len,
            "use_time": cfg.use_time,
            "attn_norm": cfg.attn_norm,
            "ffn_mult": cfg.ffn_mult,
            "attention": cfg.attention,
            "norm": cfg.norm,
            # how the service ranks: cosine (unit item rows) or dot (raw rows), as trained
            "scoring": cfg.scoring,
            "id_dropout": cfg.id_dropout,
            # how it was trained: the resolved loss (train.py), so a user sees which was used
            "loss": cfg.loss,
            "num_negatives": cfg.num_negatives,
            "temperature": cfg.temperature,
            "dropout": cfg.dropout,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "sid_weight_decay": cfg.sid_weight_decay,  # null: weight_decay's
            "sid_gate": cfg.sid_gate,  # the SID part scaled per training-count bucket
            "best_epoch": ckpt["epoch"],
            # how new items get vectors: a content tower (SID + content), the SID plus a content
            # part in place of the id row (model/item_embedding.py), or the SID alone
            "new_items": "content-tower"
            if tower is not None
            else ("sid+content" if model.items.has_content_part else "sid"),
            # which content part stands in for a new item's id row: a ridge map of its content
            # vector, or its content neighbours' id rows (offline/new_items.py); null: none
            "new_item_content_part": content_part_kind(model.items),
            # the genres and years the content part reads beside the content vector
            # (sidrec/item_features.py): the graph's content input is both; null: the vector
            "new_item_content_features": features.record() if features is not None else None,
            # a new item's score is its cosine (dot product) times the scale minus the offset
            # (the service's index rows)
            "new_item_score_scale": round(
                load_new_item_scale(Path(checkpoint).parent)
                if tower is None
                else float(tower.new_item_scale),
                6,
            ),
            "new_item_score_offset": (
                0.0 if tower is None else round(float(tower.new_item_offset), 6)
            ),
            # plus this weight * cos(the history's mean content, the item's content), from
            # item_content.npy and the ingested items' content vectors (0: no term); the
            # items with 1..rare_item_max_count training events get rare_item_content_weight;
            # content_term_features: the genres and years the cosine reads beside the content
            # vector (item_content.npy holds both), null: the vector alone;
            # content_term_centre: the catalog's mean of those (unit) vectors, subtracted
            # before the cosine, null: not centred
            **term.record(),
            # which codes a new item's SID graph reads: its own, or the nearest path that the
            # trained items have (offline/new_items.py), the SID it is given staying its own
            "new_item_codes": "nearest-trained-path"
            if tower is None and model.items.untrained_sid_rows is not None
            else "own",
        },
        "sid": {
            "layers": codebooks.layers,
            "codes": codebooks.codes,
            "dim": codebooks.dim,
            "normalize_residuals": codebooks.normalize_residuals,
        },
        "content": content_info,
        "metrics": metrics or {},
        "popular": popular,
    }
    write_manifest(tmp, manifest)
    load_bundle(tmp)  # the service's own check, before the bundle replaces anything
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir
