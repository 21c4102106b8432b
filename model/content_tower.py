"""Item vectors in the id space for items without a trained id, from Semantic ID and content.

A warm item's trained id row is the best vector it can have, so it keeps that row untouched.
An item the recommender never trained (new in the service, withheld for evaluation) gets

    tower(item) = scale * normalize(sum_p prefix_row(c_1..c_p) + mlp(content))
                  [* exp(g(direction)), learned_norm only]

The prefix rows carry what items of one SID prefix have in common (the exact prefix trie of
item_embedding.py: a prefix no trained item has contributes nothing); the content term
separates items within a prefix, so two distinct texts never share a vector. `scale` is the
median norm of the trained id rows, so a tower vector enters the user encoder at the size the
encoder saw in training. The tower is fitted after the recommender, towards the fixed id rows
(offline/tower.py), and never changes them.

Under dot scoring an item's norm carries how often it is the answer; `learned_norm` adds a
head that predicts each new item's norm from its direction, regressed on the trained items'
id-row norms (offline/tower.py), so an item whose content looks rarely chosen comes in
shorter.

A tower vector is a guess from content where an id row is learnt from behaviour, and it is
fitted with new items as the answer far more often than they are in service, so the two do
not score on one scale: a new item's score is `new_item_scale` * score - `new_item_offset`.
The offset (in score units; the log of how much the fitting over-rates new items, for a
softmax-trained model) is chosen on validation (offline/tower.py); the scale stays 1 for new
towers and is kept for bundles fitted before the offset.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sidrec.model.item_embedding import prefix_trie, trie_rows


class ContentTower(nn.Module):
    def __init__(
        self,
        prefix_child: torch.Tensor,
        num_prefix_rows: int,
        sid_layers: int,
        content_dim: int,
        d: int,
        hidden: int = 256,
        learned_norm: bool = False,
    ) -> None:
        # prefix_child: the trie of item_embedding.prefix_trie; content_dim: the content
        # vector's size (384 for MiniLM)
        super().__init__()
        self.register_buffer("prefix_child", prefix_child.long())
        self.sid_layers = sid_layers
        self.prefix_emb = nn.Embedding(num_prefix_rows, d, padding_idx=0)  # 0: no such prefix
        nn.init.zeros_(self.prefix_emb.weight)
        self.content = nn.Sequential(
            nn.Linear(content_dim, hidden), nn.GELU(), nn.Linear(hidden, d)
        )  # fmt: skip
        # log of the norm's factor over `scale`, from the unit direction [d] -> [1]
        self.norm_head = nn.Linear(d, 1) if learned_norm else None
        if self.norm_head is not None:
            nn.init.zeros_(self.norm_head.weight)
            nn.init.zeros_(self.norm_head.bias)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("new_item_scale", torch.tensor(1.0))
        self.register_buffer("new_item_offset", torch.tensor(0.0))

    @classmethod
    def for_catalog(
        cls, catalog_codes: torch.Tensor, codes_per_layer: int, content_dim: int, d: int,
        hidden: int = 256, learned_norm: bool = False,
    ) -> "ContentTower":  # fmt: skip
        """A tower with a prefix row for every prefix of catalog_codes int64 [n, L] (the
        semantic codes, no dedup digit)."""
        child, num_rows = prefix_trie(catalog_codes.long(), codes_per_layer)
        return cls(child, num_rows, catalog_codes.shape[1], content_dim, d, hidden, learned_norm)

    @classmethod
    def empty(
        cls, num_prefix_rows: int, trie_lines: int, codes_per_layer: int, sid_layers: int,
        content_dim: int, d: int, hidden: int, learned_norm: bool = False,
    ) -> "ContentTower":  # fmt: skip
        """A tower of the given shape, to load a state dict into (model/weights.py)."""
        child = torch.zeros(trie_lines, codes_per_layer, dtype=torch.int64)
        return cls(child, num_prefix_rows, sid_layers, content_dim, d, hidden, learned_norm)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # towers saved before the offset existed score new items without one
        state_dict.setdefault(prefix + "new_item_offset", torch.tensor(0.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def prefix_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [B, >= L] int64 -> one vector per prefix depth [B, L, d] (zero where absent)
        rows = trie_rows(codes[:, : self.sid_layers].long(), self.prefix_child)
        return self.prefix_emb(rows)

    def direction(
        self, codes: torch.Tensor, content: torch.Tensor, depth_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        # codes [B, >= L] int64, content [B, C] float -> unit vectors [B, d]; depth_keep
        # [B, L] (fitting only) zeroes the prefix depths it marks False
        prefixes = self.prefix_vectors(codes)
        if depth_keep is not None:
            prefixes = prefixes * depth_keep[..., None].to(prefixes.dtype)
        return F.normalize(prefixes.sum(1) + self.content(content), dim=-1, eps=1e-6)

    def log_norm(self, direction: torch.Tensor) -> torch.Tensor:
        # unit vectors [B, d] -> log of the norm over `scale` [B, 1] (0 without learned_norm)
        if self.norm_head is None:
            return torch.zeros_like(direction[:, :1])
        return self.norm_head(direction).clamp(-3.0, 3.0)

    def forward(
        self, codes: torch.Tensor, content: torch.Tensor, depth_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        # codes [B, >= L] int64, content [B, C] float -> [B, d] with norm `scale` (times the
        # learned factor)
        direction = self.direction(codes, content, depth_keep)
        if self.norm_head is None:
            return direction * self.scale
        return direction * (self.scale * torch.exp(self.log_norm(direction)))


class TowerVector(nn.Module):
    """ONNX graph for new items: (codes [B, L + 1] int64, content [B, C] float) -> [B, d]."""

    def __init__(self, tower: ContentTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, codes: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return self.tower(codes, content)
