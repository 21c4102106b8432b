"""Item representations: item-id table, Semantic-ID tables, or both fused.

Rows are 1..num_items, row 0 is padding and always maps to a zero vector. `sids` is an int64
tensor [num_items + 1, L + 1]: L semantic codes in [0, K) plus a dedup digit.

Variants (after the hstu-semantic-id fork of GR):
  id           nn.Embedding over rows
  sid-prefixn  sum over p = 1..L of a row for the prefix (c_1..c_p), one shared table
  sid-rqsum    sum over layers l of row c_l + l * K of an L * K table
  hybrid       prefixn (or rqsum) + id, fused by `sum` (E_sid + E_id), `alpha`
               (a E_sid + (1 - a) E_id) or `switch` (E_id where the item has a trained,
               undropped id, else E_sid: the SID is a cold-start fallback in the id space,
               and never shares rows with a warm item's vector). ML-1M (H100 run,
               docs/results/ml-1m-h100-partial.md): summing the SID into every item
               cost a quarter of id-only's test NDCG@10; switch, 15 epochs on CPU, cost
               10% but found new items far less often (cold-start HR@10 0.004 vs 0.024
               for sum)

Content part (hybrid sum only): a warm item's vector is its SID part plus its trained id row;
an item without a trained id gets, in place of the id row, a guess from its content vector
(offline/new_items.py): a linear map fitted to the warm items' id rows (attach_content_map),
or the id rows of its content neighbours, the k trained items whose content vectors are
nearest by cosine, weighted by softmax(cosine / temperature) (attach_content_neighbours). The
map guesses the average; the neighbours carry a sequel's or a near-duplicate's audience, which
no linear map of the text does. The neighbours' cosine may be taken about a centre, the
catalog's mean unit vector, as the content term's is (sidrec/content_term.py): one catalog's
text vectors share a large common direction, which otherwise makes the most typical items
everyone's neighbours. Without a content part, items with one semantic code tuple share one
vector; with one, distinct texts get distinct vectors.

Frequency gate (sid_gate, hybrid sum only): the SID part is scaled by 1 + g[b], one learned
scalar per bucket b = min(floor(log2(1 + training events)), GATE_BUCKETS - 1), meant to let
training turn the shared SID rows down for popular items. An item without an id part
(untrained, or id-dropped in training) reads bucket 0. g starts at 0: the plain sum. On Amazon
Toys training scaled every bucket up instead and peaked earlier (docs/results/content-tower.md,
fifteenth session): an ablation, not a default.

Cold start: an item that was never trained (withheld, or new in the service) or whose id is
dropped in training has no id part, so its vector comes from its SID alone. The defaults are
the ones that make that vector useful (ML-100K, docs/internals.md):
  unknown_id="zero"        the missing id part is zero, not one learned "unknown" row shared
                           by every new item (which dragged them all towards one point)
  prefix_table="exact"     one row per prefix that occurs in the catalog (no hash collisions
                           between unrelated prefixes), and row 0, always zero, for a prefix
                           no catalog item has: a new tuple is the sum of the shorter prefixes
                           it shares with the catalog. "hashed" is the reference's table,
                           prefix number mod a prime about the catalog size
  trained_rows_only=True   in table() and from_sid, a SID row that no trained item reads (it
                           still holds its random init) contributes nothing
  attach_untrained_codes   (after training, where validation prefers it) an untrained item
                           reads the rows of the nearest code path that trained items have,
                           not its own path, whose deeper prefixes often no trained item shares
ML-100K hybrid-sum, id_dropout 0.2, validation, mean of 5 runs (seeds 0-2 x 20 epochs, 0-1 x
40), old defaults (learned, hashed, all rows) -> these: cold-start HR@10 0.13 -> 0.24, HR@50
0.23 -> 0.43; a withheld item's median rank for a user of 8 items sharing its longest prefix
93 -> 6. The price: warm NDCG@10 0.098 -> 0.091, because cold items now compete (13-17% of
top-10 slots vs 5% of the catalog); trained_rows_only=False gives that back (and most of the
cold gain with it).
"""

import torch
from torch import nn

VARIANTS = ("id", "sid-prefixn", "sid-rqsum", "hybrid")
FUSIONS = ("sum", "alpha", "switch")
UNKNOWN_IDS = ("learned", "zero")
PREFIX_TABLES = ("hashed", "exact")
GATE_BUCKETS = 16  # floor(log2(1 + events)): 0, 1-2, 3-6, 7-14, ..., >= 2^15 - 1


def gate_buckets(train_counts: torch.Tensor) -> torch.Tensor:
    """int64 [n + 1] training events per row -> its frequency-gate bucket [n + 1]."""
    buckets = torch.floor(torch.log2(train_counts.double().clamp(min=0) + 1)).long()
    return buckets.clamp(max=GATE_BUCKETS - 1)


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


def prefix_trie(codes: torch.Tensor, codes_per_layer: int) -> tuple[torch.Tensor, int]:
    """An exact table row for every prefix that occurs in `codes` [n, L]: (child, rows).

    Prefixes are numbered depth by depth from 1 (all length-1 prefixes, then length 2, ...);
    row 0 means "no such prefix". child[0, c] is the row of prefix (c) and child[r, c] the row
    of prefix r extended by c, 0 if no item has it; `child` has a line only for the root and
    the prefixes shorter than L, which the numbering puts first, so a prefix's row is also its
    line. Returns (child int64 [1 + prefixes shorter than L, K], rows including row 0).
    """
    parent = torch.zeros(len(codes), dtype=torch.int64)  # row of each item's prefix so far
    child = torch.zeros(1, codes_per_layer, dtype=torch.int64)
    next_row = 1
    for p in range(codes.shape[1]):
        # (parent row, code) names the length-(p + 1) prefix; number the distinct ones
        keys = parent * codes_per_layer + codes[:, p]
        unique, item_rows = torch.unique(keys, return_inverse=True)
        rows = torch.arange(next_row, next_row + len(unique))
        if p < codes.shape[1] - 1:  # lines for this depth's prefixes, filled at the next one
            child = torch.cat([child, torch.zeros(len(unique), codes_per_layer, dtype=torch.int64)])
        child.view(-1)[unique] = rows
        parent = item_rows + next_row
        next_row += len(unique)
    return child, next_row


def trie_rows(codes: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
    """Rows of every prefix of codes [..., L] in a `prefix_trie` table -> [..., L], 0 where the
    prefix (or a shorter one) is not in the table. Gathers only, so it exports to ONNX."""
    codes_per_layer = child.shape[1]
    flat = child.reshape(-1)
    node = torch.zeros_like(codes[..., 0])
    found = torch.ones_like(codes[..., 0])
    rows = []
    for p in range(codes.shape[-1]):
        # an absent prefix has node 0, which indexes the root: `found` zeroes what follows
        node = flat[node * codes_per_layer + codes[..., p]]
        found = found * (node != 0).to(found.dtype)
        rows.append(node * found)
    return torch.stack(rows, dim=-1)


class ItemEmbedding(nn.Module):
    """rows[...] -> raw item vectors [..., d]; see the module docstring for the variants.

    id_dropout p (training only): in each forward call every catalog row independently loses
    its id part with probability p, i.e. the whole item looks new for that call (all its
    occurrences as input, positive or negative alike) rather than a random subset of its
    occurrences. That is what a truly new item looks like, and it trains the SID part to
    stand in for the id. The sid-only variants have no id part to drop.

    table(trained) also records which SID rows the trained items read (mark_trained); with
    trained_rows_only, from_sid (so SidToVector and its ONNX graph) counts only those rows.
    The record is a buffer, saved with the weights.
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
        unknown_id: str = "zero",
        prefix_table: str = "exact",
        hybrid_sid: str = "prefixn",
        trained_rows_only: bool = True,
        sid_gate: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not 0.0 <= id_dropout <= 1.0:
            raise ValueError(f"id_dropout must be in [0, 1], got {id_dropout}")
        if unknown_id not in UNKNOWN_IDS:
            raise ValueError(f"unknown_id must be one of {UNKNOWN_IDS}, got {unknown_id!r}")
        if prefix_table not in PREFIX_TABLES:
            raise ValueError(f"prefix_table must be one of {PREFIX_TABLES}, got {prefix_table!r}")
        if hybrid_sid not in ("prefixn", "rqsum"):
            raise ValueError(f"hybrid_sid must be prefixn or rqsum, got {hybrid_sid!r}")
        self.variant = variant
        self.unknown_id = unknown_id
        self.prefix_table = prefix_table
        self.trained_rows_only = trained_rows_only
        # which SID scheme: the hybrid's SID part is prefixN unless hybrid_sid says rqsum
        self.sid_scheme = {"sid-rqsum": "rqsum", "hybrid": hybrid_sid}.get(variant, "prefixn")
        self.num_items = num_items
        self.d = d
        self.fusion = fusion
        self.id_dropout = id_dropout

        self.id_emb: nn.Embedding | None = None
        if variant in ("id", "hybrid"):
            # rows 1..n items, row n + 1 the learned unknown item; row 0 padding stays zero.
            extra = 2 if unknown_id == "learned" else 1
            self.id_emb = nn.Embedding(num_items + extra, d, padding_idx=0)
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
            exact = self.sid_scheme == "prefixn" and prefix_table == "exact"
            if self.sid_scheme == "rqsum":
                self.table_size = self.sid_layers * codes_per_layer
            elif exact:
                catalog_codes = sids[1:, : self.sid_layers].long()
                child, self.table_size = prefix_trie(catalog_codes, codes_per_layer)
                self.register_buffer("prefix_child", child, persistent=False)
            else:
                # A prime about the catalog size (the reference used 4,007 rows for ML-1M's
                # 3,952 ids); prime so the mod spreads the structured prefix numbers.
                self.table_size = prefix_table_size or next_prime(num_items + 1)
            # exact: row 0 is "no such prefix", zero and never trained
            self.sid_emb = nn.Embedding(self.table_size, d, padding_idx=0 if exact else None)
            _init_table(self.sid_emb.weight.data)
            if exact:
                self.sid_emb.weight.data[0] = 0.0
            # Only the semantic codes are used, never the dedup digit: an item that shares
            # its code tuple with a trained item reads exactly that item's (trained) rows,
            # and any new item's shorter prefixes are rows shared with trained items.
            self.register_buffer("sid_rows", self._sid_rows(sids.long()), persistent=False)
            # rows some trained item reads (mark_trained); every row until told
            self.register_buffer("sid_row_trained", torch.ones(self.table_size, dtype=torch.bool))

        # attach_untrained_codes: the SID rows [n + 1, L] an item without a trained id reads
        # in table(); None (its own codes' rows) until attached
        self.register_buffer("untrained_sid_rows", None)
        # attach_content_map: content [C] -> id part [d] for items without a trained id, and
        # that part for every catalog row [n + 1, d]; None until attached
        self.register_buffer("content_map", None)
        self.register_buffer("content_bias", None)
        self.register_buffer("content_part", None)
        # attach_content_neighbours instead: unit content vectors [m, C] of trained items
        # (less the centre, renormalised), their id rows [m, d], (k, temperature) [2], and
        # the centre [C] the cosine is taken about (None: the plain cosine)
        self.register_buffer("content_keys", None)
        self.register_buffer("content_values", None)
        self.register_buffer("content_knn", None)
        self.register_buffer("content_centre", None)
        self.content_k = 0  # k as an int, so an exported graph has a constant TopK

        self.alpha: nn.Parameter | None = None
        if variant == "hybrid" and fusion == "alpha":
            self.alpha = nn.Parameter(torch.tensor(0.5))

        self.sid_gate: nn.Parameter | None = None
        if sid_gate:
            if variant != "hybrid" or fusion != "sum":
                raise ValueError("sid_gate scales the SID part of a hybrid-sum item only")
            self.sid_gate = nn.Parameter(torch.zeros(GATE_BUCKETS))  # the SID part x (1 + g)
            # each row's bucket (set_gate_buckets); 0, the untrained bucket, until set
            self.register_buffer("gate_bucket", torch.zeros(num_items + 1, dtype=torch.int64))

    @property
    def uses_sid(self) -> bool:
        return self.sid_emb is not None

    @property
    def unknown_row(self) -> int:
        return self.num_items + 1

    def _sid_rows(self, codes: torch.Tensor) -> torch.Tensor:
        # codes [..., >= L] -> SID table rows [..., L]
        codes = codes[..., : self.sid_layers]
        if self.sid_scheme == "rqsum":
            offsets = torch.arange(self.sid_layers, device=codes.device) * self.codes_per_layer
            return codes + offsets
        if self.prefix_table == "exact":
            return trie_rows(codes, self.prefix_child)
        return prefix_rows(codes, self.codes_per_layer, self.table_size)

    def _sid_vectors(self, sid_rows: torch.Tensor) -> torch.Tensor:
        # SID table rows [..., L] -> summed vector [..., d]; rows no trained item reads
        # (mark_trained) contribute nothing when trained_rows_only
        vectors = self.sid_emb(sid_rows)
        if self.trained_rows_only:
            vectors = vectors * self.sid_row_trained[sid_rows][..., None].to(vectors.dtype)
        return vectors.sum(-2)

    @torch.no_grad()
    def mark_trained(self, trained: torch.Tensor) -> None:
        """Record which SID rows some trained item reads. trained: bool [num_items + 1]."""
        if self.sid_emb is None:
            return
        trained = trained.to(self.sid_rows.device)
        mark = torch.zeros_like(self.sid_row_trained)
        mark[self.sid_rows[trained].flatten()] = True
        self.sid_row_trained.copy_(mark)

    @torch.no_grad()
    def attach_untrained_codes(self, codes: torch.Tensor) -> None:
        """codes int64 [n + 1, >= L]: the path whose SID rows each item without a trained id
        reads in table() (rows of trained items ignore it). Its own codes' deeper prefixes
        often have no trained item, and then add nothing; the nearest path that trained items
        have (Codebooks.assign(within=...)) reads trained rows at every layer."""
        if self.sid_emb is None:
            raise ValueError("an id-only item embedding has no SID rows")
        if codes.shape[0] != self.num_items + 1:
            raise ValueError(f"codes must be [num_items + 1, L], got {tuple(codes.shape)}")
        self.untrained_sid_rows = self._sid_rows(codes.long().to(self.sid_rows.device))

    @torch.no_grad()
    def set_gate_buckets(self, train_counts: torch.Tensor) -> None:
        """train_counts int64 [n + 1]: training events per row, which pick each row's gate."""
        if self.sid_gate is None:
            raise ValueError("this item embedding has no frequency gate (sid_gate=False)")
        buckets = gate_buckets(torch.as_tensor(train_counts))
        self.gate_bucket.copy_(buckets.to(self.gate_bucket.device))

    def _gated(
        self, sid_part: torch.Tensor, rows: torch.Tensor, known: torch.Tensor
    ) -> torch.Tensor:
        # sid_part [..., d] of rows [...]; an item without an id part reads bucket 0
        if self.sid_gate is None:
            return sid_part
        bucket = torch.where(known, self.gate_bucket[rows], torch.zeros_like(rows))
        return sid_part * (1 + self.sid_gate[bucket])[..., None]

    @property
    def has_content_part(self) -> bool:
        return self.content_map is not None or self.content_keys is not None

    @property
    def content_dim(self) -> int:
        # C of the content vectors a content part reads
        keys = self.content_keys if self.content_keys is not None else self.content_map.T
        return keys.shape[1]

    def _content_id_part(self, content: torch.Tensor) -> torch.Tensor:
        # content [B, C] -> the id part [B, d] of items without a trained id
        if self.content_keys is None:
            return content.to(self.content_map.dtype) @ self.content_map + self.content_bias
        query = self._neighbour_query(content.to(self.content_keys.dtype))
        cosine, nearest = (query @ self.content_keys.T).topk(self.content_k, dim=-1)  # [B, k]
        weights = torch.softmax(cosine / self.content_knn[1], dim=-1)
        return (weights[..., None] * self.content_values[nearest]).sum(-2)

    def _neighbour_query(self, content: torch.Tensor) -> torch.Tensor:
        # content [B, C] -> unit vectors [B, C] whose dot products are the neighbours' cosine
        unit = nn.functional.normalize(content, dim=-1)
        if self.content_centre is None:
            return unit
        return nn.functional.normalize(unit - self.content_centre, dim=-1)

    @torch.no_grad()
    def attach_content_map(
        self, weight: torch.Tensor, bias: torch.Tensor, catalog_content: torch.Tensor
    ) -> None:
        """Items without a trained id get content @ weight + bias as their id part.
        weight [C, d], bias [d], catalog_content [n, C] (rows 1..n)."""
        if self.variant != "hybrid" or self.fusion != "sum":
            raise ValueError("a content part replaces the id part of a hybrid-sum item only")
        device = self.id_emb.weight.device
        self.content_keys = self.content_values = self.content_knn = None
        self.content_centre = None
        self.content_k = 0
        self.content_map, self.content_bias = weight.float().to(device), bias.float().to(device)
        self._attach_content_part(catalog_content)

    @torch.no_grad()
    def attach_content_neighbours(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        k: int,
        temperature: float,
        catalog_content: torch.Tensor,
        centre: torch.Tensor | None = None,
    ) -> None:
        """Items without a trained id get the softmax(cosine / temperature)-weighted id rows of
        their k nearest keys as their id part. keys [m, C]: content vectors of trained items,
        values [m, d]: their id rows, catalog_content [n, C] (rows 1..n), centre [C]: the
        unit vector subtracted from every unit content vector before the cosine (None:
        none)."""
        if self.variant != "hybrid" or self.fusion != "sum":
            raise ValueError("a content part replaces the id part of a hybrid-sum item only")
        if not 0 < k <= len(keys) or temperature <= 0:
            raise ValueError(f"need 0 < k <= {len(keys)} keys and temperature > 0")
        device = self.id_emb.weight.device
        self.content_map = self.content_bias = None
        self.content_centre = None if centre is None else centre.float().to(device)
        self.content_keys = self._neighbour_query(keys.float().to(device))
        self.content_values = values.float().to(device)
        self.content_knn = torch.tensor([float(k), float(temperature)], device=device)
        self.content_k = int(k)
        self._attach_content_part(catalog_content)

    def _attach_content_part(self, catalog_content: torch.Tensor) -> None:
        device = self.id_emb.weight.device
        part = self._content_id_part(catalog_content.float().to(device))  # [n, d]
        self.content_part = torch.cat([torch.zeros_like(part[:1]), part])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # Checkpoints from before the trained-rows record: every row counts, as it did then.
        key = prefix + "sid_row_trained"
        if self.sid_emb is not None and key not in state_dict:
            state_dict[key] = torch.ones_like(self.sid_row_trained)
        # a content part is attached after training: take its shapes from the saved one
        for name in ("untrained_sid_rows", "content_map", "content_bias", "content_part",
                     "content_keys", "content_values", "content_knn",
                     "content_centre"):  # fmt: skip
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        if prefix + "content_knn" in state_dict:
            self.content_k = int(state_dict[prefix + "content_knn"][0])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _fuse(
        self,
        sid_part: torch.Tensor | None,
        id_part: torch.Tensor | None,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # known [...] bool: the item has an id part (trained and not dropped); switch only
        if sid_part is None:
            return id_part
        if id_part is None:
            return sid_part
        if self.fusion == "switch":
            return torch.where(known[..., None], id_part, sid_part)
        if self.alpha is not None:
            return self.alpha * sid_part + (1 - self.alpha) * id_part
        return sid_part + id_part

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # rows [...] int64 in [0, num_items] -> [..., d]
        id_part = None
        known = torch.ones_like(rows, dtype=torch.bool)
        if self.id_emb is not None:
            if self.training and self.id_dropout > 0:
                # one draw per catalog row: every occurrence of an item is dropped alike
                dropped = torch.rand(self.num_items + 1, device=rows.device) < self.id_dropout
                known = ~dropped[rows]
                id_part = self._id_part(rows, known)
            else:
                id_part = self.id_emb(rows)
        sid_part = None
        if self.sid_emb is not None:
            # Every row counts: a trained item reads only trained rows anyway, and the
            # trained-rows mask is for items that training never saw.
            sid_part = self._gated(self.sid_emb(self.sid_rows[rows]).sum(-2), rows, known)
        out = self._fuse(sid_part, id_part, known)
        return out * (rows != 0)[..., None].to(out.dtype)

    def _id_part(self, rows: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        # rows [...], known bool [...] -> id part [..., d]: the item's row where known, else
        # the learned unknown row or zeros
        if self.unknown_id == "learned":
            return self.id_emb(torch.where(known, rows, self.unknown_row))
        return self.id_emb(rows) * known[..., None].to(self.id_emb.weight.dtype)

    @torch.no_grad()
    def table(self, trained: torch.Tensor) -> torch.Tensor:
        """Every row's vector [num_items + 1, d], no dropout; untrained rows get no id part
        (so they equal from_sid of their codes, or of the codes attach_untrained_codes gave
        them). trained: bool [num_items + 1]. Also records which SID rows the trained items
        read, for from_sid (mark_trained)."""
        device = next(self.parameters()).device
        trained = trained.to(device)
        rows = torch.arange(self.num_items + 1, device=device)
        id_part = None
        if self.id_emb is not None:
            id_part = self._id_part(rows, trained)
            if self.content_part is not None:
                id_part = torch.where(trained[:, None], id_part, self.content_part)
        sid_part = None
        if self.sid_emb is not None:
            self.mark_trained(trained)
            sid_rows = self.sid_rows
            if self.untrained_sid_rows is not None:
                sid_rows = torch.where(trained[:, None], sid_rows, self.untrained_sid_rows)
            sid_part = self._gated(self._sid_vectors(sid_rows), rows, trained)
        out = self._fuse(sid_part, id_part, trained)
        out[0] = 0.0
        return out

    def from_sid(self, codes: torch.Tensor, content: torch.Tensor | None = None) -> torch.Tensor:
        """Vector of an item without a trained id: codes [B, L + 1] int64 (and content [B, C]
        float, which a model with a content part needs) -> [B, d]."""
        id_part = None
        if self.has_content_part:
            if content is None:
                raise ValueError("this item embedding has a content part: from_sid needs content")
            id_part = self._content_id_part(content)
        elif self.id_emb is not None:
            if self.unknown_id == "learned":
                unknown = self.id_emb.weight[self.unknown_row]  # [d]
            else:
                unknown = torch.zeros_like(self.id_emb.weight[0])
            id_part = unknown.expand(codes.shape[0], self.d)
        sid_part = None
        unknown_rows = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device)
        if self.sid_emb is not None:
            no_row = torch.zeros_like(codes[:, 0])  # a new item has no catalog row
            sid_part = self._gated(self._sid_vectors(self._sid_rows(codes)), no_row, unknown_rows)
        return self._fuse(sid_part, id_part, unknown_rows)


class SidToVector(nn.Module):
    """ONNX graph for cold items: codes [B, L + 1] int64 -> vectors [B, d]."""

    def __init__(self, item_embedding: ItemEmbedding) -> None:
        super().__init__()
        self.item_embedding = item_embedding

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.item_embedding.from_sid(codes)


class SidContentToVector(nn.Module):
    """ONNX graph for cold items of a model with a content part: codes [B, L + 1] int64,
    content [B, C] float -> vectors [B, d]."""

    def __init__(self, item_embedding: ItemEmbedding) -> None:
        super().__init__()
        self.item_embedding = item_embedding

    def forward(self, codes: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        return self.item_embedding.from_sid(codes, content)
