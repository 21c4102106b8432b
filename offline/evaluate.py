"""Evaluate any scorer on the validation or test stage of a `Split`.

A scorer maps an `EvalBatch` (users, their most recent history items, time of the target) to
scores float[B, n + 1] over the whole catalog. Ranking (metrics.py) removes each user's FULL
history from the candidates, not only the truncated part the scorer saw; `keep_history=True`
leaves the history in (generative-retrieval papers score that way), and every report says
which rule it used ("history_excluded"). Every stage is
reported overall, per popularity bin of the target (hot / mild / cold, split.py) and split
into cold-start targets (withheld items, candidates still the whole catalog) vs warm targets
(every other target). The cold-start report also carries "random_hr@10", what a uniformly
random ranking would score on those targets, as a scale for such small figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sidrec.offline.metrics import metrics_from_ranks, ranks_from_scores
from sidrec.offline.split import BIN_NAMES, EvalSet, Split

if TYPE_CHECKING:
    from sidrec.model.hstu import HSTU
    from sidrec.model.item_embedding import ItemEmbedding


@dataclass
class EvalBatch:
    users: torch.Tensor  # int64[B] indices into Interactions.users
    items: torch.Tensor  # int64[B, N] the max_history most recent history rows, right-padded 0
    timestamps: torch.Tensor  # int64[B, N] unix seconds (zeros when the data has no time)
    mask: torch.Tensor  # bool[B, N] True = real item
    query_time: torch.Tensor  # int64[B] the target's timestamp (0 without time)
    full_history: torch.Tensor  # int64[B, H] every history row, right-padded 0 (for exclusion)


Scorer = Callable[[EvalBatch], torch.Tensor]  # -> float[B, n + 1]


def _pad(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def eval_batches(
    stage: EvalSet, batch_size: int = 64, max_history: int = 200, device: str = "cpu"
) -> Iterator[tuple[EvalBatch, torch.Tensor]]:
    """Yields (batch, targets int64[B]) in user order."""
    for start in range(0, len(stage), batch_size):
        idx = range(start, min(start + batch_size, len(stage)))
        hist = [stage.histories[i] for i in idx]
        recent = [h[-max_history:] for h in hist]
        width = max(len(r) for r in recent)
        items = _pad(recent, width)
        if stage.history_timestamps is not None and stage.target_timestamps is not None:
            ts = _pad([stage.history_timestamps[i][-max_history:] for i in idx], width)
            query = stage.target_timestamps[start : start + len(idx)]
        else:
            ts = np.zeros_like(items)
            query = np.zeros(len(idx), dtype=np.int64)
        batch = EvalBatch(
            users=torch.as_tensor(stage.users[start : start + len(idx)], device=device),
            items=torch.as_tensor(items, device=device),
            timestamps=torch.as_tensor(ts, device=device),
            mask=torch.as_tensor(items != 0, device=device),
            query_time=torch.as_tensor(query, device=device),
            full_history=torch.as_tensor(_pad(hist, max(len(h) for h in hist)), device=device),
        )
        targets = torch.as_tensor(stage.targets[start : start + len(idx)], device=device)
        yield batch, targets


@torch.no_grad()
def rank_targets(
    scorer: Scorer,
    split: Split,
    stage: str = "valid",
    batch_size: int = 64,
    max_history: int = 200,
    device: str = "cpu",
    subset: np.ndarray | None = None,
    keep_history: bool = False,
) -> np.ndarray:
    """int64 full-catalog rank of the target of every evaluated user (EvalSet order), or only
    of the users at positions `subset` (in that order): lets DDP ranks share the work.
    History items are removed from the candidates unless `keep_history`."""
    users = split.stage(stage)
    if subset is not None:
        users = users.subset(subset)
    # Batches of similar history length: padding (and the model's [N, N] attention) shrinks a
    # lot on real data, where most histories are far shorter than the longest one.
    lengths = np.array([min(len(h), max_history) for h in users.histories], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    ranks = np.zeros(len(users), dtype=np.int64)
    done = 0
    for batch, targets in eval_batches(users.subset(order), batch_size, max_history, device):
        scores = scorer(batch)  # [B, n + 1]
        if scores.shape != (len(targets), split.num_items + 1):
            raise ValueError(f"scorer returned {tuple(scores.shape)}, expected [B, n + 1]")
        history = None if keep_history else batch.full_history
        batch_ranks = ranks_from_scores(scores, targets, history).cpu().numpy()
        ranks[order[done : done + len(targets)]] = batch_ranks
        done += len(targets)
    return ranks


def random_hit_rate(
    split: Split,
    stage: str = "test",
    k: int = 10,
    keep_history: bool = False,
    users: np.ndarray | None = None,
) -> float:
    """Expected HR@k of a uniformly random ranking: the mean over the evaluated users (or those
    where the bool mask `users` is True) of min(k, C) / C, C = the target's candidates, itself
    included: every catalog item, minus the user's other history items unless `keep_history`.
    0 when no user is selected."""
    evaluated = split.stage(stage)
    index = np.arange(len(evaluated)) if users is None else np.flatnonzero(users)
    if len(index) == 0:
        return 0.0
    candidates = np.full(len(index), split.num_items, dtype=np.int64)
    if not keep_history:
        for j, i in enumerate(index):
            # A repeat of the target stays a candidate (metrics.py), so it does not count.
            seen = np.unique(evaluated.histories[i])
            candidates[j] -= len(seen) - int(np.isin(evaluated.targets[i], seen))
    return float(np.mean(np.minimum(k, candidates) / candidates))


def summarize(
    ranks: np.ndarray, split: Split, stage: str = "valid", keep_history: bool = False
) -> dict:
    """Metrics overall, per popularity bin of the target, and cold-start vs warm targets.
    `keep_history` says which candidate rule produced `ranks` (recorded, and used for the
    random rate of the cold-start targets)."""
    targets = split.stage(stage).targets
    target_bin = split.popularity_bin[targets]
    cold_start = split.withheld[targets]
    return {
        "history_excluded": not keep_history,
        "overall": metrics_from_ranks(ranks),
        "by_popularity": {
            name: metrics_from_ranks(ranks[target_bin == b]) for b, name in enumerate(BIN_NAMES)
        },
        "cold_start": {
            **metrics_from_ranks(ranks[cold_start]),
            "random_hr@10": random_hit_rate(split, stage, 10, keep_history, cold_start),
        },
        "warm": metrics_from_ranks(ranks[~cold_start]),
    }


def evaluate(
    scorer: Scorer,
    split: Split,
    stage: str = "valid",
    batch_size: int = 64,
    max_history: int = 200,
    device: str = "cpu",
    keep_history: bool = False,
) -> dict:
    """The JSON-ready report of `summarize` for `scorer` on `stage` ("valid" or "test");
    `keep_history` leaves the user's history items in the candidates."""
    ranks = rank_targets(
        scorer, split, stage, batch_size, max_history, device, keep_history=keep_history
    )
    return summarize(ranks, split, stage, keep_history)


def hstu_scorer(encoder: HSTU, items: ItemEmbedding, trained: np.ndarray | torch.Tensor) -> Scorer:
    """Scores with the trained model exactly as the service will: item table with the id part
    dropped for rows never trained (withheld / never-rated items get their SID-only vector),
    user vector = encoder output at the last history position with the target's time as query
    time, score = cosine against the L2-normalised table (dot product with the raw table for
    scoring "dot"). Call under eval mode."""
    param = next(items.parameters())
    with torch.no_grad():
        trained_t = torch.as_tensor(trained, dtype=torch.bool, device=param.device)
        table = items.table(trained_t)  # [n + 1, d] raw vectors
    return table_scorer(encoder, table)


def table_scorer(
    encoder: HSTU,
    table: torch.Tensor,
    scales: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    history_table: torch.Tensor | None = None,
) -> Scorer:
    """Scores with `encoder` over the item table [n + 1, d] (raw vectors, row 0 zero): the
    history's rows are the encoder's input, the score against every row is the cosine (or, for
    an encoder with scoring "dot", the dot product with the raw row), times the row's score
    scale (scales [n + 1], e.g. a content tower's new-item scale) when given, minus the row's
    offset (offsets [n + 1]; inf: never recommended) when given: what the service's index
    ranks by. `history_table` [n + 1, d], for ablations: what the encoder reads instead."""
    from sidrec.model.hstu import UserEncoder

    user_encoder = UserEncoder(encoder)
    cosine = encoder.scoring == "cosine"
    scored = F.normalize(table, dim=-1, eps=1e-6) if cosine else table  # [n + 1, d]
    if scales is not None:
        scored = scored * scales[:, None].to(scored.dtype)

    @torch.no_grad()
    def score(batch: EvalBatch) -> torch.Tensor:
        x = (table if history_table is None else history_table)[batch.items]  # [B, N, d]
        user = user_encoder(x, batch.timestamps, batch.mask, batch.query_time)  # [B, d]
        scores = user @ scored.T  # [B, n + 1]
        return scores if offsets is None else scores - offsets[None, :].to(scores.dtype)

    return score
