"""Full softmax and logQ-corrected sampled softmax: exact values, gradients, corrections."""

import math

import pytest
import torch
import torch.nn.functional as F

import sidrec.model.loss as loss_module
from sidrec.model.loss import (
    full_softmax_loss,
    log_inclusion_probability,
    sampled_softmax_logq,
    softmax_cross_entropy,
)
from sidrec.offline.train import TrainConfig


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A few rows per chunk, so every test crosses chunk boundaries.
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 40)


def test_full_softmax_matches_brute_force_value_and_gradients() -> None:
    n, p, t = 12, 17, 0.1
    user = unit(p, 6, seed=1).requires_grad_()
    table = unit(n + 1, 6, seed=2).requires_grad_()
    allowed = torch.ones(n + 1, dtype=torch.bool)
    allowed[[0, 5, 9]] = False  # padding and two items that never trained
    g = torch.Generator().manual_seed(3)
    targets = torch.tensor([r for r in torch.randint(1, n + 1, (60,), generator=g) if allowed[r]])
    targets = targets[:p]
    loss = full_softmax_loss(user, table, targets, allowed, t)
    grads = torch.autograd.grad(loss, (user, table))

    # brute force: -log softmax over the allowed rows, one position at a time
    rows = torch.nonzero(allowed).squeeze(1)
    brute = torch.stack(
        [
            -(user[i] @ table[targets[i]] / t) + torch.logsumexp(table[rows] @ user[i] / t, 0)
            for i in range(p)
        ]
    ).mean()
    want = torch.autograd.grad(brute, (user, table))
    torch.testing.assert_close(loss, brute, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert grads[1][~allowed].abs().max() == 0  # rows that do not compete get no gradient


def test_chunked_cross_entropy_passes_gradcheck_with_a_bias() -> None:
    user = unit(9, 4, seed=4).requires_grad_()
    table = unit(7, 4, seed=5).requires_grad_()
    targets = torch.tensor([0, 6, 3, 3, 1, 2, 5, 4, 0])
    bias = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda u, w: softmax_cross_entropy(u, w, targets, bias, 0.2), (user, table)
    )
    # and the value is F.cross_entropy on the materialised logits
    want = F.cross_entropy(user @ table.T / 0.2 + bias, targets)
    torch.testing.assert_close(softmax_cross_entropy(user, table, targets, bias, 0.2), want)


def test_inclusion_probability_matches_sampling() -> None:
    # Candidates: 20 draws from the unigram distribution plus 15 uniform draws from rows
    # 1..n, deduplicated; the closed form must match the observed frequency of each row.
    n, k, r = 8, 20, 15
    unigram = torch.tensor([0, 40, 20, 10, 10, 8, 6, 4, 2], dtype=torch.float64)
    unigram = unigram / unigram.sum()
    log_q = log_inclusion_probability(unigram, k, n, r)
    g = torch.Generator().manual_seed(0)
    trials = 5000
    seen = torch.zeros(n + 1, dtype=torch.float64)
    for _ in range(trials):
        drawn = torch.cat(
            [
                torch.multinomial(unigram, k, True, generator=g),
                torch.randint(1, n + 1, (r,), generator=g),
            ]
        )
        seen[torch.unique(drawn)] += 1
    observed = seen[1:] / trials
    torch.testing.assert_close(log_q[1:].exp(), observed, rtol=0, atol=0.03)
    assert math.isclose(float(log_q[0].exp()), 1 - (1 - 1 / n) ** r, rel_tol=1e-9)


def test_logq_correction_moves_the_sampled_gradient_towards_the_full_one() -> None:
    # Popular items are in-batch negatives far more often than their share; without the
    # correction the expected gradient of the sampled loss is biased. Average the sampled
    # gradient over many batches and compare with the full softmax's.
    torch.manual_seed(0)
    n, d, p, r, t = 30, 8, 12, 4, 0.5
    table = unit(n + 1, d, seed=7)
    user = unit(p, d, seed=8).requires_grad_()
    weights = torch.tensor([0.0] + [1.0 / (i + 1) ** 1.2 for i in range(n)], dtype=torch.float64)
    unigram = weights / weights.sum()
    allowed = torch.ones(n + 1, dtype=torch.bool)
    allowed[0] = False
    log_q = log_inclusion_probability(unigram, p, n, r)

    def mean_gradient(corrected: bool, batches: int = 400) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        total = torch.zeros_like(user)
        full = torch.zeros_like(user)
        for _ in range(batches):
            targets = torch.multinomial(unigram, p, True, generator=g)
            negatives = torch.randint(1, n + 1, (r,), generator=g)
            correction = log_q if corrected else torch.zeros_like(log_q)
            loss = sampled_softmax_logq(user, table, targets, negatives, correction, t)
            total += torch.autograd.grad(loss, user)[0]
            full += torch.autograd.grad(full_softmax_loss(user, table, targets, allowed, t), user)[
                0
            ]
        return total / batches, full / batches

    corrected, full = mean_gradient(True)
    uncorrected, _ = mean_gradient(False)
    err_corrected = (corrected - full).norm() / full.norm()
    err_uncorrected = (uncorrected - full).norm() / full.norm()
    assert err_corrected < 0.5 * err_uncorrected, (err_corrected, err_uncorrected)


def test_logq_over_the_whole_catalog_is_the_full_softmax() -> None:
    # Every row a candidate, no correction: the sampled loss is exactly the full one.
    n, p = 10, 6
    table = unit(n + 1, 5, seed=9)
    user = unit(p, 5, seed=10)
    targets = torch.tensor([1, 4, 4, 7, 10, 2])
    allowed = torch.ones(n + 1, dtype=torch.bool)
    allowed[0] = False
    everything = torch.arange(1, n + 1)
    got = sampled_softmax_logq(user, table, targets, everything, torch.zeros(n + 1), 0.1)
    torch.testing.assert_close(got, full_softmax_loss(user, table, targets, allowed, 0.1))


@pytest.mark.parametrize(
    ("items", "loss", "negatives"),
    [(3_706, "full", 0), (2_000_000, "sampled-logq", 4096)],
)
def test_auto_loss_is_full_where_the_catalog_fits(items: int, loss: str, negatives: int) -> None:
    cfg = TrainConfig().resolved(items, torch.device("cpu"))
    assert (cfg.loss, cfg.num_negatives) == (loss, negatives)
    reference = TrainConfig(loss="sampled-uniform").resolved(items, torch.device("cpu"))
    assert reference.num_negatives == 128
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="bpr")
