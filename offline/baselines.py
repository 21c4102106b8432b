"""Reference scorers for the same evaluator as the model (history exclusion happens there)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sidrec.content_term import ContentTerm
from sidrec.offline.evaluate import EvalBatch, Scorer
from sidrec.offline.split import Split


def most_popular_scorer(split: Split) -> Scorer:
    """Every user gets the items ranked by training interactions. Withheld and never-trained
    items all score 0: a target among them ranks last of its tie group (metrics.py)."""
    counts = torch.as_tensor(split.train_counts, dtype=torch.float32)  # [n + 1]

    def score(batch: EvalBatch) -> torch.Tensor:
        return counts.to(batch.items.device).expand(len(batch.users), -1)  # [B, n + 1]

    return score


def content_scorer(content: np.ndarray | torch.Tensor) -> Scorer:
    """User = mean content vector of the (truncated) history, scored by cosine.

    content: float[n, D] vectors of rows 1..n (encode_catalog's output, no padding row).
    """
    vectors = torch.as_tensor(np.asarray(content), dtype=torch.float32)
    table = F.normalize(vectors, dim=-1, eps=1e-6)
    table = torch.cat([torch.zeros(1, table.shape[1]), table])  # [n + 1, D], row 0 = padding

    def score(batch: EvalBatch) -> torch.Tensor:
        t = table.to(batch.items.device)
        history = t[batch.items] * batch.mask[..., None]  # [B, N, D], padding zeroed
        user = history.sum(1) / batch.mask.sum(1, keepdim=True).clamp(min=1)  # [B, D]
        return F.normalize(user, dim=-1, eps=1e-6) @ t.T  # [B, n + 1]

    return score


def content_only_scorer(content: np.ndarray) -> Scorer:
    """The content-only baseline: content_scorer on the catalog's vectors taken about their
    mean (ContentTerm.centre), as the dense content term reads them. content: float[n, D]."""
    centred = ContentTerm().centred_on(content)
    return content_scorer(centred.vectors(content))
