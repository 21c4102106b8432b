"""HSTU (Hierarchical Sequential Transduction Unit) encoder, as in Meta's GR research code.

Dense re-implementation of `generative_recommenders/research/modeling/sequential/hstu.py`
(jagged fbgemm ops replaced by padded tensors + masks, so it exports to ONNX). Right padding:
position 0 is the oldest item, `mask` is True on real items.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sidrec.time_buckets import TIME_BUCKET_DIVISOR

LN_EPS = 1e-6  # both no-affine LayerNorms and the final L2 norm, as in the reference
ATTN_NORMS = ("padded", "length")
# What the encoder's output is scored with: "cosine" (the reference): L2-normalised output
# against L2-normalised item rows, over a temperature; "dot": a LayerNorm'd output against raw
# item rows, as SASRec scores, so an item's norm can carry how often it is the answer.
SCORINGS = ("cosine", "dot")
# How query-key scores become attention weights: "silu" (HSTU: pointwise, divided by
# attn_norm's divisor, weights need not sum to one) or "softmax" (SASRec: scaled by
# 1/sqrt(dqk), normalised over the keys the query may see; attn_norm does not apply).
ATTENTIONS = ("silu", "softmax")
# Where each block's LayerNorm sits: "pre" (HSTU: on the block's input, the residual stream
# left unnormalised) or "post" (SASRec's transformer: a LayerNorm on the embeddings and one
# after each residual sum, so every block reads and writes unit-scale rows).
NORMS = ("pre", "post")


def time_buckets(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """floor(ln(max(|dt|, 1)) / 0.301) clamped to [0, num_buckets]; dt int64 seconds."""
    # float64 so that PyTorch and ONNX Runtime agree on bucket edges (a float32 log may
    # differ by one ulp between the two and flip a bucket). The clamps run on the float64
    # copy, exact for |dt| < 2^53: ONNX Runtime's int64 Clip costs twice its float one, and
    # this chain runs over every [N, N] pair of a served history.
    dt = dt.to(torch.float64).abs().clamp(min=1)
    return torch.floor(torch.log(dt) / TIME_BUCKET_DIVISOR).clamp(max=num_buckets).long()


class RelativeBias(nn.Module):
    """Learned attention bias from relative position and time gap (one per block).

    Scalars are shared across heads. For query i and key j:
      position: w_pos[P - 1 + j - i]   (P = padded_len, 2P - 1 scalars)
      time:     w_ts[bucket(next_ts[i] - ts[j])]   (num_buckets + 1 scalars)
    `next_ts[i]` is the time of the event query i predicts, so the last real position sees
    the query (request) time.
    """

    def __init__(self, padded_len: int, num_buckets: int, use_time: bool) -> None:
        super().__init__()
        self.padded_len = padded_len
        self.num_buckets = num_buckets
        self.use_time = use_time
        self.pos_w = nn.Parameter(torch.empty(2 * padded_len - 1).normal_(0.0, 0.02))
        # Kept even when use_time is False so checkpoints have one layout.
        self.ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(0.0, 0.02))

    def forward(self, ts: torch.Tensor, next_ts: torch.Tensor) -> torch.Tensor:
        # ts, next_ts: [B, N] int64 -> bias [B or 1, N, N]
        buckets = self.buckets(ts, next_ts) if self.use_time else None
        return self.from_buckets(ts.shape[1], buckets)

    def buckets(self, ts: torch.Tensor, next_ts: torch.Tensor) -> torch.Tensor:
        """[B, N] x 2 -> int64 [B, N, N]: the same for every block, so HSTU computes it once."""
        return time_buckets(next_ts[:, :, None] - ts[:, None, :], self.num_buckets)

    def row(self, n: int, query: torch.Tensor, buckets: torch.Tensor | None) -> torch.Tensor:
        """The bias of one query row per sequence: query [B] int64 positions -> [B, N]
        (from_buckets(n, buckets)[b, query[b]], without the other rows)."""
        positions = torch.arange(n, device=self.pos_w.device)
        rel = self.padded_len - 1 + positions[None, :] - query[:, None]  # [B, N], j - i
        bias = F.embedding(rel, self.pos_w[:, None]).squeeze(-1)  # [B, N]
        if self.use_time and buckets is not None:
            picked = buckets.gather(1, query.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
            bias = bias + F.embedding(picked, self.ts_w[:, None]).squeeze(-1)  # [B, N]
        return bias

    def from_buckets(self, n: int, buckets: torch.Tensor | None) -> torch.Tensor:
        # In an ONNX export, the table of every padded position, cut to N: it depends on the
        # weights only, so ONNX Runtime folds it into a constant at load and serving slices
        # it instead of gathering N^2 scalars per request. Eager code gathers N x N, far less
        # than the padded table for short histories.
        size = self.padded_len if torch.onnx.is_in_onnx_export() else n
        positions = torch.arange(size, device=self.pos_w.device)
        rel = self.padded_len - 1 + positions[None, :] - positions[:, None]  # [S, S], j - i
        # F.embedding, not w[idx]: both gather, but indexing's backward adds each duplicate
        # index one after another, and 5M indices into 129 scalars made that 98% of a CUDA
        # training step (140 ms); embedding's backward reduces duplicate runs in parallel.
        bias = F.embedding(rel, self.pos_w[:, None]).squeeze(-1)[:n, :n][None]  # [1, N, N]
        if self.use_time and buckets is not None:
            if self.training and not buckets.is_cuda:
                bias = bias + ScalarLookup.apply(self.ts_w, buckets)  # [B, N, N]
            else:
                bias = bias + F.embedding(buckets, self.ts_w[:, None]).squeeze(-1)  # [B, N, N]
        return bias


class ScalarLookup(torch.autograd.Function):
    """w[idx] for a small table of scalars w [K] and indices idx [...] -> [...].

    On CPU, F.embedding's backward sorts the indices first: for the [B, N, N] time buckets
    that was 17% of a training step (about 50 ms a call); a weighted bincount adds the
    gradient up in one pass. On CUDA, embedding's sorted reduction is the fast one (a
    bincount there is atomics on 129 addresses), so HSTU uses this on CPU only.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, idx: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.size = w.shape[0]  # type: ignore[attr-defined]
        return w[idx]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors  # type: ignore[attr-defined]
        counts = torch.bincount(idx.reshape(-1), grad.reshape(-1), minlength=ctx.size)  # type: ignore[attr-defined]
        return counts.to(grad.dtype), None


class HSTUBlock(nn.Module):
    """Pointwise-attention block: no softmax (unless attention="softmax"), one residual,
    pre-norm (or post-norm, see NORMS); with ffn_mult > 0 a GELU feed-forward (d -> ffn_mult
    * d -> d) and a second residual follow, as in SASRec's transformer layer (the reference
    has none)."""

    def __init__(
        self,
        d: int,
        num_heads: int,
        dqk: int,
        dv: int,
        padded_len: int,
        dropout: float,
        time_buckets: int,
        use_time: bool,
        ffn_mult: int = 0,
        attn_dropout: float = 0.0,
        attention: str = "silu",
        norm: str = "pre",
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        self.attention = attention
        self.norm = norm
        self.d = d
        self.ffn_mult = ffn_mult
        self.attn_dropout = attn_dropout
        self.num_heads = num_heads
        self.dqk = dqk
        self.dv = dv
        self.padded_len = padded_len
        self.dropout = dropout
        # One matmul produces U, V, Q, K for all heads (no bias).
        self.uvqk = nn.Parameter(torch.empty(d, num_heads * (2 * dv + 2 * dqk)).normal_(0, 0.02))
        self.rel_bias = RelativeBias(padded_len, time_buckets, use_time)
        self.out = nn.Linear(num_heads * dv, d)
        nn.init.xavier_uniform_(self.out.weight)
        if ffn_mult:
            self.ffn = nn.Sequential(
                nn.LayerNorm(d, eps=LN_EPS),
                nn.Linear(d, ffn_mult * d),
                nn.GELU(),
                nn.Linear(ffn_mult * d, d),
            )
        if norm == "post":
            self.attn_out_norm = nn.LayerNorm(d, eps=LN_EPS)
            if ffn_mult:
                self.ffn_out_norm = nn.LayerNorm(d, eps=LN_EPS)

    def forward(
        self,
        x: torch.Tensor,
        buckets: torch.Tensor | None,
        attn_mask: torch.Tensor,
        attn_divisor: torch.Tensor | float,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [B, N, d]; buckets: [B, N, N] time-gap buckets (None without time);
        # attn_mask: [B, N, N] float, 1 = query may see key; attn_divisor: [B, 1, 1, 1] or a
        # constant (see HSTU's attn_norm). query: [B] int64: compute only that position's
        # output (serving reads one row of the last block), -> [B, 1, d]; else [B, N, d].
        b, n, _ = x.shape
        h, hv, hq = self.num_heads, self.num_heads * self.dv, self.num_heads * self.dqk
        normed = F.layer_norm(x, (self.d,), eps=LN_EPS)
        if query is None:
            uvqk = F.silu(normed @ self.uvqk)
            u, v, q, k = torch.split(uvqk, [hv, hv, hq, hq], -1)
            bias = self.rel_bias.from_buckets(n, buckets)  # [B or 1, N, N]
            rows = x
        else:
            # The query rows' U and Q, every row's V and K: the weight's columns are [U|V|Q|K].
            pick = query.view(b, 1, 1)
            rows = x.gather(1, pick.expand(b, 1, self.d))  # [B, 1, d]
            normed_rows = normed.gather(1, pick.expand(b, 1, self.d))
            u = F.silu(normed_rows @ self.uvqk[:, :hv])  # [B, 1, h * dv]
            q = F.silu(normed_rows @ self.uvqk[:, 2 * hv : 2 * hv + hq])  # [B, 1, h * dqk]
            v = F.silu(normed @ self.uvqk[:, hv : 2 * hv])  # [B, N, h * dv]
            k = F.silu(normed @ self.uvqk[:, 2 * hv + hq :])  # [B, N, h * dqk]
            bias = self.rel_bias.row(n, query, buckets)[:, None]  # [B, 1, N]
            attn_mask = attn_mask.gather(1, pick.expand(b, 1, n))  # [B, 1, N]
        m = rows.shape[1]  # query rows: N, or 1
        q = q.view(b, m, h, self.dqk)
        k = k.view(b, n, h, self.dqk)
        v = v.view(b, n, h, self.dv)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k)  # [B, h, M, N], no 1/sqrt(dqk)
        if self.attention == "softmax":
            scores = scores / math.sqrt(self.dqk) + bias[:, None].to(scores.dtype)
            # a large finite negative, not -inf: a padding query sees no key, and its row
            # must stay finite (uniform) rather than NaN
            scores = scores.masked_fill(attn_mask[:, None] == 0, -1e9).softmax(-1)
        else:
            scores = scores + bias[:, None].to(scores.dtype)
            scores = F.silu(scores) / attn_divisor * attn_mask[:, None]
        # the reference's attn_dropout_rate: drops whole query-key weights (0 on ML-1M)
        scores = F.dropout(scores, p=self.attn_dropout, training=self.training)
        attn = torch.einsum("bhnm,bmhd->bnhd", scores, v).reshape(b, m, hv)
        y = u * F.layer_norm(attn, (hv,), eps=LN_EPS)  # [B, M, h * dv]
        out = rows + self.out(F.dropout(y, p=self.dropout, training=self.training))
        if self.norm == "post":
            out = self.attn_out_norm(out)
        if self.ffn_mult:
            out = out + F.dropout(self.ffn(out), p=self.dropout, training=self.training)
            if self.norm == "post":
                out = self.ffn_out_norm(out)
        return out  # [B, M, d]


class HSTU(nn.Module):
    """Sequence of item vectors -> output per position: L2-normalised (scoring "cosine") or
    LayerNorm'd (scoring "dot"; see SCORINGS).

    forward(x[B, N, d], ts[B, N] int64, next_ts[B, N] int64, mask[B, N] bool) -> [B, N, d]
    Works for any N <= padded_len; outputs at masked positions are finite but meaningless.

    attention: SiLU (the reference) or softmax weights, see ATTENTIONS.
    attn_norm: what the SiLU attention weights are divided by. "padded" (the reference): the
    constant padded_len, so a short history's attention output is small. "length": the
    sequence's real length (its number of real items), as NetEase's HSTU port does. Both keep
    outputs independent of how much padding a batch carries.
    """

    def __init__(
        self,
        d: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dqk: int = 50,
        dv: int = 50,
        padded_len: int = 211,
        dropout: float = 0.2,
        time_buckets: int = 128,
        use_time: bool = True,
        attn_norm: str = "padded",
        ffn_mult: int = 0,
        scoring: str = "cosine",
        attn_dropout: float = 0.0,
        attention: str = "silu",
        norm: str = "pre",
    ) -> None:
        super().__init__()
        if attn_norm not in ATTN_NORMS:
            raise ValueError(f"attn_norm must be one of {ATTN_NORMS}, not {attn_norm!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")
        self.scoring = scoring
        if scoring == "dot":
            self.out_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.d = d
        self.padded_len = padded_len
        self.dropout = dropout
        self.use_time = use_time
        self.attn_norm = attn_norm
        self.norm = norm
        if norm == "post":
            self.emb_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.pos_emb = nn.Embedding(padded_len, d)
        nn.init.xavier_normal_(self.pos_emb.weight)
        self.blocks = nn.ModuleList(
            HSTUBlock(
                d,
                num_heads,
                dqk,
                dv,
                padded_len,
                dropout,
                time_buckets,
                use_time,
                ffn_mult,
                attn_dropout,
                attention,
                norm,
            )
            for _ in range(num_blocks)
        )

    def forward(
        self,
        x: torch.Tensor,
        ts: torch.Tensor,
        next_ts: torch.Tensor,
        mask: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # query [B] int64: only that position's output, [B, d] (the last block computes one
        # row; the earlier ones all, since it reads every key and value)
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        x = x * math.sqrt(self.d) + self.pos_emb(positions)[None]  # [B, N, d]
        if self.norm == "post":
            x = self.emb_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        # where() rather than a multiply so that even NaN/inf garbage in padding is dropped.
        x = torch.where(mask[..., None], x, torch.zeros_like(x))
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # [N, N], incl. diag
        attn_mask = (causal[None] & mask[:, None, :]).to(x.dtype)  # [B, N, N], keys padded out
        # Time-gap buckets (a float64 log over [B, N, N]) are the same in every block: once here.
        buckets = self.blocks[0].rel_bias.buckets(ts, next_ts) if self.use_time else None
        divisor: torch.Tensor | float = float(self.padded_len)
        if self.attn_norm == "length":
            divisor = mask.sum(1).clamp(min=1).to(x.dtype)[:, None, None, None]  # [B, 1, 1, 1]
        for i, block in enumerate(self.blocks):
            final = i == len(self.blocks) - 1
            x = block(x, buckets, attn_mask, divisor, query if final else None)
        if query is not None:
            x = x[:, 0]  # [B, d]
        if self.scoring == "dot":
            return self.out_norm(x)
        return F.normalize(x, dim=-1, eps=LN_EPS)


class UserEncoder(nn.Module):
    """History -> one user vector: the HSTU output at the last real position.

    forward(item_vectors[B, N, d], timestamps[B, N] int64, mask[B, N] bool, query_time[B] int64)
    -> [B, d]. The last real position predicts the event at query_time, so its time bias uses
    it (the reference puts the target's timestamp there at eval). A row with no real item
    yields a finite but meaningless vector.
    """

    def __init__(self, hstu: HSTU) -> None:
        super().__init__()
        self.hstu = hstu

    def forward(
        self,
        item_vectors: torch.Tensor,
        timestamps: torch.Tensor,
        mask: torch.Tensor,
        query_time: torch.Tensor,
    ) -> torch.Tensor:
        b, n = mask.shape
        d = self.hstu.d  # a Python int (not a traced size): the ONNX output keeps a fixed d
        last = (mask.long().sum(1) - 1).clamp(min=0)  # [B]
        positions = torch.arange(n, device=item_vectors.device)
        # Position i predicts the event at i + 1; the padding after `last` gets shifted
        # (finite) values that only masked queries read.
        shifted = torch.cat([timestamps[:, 1:], timestamps[:, -1:]], dim=1)  # [B, N]
        is_last = positions[None, :] == last[:, None]  # [B, N]
        next_ts = torch.where(is_last, query_time[:, None].expand(b, n), shifted)
        out = self.hstu(item_vectors, timestamps, next_ts, mask, query=last)  # [B, d]
        return out.reshape(-1, d)  # a fixed d for the ONNX output
