"""Reference scorers for the same evaluator as the model (history exclusion happens there)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sidrec.content_term import ContentTerm
from sidrec.offline.evaluate import EvalBatch, Scorer
from sidrec.offline.split import Split

# The content-only baseline's (and the content term's) history half-lives, in events, that
# validation chooses from; None: the plain mean. On Amazon Toys the latest item or two say
# most, on MovieLens a few (docs/results/content-tower.md, thirtieth session).
CONTENT_HALF_LIVES: tuple[float | None, ...] = (None, 20.0, 10.0, 5.0, 2.0, 1.0)


def most_popular_scorer(split: Split) -> Scorer:
    """Every user gets the items ranked by training interactions. Withheld and never-trained
    items all score 0: a target among them ranks last of its tie group (metrics.py)."""
    counts = torch.as_tensor(split.train_counts, dtype=torch.float32)  # [n + 1]

    def score(batch: EvalBatch) -> torch.Tensor:
        return counts.to(batch.items.device).expand(len(batch.users), -1)  # [B, n + 1]

    return score


def content_scorer(content: np.ndarray | torch.Tensor, half_life: float | None = None) -> Scorer:
    """User = the (truncated) history's mean content vector, scored by cosine; with a
    `half_life` its event j of n weighs 0.5 ** ((n - 1 - j) / half_life), the latest most
    (ContentTerm.history_weights).

    content: float[n, D] vectors of rows 1..n (encode_catalog's output, no padding row).
    """
    vectors = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    table = F.normalize(vectors, dim=-1, eps=1e-6)
    table = torch.cat([torch.zeros(1, table.shape[1]), table])  # [n + 1, D], row 0 = padding

    def score(batch: EvalBatch) -> torch.Tensor:
        t = table.to(batch.items.device)
        weights = batch.mask.to(torch.float32)  # [B, N], padding 0 (histories right-padded)
        if half_life is not None:
            position = torch.arange(batch.mask.shape[1], device=batch.items.device)
            age = (batch.mask.sum(1, keepdim=True) - 1 - position).clamp(min=0)  # [B, N]
            weights = weights * 0.5 ** (age / half_life)
        user = (t[batch.items] * weights[..., None]).sum(1)  # [B, D]; its length is normalised
        return F.normalize(user, dim=-1, eps=1e-6) @ t.T  # [B, n + 1]

    return score


def content_only_scorer(content: np.ndarray, half_life: float | None = None) -> Scorer:
    """The content-only baseline: content_scorer on the catalog's vectors taken about their
    mean (ContentTerm.centre), as the dense content term reads them. content: float[n, D]."""
    centred = ContentTerm().centred_on(content)
    return content_scorer(centred.vectors(content), half_life)


def choose_content_half_life(
    content: np.ndarray, split: Split, max_history: int, batch_size: int = 256
) -> tuple[float | None, dict[str, float]]:
    """The content-only baseline's history half-life of CONTENT_HALF_LIVES with the best
    validation NDCG@10 (the plain mean, None, on a tie), and each one's figure."""
    from sidrec.offline.evaluate import rank_targets
    from sidrec.offline.metrics import metrics_from_ranks

    figures: dict[str, float] = {}
    for half_life in CONTENT_HALF_LIVES:
        scorer = content_only_scorer(content, half_life)
        ranks = rank_targets(scorer, split, "valid", batch_size, max_history)
        figures[str(half_life)] = metrics_from_ranks(ranks)["ndcg@10"]
    best = max(CONTENT_HALF_LIVES, key=lambda h: figures[str(h)])  # the first of the best
    return best, figures


def content_only_baseline(
    content: np.ndarray, split: Split, max_history: int = 200
) -> tuple[Scorer, dict[str, Any]]:
    """The content-only baseline at its validation-chosen half-life (choose_content_half_life)
    and the record of that choice, which its reports carry."""
    half_life, figures = choose_content_half_life(content, split, max_history)
    record = {"half_life": half_life, "valid_ndcg@10_by_half_life": figures}
    return content_only_scorer(content, half_life), record
