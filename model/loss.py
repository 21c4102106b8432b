"""Sampled softmax over one positive and R uniformly drawn negatives (GR's training loss)."""

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
    hit = neg_rows == pos_rows[:, None]
    neg_logits = neg_logits.masked_fill(hit, MASKED_LOGIT)
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
