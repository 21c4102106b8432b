"""The bundle's PyTorch weights (model.pt): what the service's torch engine runs.

One file holds the item embedding and the HSTU encoder, each as its constructor arguments
plus its state dict, the SID table the item embedding was built on (its prefix trie and
SID rows are derived from the SIDs, not saved), and the content tower when the model has one
(model/content_tower.py: then it, not the item embedding, makes new items' vectors). Only
tensors, numbers, strings and dicts, so it loads with `torch.load(weights_only=True)`: a
bundle file never runs code on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .content_tower import ContentTower
from .hstu import HSTU, UserEncoder
from .item_embedding import ItemEmbedding

FORMAT = 1


def item_embedding_args(items: ItemEmbedding) -> dict[str, Any]:
    """The keyword arguments that rebuild `items` (sids apart)."""
    return {
        "variant": items.variant,
        "num_items": items.num_items,
        "d": items.d,
        "codes_per_layer": items.codes_per_layer or None,
        "sid_layers": items.sid_layers or None,
        "fusion": items.fusion,
        "id_dropout": items.id_dropout,
        # hashed prefix tables need their size; exact and rqsum tables compute theirs
        "prefix_table_size": getattr(items, "table_size", None),
        "unknown_id": items.unknown_id,
        "prefix_table": items.prefix_table,
        "hybrid_sid": items.sid_scheme,
        "trained_rows_only": items.trained_rows_only,
    }


def hstu_args(hstu: HSTU) -> dict[str, Any]:
    """The keyword arguments that rebuild `hstu`."""
    first = hstu.blocks[0]
    return {
        "d": hstu.d,
        "num_blocks": len(hstu.blocks),
        "num_heads": first.num_heads,
        "dqk": first.dqk,
        "dv": first.dv,
        "padded_len": hstu.padded_len,
        "dropout": hstu.dropout,
        "time_buckets": first.rel_bias.num_buckets,
        "use_time": hstu.use_time,
        "attn_norm": hstu.attn_norm,
        "ffn_mult": first.ffn_mult,
        "attn_dropout": first.attn_dropout,
        "attention": first.attention,
        "norm": hstu.norm,
        "scoring": hstu.scoring,
    }


def content_tower_args(tower: ContentTower) -> dict[str, Any]:
    """The keyword arguments that rebuild `tower` (its prefix trie is in its state dict)."""
    first, last = tower.content[0], tower.content[-1]
    return {
        "num_prefix_rows": tower.prefix_emb.num_embeddings,
        "trie_lines": tower.prefix_child.shape[0],
        "codes_per_layer": tower.prefix_child.shape[1],
        "sid_layers": tower.sid_layers,
        "content_dim": first.in_features,
        "d": last.out_features,
        "hidden": first.out_features,
        "learned_norm": tower.norm_head is not None,
    }


def save_weights(
    items: ItemEmbedding,
    hstu: HSTU,
    sids: torch.Tensor | None,
    path: Path,
    tower: ContentTower | None = None,
) -> None:
    """Write model.pt. sids: int64 [num_items + 1, L + 1], what `items` was built on (None
    for the id variant, which reads no SIDs)."""
    if items.uses_sid and sids is None:
        raise ValueError(f"variant {items.variant!r} reads SIDs: save_weights needs them")
    torch.save(
        {
            "format": FORMAT,
            "item_embedding": item_embedding_args(items),
            "hstu": hstu_args(hstu),
            "sids": None if sids is None else torch.as_tensor(sids, dtype=torch.int64).cpu(),
            "item_embedding_state": {k: v.cpu() for k, v in items.state_dict().items()},
            "hstu_state": {k: v.cpu() for k, v in hstu.state_dict().items()},
            "content_tower": None if tower is None else content_tower_args(tower),
            "content_tower_state": None
            if tower is None
            else {k: v.cpu() for k, v in tower.state_dict().items()},
        },
        path,
    )


def load_weights(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[ItemEmbedding, UserEncoder, ContentTower | None]:
    """model.pt -> (item embedding, user encoder, content tower or None), in eval mode on
    `device`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ValueError(
            f"{path}: weights format {saved.get('format')!r}, this sidrec reads {FORMAT}"
        )
    items = ItemEmbedding(**saved["item_embedding"], sids=saved["sids"])
    items.load_state_dict(saved["item_embedding_state"])
    hstu = HSTU(**saved["hstu"])
    hstu.load_state_dict(saved["hstu_state"])
    tower = None
    if saved.get("content_tower") is not None:
        tower = ContentTower.empty(**saved["content_tower"])
        tower.load_state_dict(saved["content_tower_state"])
        tower = tower.to(device).eval()
    return items.to(device).eval(), UserEncoder(hstu).to(device).eval(), tower
