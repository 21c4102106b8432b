"""Split, metrics, evaluator, baselines and plots on small hand-built data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sidrec.offline.baselines import content_only_scorer, content_scorer, most_popular_scorer
from sidrec.offline.data.dataset import Catalog, Interactions
from sidrec.offline.evaluate import EvalBatch, evaluate, random_hit_rate, rank_targets
from sidrec.offline.metrics import CUTOFFS, metrics_from_ranks, ranks_from_scores
from sidrec.offline.split import BIN_NAMES, make_split, popularity_bins


def make_catalog(n: int) -> Catalog:
    return Catalog(
        ids=[f"i{r}" for r in range(1, n + 1)],
        titles=[f"item {r}" for r in range(1, n + 1)],
        fields=[{} for _ in range(n)],
        genres=[() for _ in range(n)],
    )


def random_interactions(num_users: int = 80, n: int = 60, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    sequences, timestamps = [], []
    for _ in range(num_users):
        length = int(rng.integers(1, 25))
        # Skewed popularity so the bins are non-trivial.
        s = np.minimum(rng.zipf(1.5, size=length), n).astype(np.int64)
        sequences.append(s)
        timestamps.append(np.sort(rng.integers(1_000_000, 2_000_000, size=length)))
    return Interactions(
        name="toy",
        catalog=make_catalog(n),
        users=[f"u{u}" for u in range(num_users)],
        sequences=sequences,
        timestamps=timestamps,
    )


# --- split -------------------------------------------------------------------------------------


def test_split_targets_histories_and_training() -> None:
    data = random_interactions()
    split = make_split(data, cold_fraction=0.1, seed=3)
    long_users = [u for u, s in enumerate(data.sequences) if len(s) >= 3]
    assert split.num_short_users == len(data.users) - len(long_users)
    assert split.test.users.tolist() == long_users == split.valid.users.tolist()
    for i, u in enumerate(long_users):
        s, ts = data.sequences[u], data.timestamps[u]
        assert split.test.targets[i] == s[-1] and split.valid.targets[i] == s[-2]
        assert split.test.target_timestamps[i] == ts[-1]
        assert split.valid.target_timestamps[i] == ts[-2]
        np.testing.assert_array_equal(split.test.histories[i], s[:-1])  # withheld items kept
        np.testing.assert_array_equal(split.valid.histories[i], s[:-2])
        np.testing.assert_array_equal(split.valid.history_timestamps[i], ts[:-2])
    for u, s in enumerate(data.sequences):
        train = s[:-2] if len(s) >= 3 else s
        keep = ~split.withheld[train]
        np.testing.assert_array_equal(split.train_sequences[u], train[keep])
        np.testing.assert_array_equal(
            split.train_timestamps[u], data.timestamps[u][: len(train)][keep]
        )


def test_split_withheld_items_never_in_training() -> None:
    data = random_interactions()
    split = make_split(data, cold_fraction=0.1, seed=3)
    rated = np.unique(np.concatenate(data.sequences))
    assert split.withheld.sum() == round(0.1 * len(rated))
    assert set(np.flatnonzero(split.withheld)) <= set(rated.tolist())
    train_rows = np.concatenate(split.train_sequences)
    assert not split.withheld[train_rows].any()
    assert (split.trained == np.isin(np.arange(data.num_items + 1), train_rows)).all()
    assert not split.trained[0] and not (split.trained & split.withheld).any()
    assert split.train_counts.sum() == len(train_rows)
    # The held-out items still occur in evaluation histories or targets.
    eval_rows = np.concatenate([*split.test.histories, split.test.targets])
    assert split.withheld[eval_rows].any()


def test_split_is_deterministic_for_a_seed() -> None:
    data = random_interactions()
    a, b = make_split(data, 0.1, seed=5), make_split(data, 0.1, seed=5)
    c = make_split(data, 0.1, seed=6)
    assert (a.withheld == b.withheld).all() and (a.popularity_bin == b.popularity_bin).all()
    assert not (a.withheld == c.withheld).all()


def test_popularity_bins_definition() -> None:
    # 10 items with counts summing to 100; sorted desc: 40 20 15 10 5 5 3 1 1 0.
    counts = np.array([0, 5, 40, 1, 15, 0, 20, 3, 10, 5, 1], dtype=np.int64)
    bins = popularity_bins(counts)
    # Before-shares: 40:0 (hot), 20:40% (mild), 15:60% (mild), 10:75% (cold), rest cold.
    assert bins[2] == 0
    assert bins[6] == 1 and bins[4] == 1
    assert all(bins[r] == 2 for r in (8, 1, 9, 7, 3, 10, 5))
    split = make_split(random_interactions(), 0.05, seed=1)
    bins = split.popularity_bin[1:]
    assert set(np.unique(bins)) <= set(range(len(BIN_NAMES)))
    share = [split.train_counts[1:][bins == b].sum() / split.num_train_events for b in range(3)]
    assert share[0] >= 0.25 and share[0] + share[1] >= 0.75
    assert (split.popularity_bin[split.withheld] == 2).all()
    # Every hot item is at least as popular as every mild one, every mild one as every cold one.
    c = split.train_counts[1:]
    assert c[bins == 0].min() >= c[bins == 1].max() >= c[bins == 2].max()


def test_split_without_timestamps() -> None:
    data = random_interactions()
    data = Interactions("toy", data.catalog, data.users, data.sequences, None)
    split = make_split(data, 0.0, seed=0)
    assert split.train_timestamps is None and split.test.target_timestamps is None
    assert not split.withheld.any()
    report = evaluate(most_popular_scorer(split), split, "test")
    assert report["overall"]["count"] == len(split.test)


# --- metrics -----------------------------------------------------------------------------------


def test_ranks_and_metrics_hand_example() -> None:
    scores = torch.tensor(
        [
            [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],  # target 2, row 3 seen -> only row 5 is above: rank 2
            [0.0, 0.2, 0.2, 0.8, 0.1, 0.0],  # target 1 also in history, row 3 seen, row 2 ties: 2
            [0.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # target 5, row 4 seen: rows 1-3 above: rank 4
            [5.0, 0.9, 0.2, 0.2, 0.1, 0.0],  # target 1, nothing seen, row 0 never counts: rank 1
        ]
    )
    targets = torch.tensor([2, 1, 5, 1])
    history = torch.tensor([[3, 0], [3, 1], [4, 0], [0, 0]])
    ranks = ranks_from_scores(scores, targets, history)
    assert ranks.tolist() == [2, 2, 4, 1]
    m = metrics_from_ranks(ranks.numpy(), cutoffs=(1, 3))
    assert m["count"] == 4
    assert m["hr@1"] == pytest.approx(1 / 4) and m["hr@3"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@3"] == pytest.approx((2 / math.log2(3) + 1) / 4)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4 + 1) / 4)
    # A constant scorer ranks every target last, not first.
    flat = ranks_from_scores(torch.zeros(2, 6), torch.tensor([1, 4]), torch.tensor([[2], [0]]))
    assert flat.tolist() == [4, 5]
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.full((1, 6), torch.nan), torch.tensor([1]), history[:1])
    full = metrics_from_ranks(np.array([1, 6, 11, 51, 201]))
    assert CUTOFFS == (5, 10, 50, 200)  # @5 and @10 as the Amazon literature, @50/@200 as HSTU
    assert [full[f"hr@{k}"] for k in CUTOFFS] == [0.2, 0.4, 0.6, 0.8]
    assert full["ndcg@5"] == pytest.approx(0.2)
    assert full["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 5)
    empty = metrics_from_ranks(np.array([], dtype=np.int64))
    assert empty["hr@5"] == empty["ndcg@5"] == 0.0


def test_keep_history_leaves_history_items_as_candidates() -> None:
    scores = torch.tensor(
        [
            [0.0, 0.9, 0.5, 0.8, 0.1],  # target 2; history item 1 and item 3 score above it
            [0.0, 0.2, 0.7, 0.1, 0.6],  # target 4; history item 2 is above it, nothing else
        ]
    )
    targets = torch.tensor([2, 4])
    history = torch.tensor([[1, 0], [2, 4]])  # user 2 also had the target before (a repeat)
    excluded = ranks_from_scores(scores, targets, history)
    kept = ranks_from_scores(scores, targets, None)
    assert excluded.tolist() == [2, 1]  # only item 3 above the first target
    assert kept.tolist() == [3, 2]  # the history items now compete


def test_evaluate_keep_history_option_and_its_record() -> None:
    split = make_split(tiny_interactions(), cold_fraction=0.0)
    scorer = most_popular_scorer(split)
    # Every test user's history holds the popular items 1, 2 (and 3), which outrank the target.
    assert rank_targets(scorer, split, "test").tolist() == [1, 2, 2]
    assert rank_targets(scorer, split, "test", keep_history=True).tolist() == [5, 5, 5]
    default = evaluate(scorer, split, "test")
    kept = evaluate(scorer, split, "test", keep_history=True)
    assert default["history_excluded"] is True and kept["history_excluded"] is False
    assert default["overall"]["hr@5"] == 1.0 and kept["overall"]["mrr"] == pytest.approx(0.2)
    assert default["cold_start"]["random_hr@10"] == 0.0  # no cold-start targets here


def test_random_hit_rate_counts_candidates_per_rule() -> None:
    split = make_split(tiny_interactions(), cold_fraction=0.0)
    # n = 5. Test users: a (history 2,1,3,4): 1 candidate; b (2,1,2,5): 2; c (2,3,1): 2.
    assert random_hit_rate(split, "test", k=1) == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert random_hit_rate(split, "test", k=10) == 1.0
    assert random_hit_rate(split, "test", k=1, keep_history=True) == pytest.approx(1 / 5)
    only_b = np.array([False, True, False])
    assert random_hit_rate(split, "test", k=1, users=only_b) == pytest.approx(1 / 2)
    assert random_hit_rate(split, "test", users=np.zeros(3, dtype=bool)) == 0.0
    # A target repeated from the history stays a candidate: history 1,2 -> 5 - 1 = 4.
    repeat = Interactions("r", make_catalog(5), ["a"], [np.array([1, 2, 1])], None)
    assert random_hit_rate(make_split(repeat, 0.0), "test", k=1) == pytest.approx(1 / 4)
    # It is the mean HR@1 of uniformly random scores (ties have probability 0).
    scores = torch.rand(4000, 6, generator=torch.Generator().manual_seed(0))
    targets = torch.ones(4000, dtype=torch.int64)
    ranks = ranks_from_scores(scores, targets, torch.tensor([[1, 2]]).expand(4000, 2))
    assert (ranks == 1).double().mean().item() == pytest.approx(1 / 4, abs=0.03)


# --- evaluator ---------------------------------------------------------------------------------


def oracle_scorer(split, stage: str, history_first: bool):
    """Scores the target second-best after the history items, or best of all."""
    stage_set = split.stage(stage)
    target_of = dict(zip(stage_set.users.tolist(), stage_set.targets.tolist(), strict=True))

    def score(batch: EvalBatch) -> torch.Tensor:
        s = torch.zeros(len(batch.users), split.num_items + 1)
        for i, u in enumerate(batch.users.tolist()):
            s[i, target_of[u]] = 1.0
            if history_first:
                s[i, batch.full_history[i]] = 2.0
                s[i, 0] = 0.0
        return s

    return score


def test_evaluator_excludes_full_history_and_reports_groups() -> None:
    data = random_interactions(num_users=120, n=80, seed=2)
    # Make targets repeat-free so history-first really outranks them before exclusion.
    for s in data.sequences:
        s[:] = np.random.default_rng(len(s)).permutation(80)[: len(s)] + 1
    split = make_split(data, cold_fraction=0.2, seed=0)
    for stage in ("valid", "test"):
        ranks = rank_targets(oracle_scorer(split, stage, True), split, stage, max_history=2)
        assert (ranks == 1).all()
    # The scorer above rates the whole history highest while seeing only 2 items: ranks of 1
    # prove the evaluator excluded the full history, not the truncated view.
    report = evaluate(oracle_scorer(split, "test", True), split, "test", batch_size=7)
    assert report["overall"]["hr@10"] == 1.0
    n_eval = len(split.test)
    bins = report["by_popularity"]
    assert sum(bins[name]["count"] for name in BIN_NAMES) == n_eval
    cold = int(split.withheld[split.test.targets].sum())
    assert cold > 0
    assert report["cold_start"]["count"] == cold and report["warm"]["count"] == n_eval - cold


def test_evaluator_rejects_wrong_score_shape() -> None:
    split = make_split(random_interactions(), 0.0)
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda b: torch.zeros(len(b.users), 3), split)


# --- baselines ---------------------------------------------------------------------------------


def tiny_interactions() -> Interactions:
    # Items 1..5. Training parts (s[:-2]) make item 2 the most popular, then 1, then 3.
    sequences = [
        np.array([2, 1, 3, 4, 5]),
        np.array([2, 1, 2, 5, 4]),
        np.array([2, 3, 1, 4]),
        np.array([1, 2]),
    ]
    return Interactions("tiny", make_catalog(5), ["a", "b", "c", "d"], sequences, None)


def test_most_popular_baseline_toy() -> None:
    split = make_split(tiny_interactions(), cold_fraction=0.0)
    # Training counts: item 2 x5, item 1 x3 (user d counts fully: short user), item 3 x2.
    assert split.train_counts.tolist() == [0, 3, 5, 2, 0, 0]
    ranks = rank_targets(most_popular_scorer(split), split, "test")
    # a: target 5, history 2,1,3,4 -> alone: 1. b: target 4, history 2,1,2,5 -> item 3 above: 2.
    # c: target 4, history 2,3,1 -> item 5 ties at 0, ties count against the target: 2.
    assert ranks.tolist() == [1, 2, 2]
    ranks = rank_targets(most_popular_scorer(split), split, "valid")
    # a: target 4 ties with 5: 2. b: target 5, history 2,1,2 -> item 3 above, 4 ties: 3.
    # c: target 1, history 2,3 -> only zero-count items left: 1.
    assert ranks.tolist() == [2, 3, 1]


def test_content_baseline_toy() -> None:
    split = make_split(tiny_interactions(), cold_fraction=0.0)
    content = np.array(
        [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.1, 0.0, 1.0]]
    )
    scorer = content_scorer(content)
    ranks = rank_targets(scorer, split, "test")
    # User a: history 2,1,3,4 -> mean points most to 4/5 region; only 5 is left: rank 1.
    assert ranks[0] == 1
    # User c (history 2,3,1; target 4): candidates 4 and 5; 5 is closer to the mean of 1,2,3.
    assert ranks[2] == 2
    batch = next(iter(_single_batch(split)))
    s = scorer(batch)
    assert s.shape == (3, 6) and torch.isfinite(s).all()


def test_content_only_baseline_ranks_by_the_cosine_about_the_catalogs_mean() -> None:
    """Items that share one large direction: the plain cosine puts the most typical item
    first for a history of one kind; taken about the catalog's mean, the item of that kind."""
    from sidrec.offline.evaluate import EvalBatch

    # rows 1-6: two kinds (second and third axis) on a common direction; row 5 is the
    # common direction alone, row 6 far along the first kind
    content = np.array([5.0, 0.0, 0.0]) + np.array(
        [[0, 1, 0], [0, 0.8, 0.2], [0, 0, 1], [0, 0.2, 0.8], [0, 0, 0], [0, 3, 0]], np.float64
    )
    history = torch.tensor([[1, 2, 0]])  # of the first kind, one padding slot
    zeros = torch.zeros((1, 3), dtype=torch.int64)
    batch = EvalBatch(torch.tensor([0]), history, zeros, history > 0, torch.tensor([0]), history)
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    scores = content_only_scorer(content)(batch)  # [1, 7]
    torch.testing.assert_close(scores, content_scorer(unit - unit.mean(0))(batch))
    plain = content_scorer(content)(batch)
    assert plain[0, 5] > plain[0, 6]  # the common direction alone beats the history's kind
    assert scores[0, 6] > scores[0, 5] and scores[0, 6] == scores[0, 3:].max()  # unseen items


def _single_batch(split):
    from sidrec.offline.evaluate import eval_batches

    for batch, _ in eval_batches(split.test):
        yield batch


def test_ranks_come_back_in_user_order() -> None:
    # The evaluator batches users by history length; ranks must still line up with EvalSet.
    split = make_split(random_interactions(num_users=150, seed=4), 0.1, seed=0)
    counts = torch.as_tensor(split.train_counts, dtype=torch.float32)
    ranks = rank_targets(most_popular_scorer(split), split, "test", batch_size=16)
    for i, (history, target) in enumerate(
        zip(split.test.histories, split.test.targets, strict=True)
    ):
        expected = ranks_from_scores(
            counts[None], torch.tensor([target]), torch.as_tensor(history)[None]
        )
        assert ranks[i] == expected.item()


# --- plots -------------------------------------------------------------------------------------


def test_plots_are_written(tmp_path) -> None:
    import matplotlib.image

    from sidrec.offline.plots import plot_all

    split = make_split(random_interactions(num_users=150, seed=4), 0.1, seed=0)
    rng = np.random.default_rng(0)
    reports = {
        "most-popular": evaluate(most_popular_scorer(split), split, "test"),
        "content": evaluate(content_scorer(rng.normal(size=(60, 8))), split, "test"),
    }
    curves = {
        name: [{"epoch": e, "valid": {"ndcg@10": 0.1 * e, "hr@10": 0.2 * e}} for e in (1, 2, 3)]
        for name in ("id", "hybrid")
    }
    paths = plot_all(curves, reports, tmp_path / "plots")
    assert [p.name for p in paths] == [
        "validation_curves.png",
        "popularity_bins.png",
        "cold_vs_warm.png",
    ]
    for p in paths:
        image = matplotlib.image.imread(p)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_content_scorer_with_a_half_life_weighs_the_latest_events_most() -> None:
    from sidrec.content_term import recency_weights

    rng = np.random.default_rng(3)
    content = rng.normal(size=(7, 4))
    history = torch.tensor([[3, 1, 6, 2], [5, 4, 0, 0]])  # oldest first, right-padded
    zeros = torch.zeros((2, 4), dtype=torch.int64)
    batch = EvalBatch(torch.tensor([0, 1]), history, zeros, history > 0, torch.tensor([0, 0]),
                      history)  # fmt: skip
    scores = content_scorer(content, half_life=2.0)(batch)  # [2, 8]
    unit = content / np.linalg.norm(content, axis=1, keepdims=True)
    for b, rows in enumerate(([3, 1, 6, 2], [5, 4])):
        user = recency_weights(len(rows), 2.0) @ unit[np.array(rows) - 1]
        want = unit @ (user / np.linalg.norm(user))
        np.testing.assert_allclose(scores[b, 1:].numpy(), want, atol=1e-5)


def test_content_only_baseline_chooses_its_half_life_on_validation() -> None:
    """Users who move from one kind of item to another: the history's plain mean points at
    the old kind, the latest events at the new one, where the next item lies."""
    from sidrec.offline.baselines import (
        CONTENT_HALF_LIVES,
        choose_content_half_life,
        content_only_baseline,
    )

    rng = np.random.default_rng(0)
    kinds, per_kind = 6, 10
    n = kinds * per_kind
    content = np.repeat(np.eye(kinds), per_kind, axis=0) + 0.2 * rng.normal(size=(n, kinds))
    sequences = []
    for _ in range(120):
        old, new = rng.choice(kinds, 2, replace=False)
        old_items = rng.choice(per_kind, 8, replace=False) + old * per_kind + 1
        new_items = rng.choice(per_kind, 4, replace=False) + new * per_kind + 1
        sequences.append(np.concatenate([old_items, new_items]).astype(np.int64))
    data = Interactions(
        name="drift", catalog=make_catalog(n), users=[f"u{u}" for u in range(len(sequences))],
        sequences=sequences, timestamps=[np.arange(len(s)) + 1_000_000 for s in sequences],
    )  # fmt: skip
    split = make_split(data, cold_fraction=0.0)
    half_life, figures = choose_content_half_life(content, split, max_history=50)
    assert set(figures) == {str(h) for h in CONTENT_HALF_LIVES}
    assert half_life is not None and half_life <= 5.0
    assert figures[str(half_life)] == max(figures.values()) > figures["None"] + 0.1
    scorer, record = content_only_baseline(content, split, max_history=50)
    assert record == {"half_life": half_life, "valid_ndcg@10_by_half_life": figures}
    ranks = rank_targets(scorer, split, "valid", max_history=50)
    assert metrics_from_ranks(ranks)["ndcg@10"] == pytest.approx(figures[str(half_life)])
