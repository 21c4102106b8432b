"""Item representations: item-id table, Semantic-ID tables, or both fused.

Rows are 1..num_items, row 0 is padding and always maps to a zero vector. `sids` is an int64
tensor [num_items + 1, L + 1]: L semantic codes in [0, K) plus a dedup digit.

Variants (after the hstu-semantic-id fork of GR):
  id           nn.Embedding over rows, plus one learned "unknown item" row
  sid-prefixn  sum over p = 1..L of a hashed row for the prefix (c_1..c_p), one shared table
  sid-rqsum    sum over layers l of row c_l + l * K of an L * K table
  hybrid       prefixn + id, fused by `sum` (E_sid + E_id) or `alpha` (a E_sid + (1 - a) E_id)
An item that was never trained (or whose id is dropped) uses the unknown row as its id part,
so its vector comes from its SID alone.
"""

import torch
from torch import nn

VARIANTS = ("id", "sid-prefixn", "sid-rqsum", "hybrid")
FUSIONS = ("sum", "alpha")


def _init_table(weight: torch.Tensor) -> None:
    # The reference's truncated normal: std 0.02, cut at 2 std.
    nn.init.trunc_normal_(weight, std=0.02, a=-0.04, b=0.04)


def next_prime(n: int) -> int:
    """Smallest prime >= n (trial division; n is about a catalog size)."""
    n = max(n, 2)
    while any(n % f == 0 for f in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def prefix_rows(codes: torch.Tensor, codes_per_layer: int, table_size: int) -> torch.Tensor:
    """Hashed table row of every prefix: codes [..., L] -> rows [..., L], column p-1 = prefix p.

    The prefix (c_1..c_p) is numbered in bijective base K, h_p = h_{p-1} * K + c_p + 1, which
    gives every prefix of every length its own number (so (3) and (0, 3) do not collide the
    way plain base-K values do); the row is that number mod table_size, reduced at each step
    so it never overflows.
    """
    rows = []
    h = torch.zeros_like(codes[..., 0])
    for p in range(codes.shape[-1]):
        h = (h * codes_per_layer + codes[..., p] + 1) % table_size
        rows.append(h)
    return torch.stack(rows, dim=-1)


class ItemEmbedding(nn.Module):
    """rows[...] -> raw item vectors [..., d]; see the module docstring for the variants.

    id_dropout p (training only): in each forward call every catalog row independently loses
    its id part with probability p, i.e. the whole item looks new for that call (all its
    occurrences as input, positive or negative alike) rather than a random subset of its
    occurrences. That is what a truly new item looks like, and it trains the unknown row and
    the SID part to stand in for the id. The sid-only variants have no id part to drop.
    """

    def __init__(
        self,
        variant: str,
        num_items: int,
        d: int,
        sids: torch.Tensor | None = None,
        codes_per_layer: int | None = None,
        sid_layers: int | None = None,
        fusion: str = "sum",
        id_dropout: float = 0.0,
        prefix_table_size: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not 0.0 <= id_dropout <= 1.0:
            raise ValueError(f"id_dropout must be in [0, 1], got {id_dropout}")
        self.variant = variant
        self.num_items = num_items
        self.d = d
        self.fusion = fusion
        self.id_dropout = id_dropout

        self.id_emb: nn.Embedding | None = None
        if variant in ("id", "hybrid"):
            # rows 1..n items, row n + 1 the unknown item; row 0 padding stays zero.
            self.id_emb = nn.Embedding(num_items + 2, d, padding_idx=0)
            _init_table(self.id_emb.weight.data[1:])

        self.sid_emb: nn.Embedding | None = None
        self.sid_layers = 0
        self.codes_per_layer = 0
        if variant != "id":
            if sids is None or codes_per_layer is None:
                raise ValueError(f"variant {variant!r} needs sids and codes_per_layer")
            if sids.shape[0] != num_items + 1 or sids.dim() != 2:
                raise ValueError(f"sids must be [num_items + 1, L + 1], got {tuple(sids.shape)}")
            available = sids.shape[1] - 1  # last column is the dedup digit
            self.sid_layers = available if sid_layers is None else sid_layers
            if not 1 <= self.sid_layers <= available:
                raise ValueError(f"sid_layers must be in [1, {available}], got {sid_layers}")
            self.codes_per_layer = codes_per_layer
            if variant == "sid-rqsum":
                self.table_size = self.sid_layers * codes_per_layer
            else:
                # Default: a prime about the catalog size (the reference used 4,007 rows for
                # ML-1M's 3,952 ids); prime so the mod spreads the structured prefix numbers.
                self.table_size = prefix_table_size or next_prime(num_items + 1)
            self.sid_emb = nn.Embedding(self.table_size, d)
            _init_table(self.sid_emb.weight.data)
            # Only the semantic codes are used, never the dedup digit: an item that shares
            # its code tuple with a trained item reads exactly that item's (trained) rows,
            # and any new item's short prefixes are rows shared with many trained items.
            # A full tuple nobody had before hashes to some row that may be untrained.
            self.register_buffer("sid_rows", self._sid_rows(sids.long()), persistent=False)

        self.alpha: nn.Parameter | None = None
        if variant == "hybrid" and fusion == "alpha":
            self.alpha = nn.Parameter(torch.tensor(0.5))

    @property
    def uses_sid(self) -> bool:
        return self.sid_emb is not None

    @property
    def unknown_row(self) -> int:
        return self.num_items + 1

    def _sid_rows(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [..., >= L] -> SID table rows [..., L]
        codes = codes[..., : self.sid_layers]
        if self.variant == "sid-rqsum":
            offsets = torch.arange(self.sid_layers, device=codes.device) * self.codes_per_layer
            return codes + offsets
        return prefix_rows(codes, self.codes_per_layer, self.table_size)

    def _fuse(self, sid_part: torch.Tensor | None, id_part: torch.Tensor | None) -> torch.Tensor:
        if sid_part is None:
            return id_part
        if id_part is None:
            return sid_part
        if self.alpha is not None:
            return self.alpha * sid_part + (1 - self.alpha) * id_part
        return sid_part + id_part

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # rows [...] int64 in [0, num_items] -> [..., d]
        id_part = None
        if self.id_emb is not None:
            id_rows = rows
            if self.training and self.id_dropout > 0:
                dropped = torch.rand(self.num_items + 1, device=rows.device) < self.id_dropout
                id_rows = torch.where(dropped[rows], self.unknown_row, rows)
            id_part = self.id_emb(id_rows)
        sid_part = None
        if self.sid_emb is not None:
            sid_part = self.sid_emb(self.sid_rows[rows]).sum(-2)
        out = self._fuse(sid_part, id_part)
        return out * (rows != 0)[..., None].to(out.dtype)

    @torch.no_grad()
    def table(self, trained: torch.Tensor) -> torch.Tensor:
        """Every row's vector [num_items + 1, d], no dropout; untrained rows get the unknown
        id part (so they equal from_sid of their codes). trained: bool [num_items + 1]."""
        device = next(self.parameters()).device
        trained = trained.to(device)
        rows = torch.arange(self.num_items + 1, device=device)
        id_part = None
        if self.id_emb is not None:
            id_part = self.id_emb(torch.where(trained, rows, self.unknown_row))
        sid_part = None
        if self.sid_emb is not None:
            sid_part = self.sid_emb(self.sid_rows).sum(-2)
        out = self._fuse(sid_part, id_part)
        out[0] = 0.0
        return out

    def from_sid(self, codes: torch.Tensor) -> torch.Tensor:
        """Vector of an item known only by its SID: codes [B, L + 1] int64 -> [B, d]."""
        id_part = None
        if self.id_emb is not None:
            unknown = self.id_emb.weight[self.unknown_row]  # [d]
            id_part = unknown.expand(codes.shape[0], self.d)
        sid_part = None
        if self.sid_emb is not None:
            sid_part = self.sid_emb(self._sid_rows(codes)).sum(-2)
        return self._fuse(sid_part, id_part)


class SidToVector(nn.Module):
    """ONNX graph for cold items: codes [B, L + 1] int64 -> vectors [B, d]."""

    def __init__(self, item_embedding: ItemEmbedding) -> None:
        super().__init__()
        self.item_embedding = item_embedding

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.item_embedding.from_sid(codes)
