"""Training losses over the item catalog.

- full softmax: exact cross-entropy over every trainable item (cheap when the catalog is a
  few thousand rows, and the strongest loss in every ML-1M reproduction, model-anchors.md s.8);
- sampled softmax with logQ correction: the batch's own targets plus R uniform draws, each
  logit corrected by the log of its inclusion probability, for catalogs too big to score whole;
- GR's reference: one positive against R uniform negatives, no correction.
"""

import math

import torch
import torch.nn.functional as F

# Logit for a negative that is the positive itself: a large finite value rather than -inf so
# it stays representable in fp16/bf16 (the reference uses the same constant).
MASKED_LOGIT = -5e4


def sampled_softmax_loss(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    pos_rows: torch.Tensor,
    neg_rows: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Mean over P of -log softmax(positive) among [positive, negatives].

    user [P, d], pos [P, d], neg [P, R, d]: L2-normalised, so dot products are cosines.
    pos_rows [P], neg_rows [P, R]: item rows, to mask negatives that equal the positive.
    """
    pos_logits = (user * pos).sum(-1, keepdim=True) / temperature  # [P, 1]
    neg_logits = torch.einsum("pd,prd->pr", user, neg) / temperature  # [P, R]
    return _loss(pos_logits, neg_logits, pos_rows, neg_rows)


def sampled_softmax_via_table(
    user: torch.Tensor,
    table: torch.Tensor,
    pos_rows: torch.Tensor,
    neg_rows: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """The same loss, read from user @ table^T instead of gathered [P, R, d] vectors.

    user [P, d], table [n + 1, d] L2-normalised. Gathering the negatives' vectors and
    scattering their gradients back is the costliest part of a CPU step; scoring every row
    [P, n + 1] and gathering R logits gives the same loss and is several times faster whenever
    n + 1 <= R * d (MovieLens: 1,683 or 3,953 rows vs 128 * 50 = 6,400).
    """
    logits = (user / temperature) @ table.T  # [P, n + 1]
    return _loss(
        logits.gather(1, pos_rows[:, None]), logits.gather(1, neg_rows), pos_rows, neg_rows
    )


def sampled_softmax_shared(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    neg_rows: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """The same loss with one draw of R negatives per sequence, shared by its positions.

    user [B, N, d] (padding rows zero), table [n + 1, d] L2-normalised, targets [B, N],
    neg_rows [B, R], mask [B, N] real positions. Each position still sees R uniform draws
    (the same marginal as drawing per position, so the same expected loss); positions of one
    sequence share them. That makes the negatives' logits one [B, N, d] x [B, d, R] batched
    product instead of a [P, n + 1] score matrix whose gathers' backward zero-fills and
    scatters it twice: about 60% of a CPU step on ML-1M (3,884 items, 25k positions). The
    price is correlated gradients within a sequence: per epoch it learns less (ML-1M id-only,
    6 epochs: test NDCG@10 0.101 vs 0.113 per position), per second of CPU more.
    """
    pos_logits = (user * table[targets]).sum(-1, keepdim=True) / temperature  # [B, N, 1]
    neg_logits = torch.bmm(user, table[neg_rows].transpose(1, 2)) / temperature  # [B, N, R]
    neg_logits = neg_logits.masked_fill(neg_rows[:, None, :] == targets[:, :, None], MASKED_LOGIT)
    logits = torch.cat([pos_logits, neg_logits], dim=-1)  # [B, N, 1 + R]
    return -F.log_softmax(logits, dim=-1)[..., 0][mask].mean()


# Rows of [P, M] logits per chunk in softmax_cross_entropy: about 8 MB of float32 a chunk.
CHUNK_ELEMENTS = 1 << 21


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Mean over P of logsumexp(s_p) - s_p[target_p], s_p = user_p . table^T / t + bias.

    Never holds the whole [P, M] logit matrix: the forward keeps only each row's logsumexp
    and the backward recomputes the logits chunk by chunk. A [P, M] float32 tensor is far
    above glibc's mmap threshold, so every full-size intermediate (logits, softmax, its
    gradient) was a fresh mmap, page-faulted in and zeroed: on a 2-core CPU those copies and
    fills cost more than the matmuls (Amazon Toys: 3,275 positions x 11,925 items). Chunks
    stay in reused heap memory; the price is one extra matmul per chunk in the backward.
    """

    @staticmethod
    def forward(ctx, user, table, targets, bias, temperature):  # type: ignore[override]
        # user [P, d], table [M, d], targets [P] indices into table, bias [M] -> scalar
        chunk = max(1, CHUNK_ELEMENTS // max(table.shape[0], 1))
        lse = torch.empty(user.shape[0], dtype=user.dtype, device=user.device)  # [P]
        for start in range(0, user.shape[0], chunk):
            logits = torch.addmm(bias, user[start : start + chunk], table.T, alpha=1 / temperature)
            lse[start : start + chunk] = torch.logsumexp(logits, dim=1)
        target_logits = (user * table[targets]).sum(-1) / temperature + bias[targets]  # [P]
        ctx.save_for_backward(user, table, targets, bias, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        user, table, targets, bias, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad_user = torch.empty_like(user)
        grad_table = torch.zeros_like(table)
        scale = grad / user.shape[0]  # d mean / d row
        for start in range(0, user.shape[0], chunk):
            u = user[start : start + chunk]
            logits = torch.addmm(bias, u, table.T, alpha=1 / t)  # [c, M]
            probs = torch.exp_(logits.sub_(lse[start : start + chunk, None]))  # softmax
            rows = torch.arange(len(u), device=u.device)
            probs[rows, targets[start : start + chunk]] -= 1.0  # d loss / d logits (x c)
            probs.mul_(scale)
            grad_user[start : start + chunk] = (probs @ table) / t
            grad_table.addmm_(probs.T, u, alpha=1 / t)
        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = torch.zeros_like(bias)  # logQ corrections are constants; not needed
        return grad_user, grad_table, None, grad_bias, None


def softmax_cross_entropy(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Exact mean cross-entropy of user @ table^T / temperature + bias against targets.

    user [P, d], table [M, d], targets [P] int64 indices into table, bias [M] (None = 0).
    The same value and gradients as F.cross_entropy on the materialised logits, in bounded
    memory (_ChunkedSoftmaxCE).
    """
    if bias is None:
        bias = torch.zeros(table.shape[0], dtype=user.dtype, device=user.device)
    return _ChunkedSoftmaxCE.apply(user, table, targets, bias.to(user.dtype), temperature)


def full_softmax_loss(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Mean over P of -log softmax(target) over every allowed row.

    user [P, d], table [n + 1, d] L2-normalised, targets [P] rows, allowed bool[n + 1]: the
    rows that compete (trained items; never padding row 0, never withheld items, whose
    vectors must not be pushed down by a loss they cannot answer). Targets must be allowed.
    """
    rows = torch.nonzero(allowed).squeeze(1)  # [M]
    position = torch.full_like(allowed, -1, dtype=torch.int64)
    position[rows] = torch.arange(len(rows), device=rows.device)
    return softmax_cross_entropy(user, table[rows], position[targets], None, temperature)


def log_inclusion_probability(
    unigram: torch.Tensor, num_targets: int, uniform_pool: int, num_uniform: int
) -> torch.Tensor:
    """log P(row is among the candidates) for sampled_softmax_logq, per row.

    unigram [n + 1]: each row's share of the training targets (the in-batch proposal);
    the candidates are num_targets unigram draws (the batch's targets) plus num_uniform
    uniform draws from uniform_pool rows, deduplicated. A row with probability 0 gets -inf.
    As TF's sampled softmax with unique candidates: 1 - (1 - p)^k per proposal.
    """
    miss = num_targets * torch.log1p(-unigram.clamp(max=1 - 1e-7))  # log P(no target draw)
    if num_uniform > 0:
        miss = miss + num_uniform * math.log1p(-1.0 / uniform_pool)
    return torch.log(-torch.expm1(miss))


def sampled_softmax_logq(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Sampled softmax over in-batch targets + uniform negatives, logQ-corrected.

    user [P, d], table [n + 1, d] L2-normalised, targets [P] rows, negatives [R] rows drawn
    uniformly from the trainable items, log_q [n + 1] from log_inclusion_probability.
    Candidates are the unique rows of targets + negatives (so a row never competes with
    itself and no accidental-hit masking is needed); every candidate's logit, the target's
    included, is lowered by log_q (Jean et al. 2015; Yi et al. 2019): without it popular items,
    which are in-batch negatives far more often than their share, are pushed down too hard.
    """
    candidates, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)
    return softmax_cross_entropy(
        user, table[candidates], inverse[: len(targets)], -log_q[candidates], temperature
    )


def _loss(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    pos_rows: torch.Tensor,
    neg_rows: torch.Tensor,
) -> torch.Tensor:
    # pos_logits [P, 1], neg_logits [P, R] -> scalar; a negative equal to the positive is masked
    neg_logits = neg_logits.masked_fill(neg_rows == pos_rows[:, None], MASKED_LOGIT)
    logits = torch.cat([pos_logits, neg_logits], dim=1)  # [P, 1 + R]
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def sample_negatives(
    candidates: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rows drawn uniformly (with replacement) from candidates [M] -> [*shape].

    The reference samples uniformly from the whole catalog, independently per position; the
    trainer passes the rows of the items that occur in training.
    """
    picks = torch.randint(len(candidates), shape, generator=generator, device=candidates.device)
    return candidates[picks]
