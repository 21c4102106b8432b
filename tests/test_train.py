"""Trainer: loss equivalence, determinism, learning a planted pattern, checkpoints, DDP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidrec.model.loss import (
    sampled_softmax_loss,
    sampled_softmax_shared,
    sampled_softmax_via_table,
)
from sidrec.offline.baselines import most_popular_scorer
from sidrec.offline.data.dataset import Catalog, Interactions
from sidrec.offline.evaluate import evaluate, hstu_scorer
from sidrec.offline.split import make_split
from sidrec.offline.train import (
    TrainConfig,
    TrainingSequences,
    load_checkpoint,
    train,
    training_sequences,
)
from sidrec.offline.train_ddp import launch, save_job
from sidrec.sid_codebook import dedup_digits

NUM_ITEMS = 60


def planted_interactions(num_users: int = 120, seed: int = 0) -> Interactions:
    """Users walk one fixed random cycle over the catalog (90% of steps), so the next item is
    predictable from the last one while popularity is flat."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(NUM_ITEMS) + 1
    successor = np.zeros(NUM_ITEMS + 1, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    sequences, timestamps = [], []
    for _ in range(num_users):
        length = int(rng.integers(8, 16))
        s = [int(rng.integers(1, NUM_ITEMS + 1))]
        for _ in range(length - 1):
            jump = rng.random() < 0.1
            s.append(int(rng.integers(1, NUM_ITEMS + 1)) if jump else int(successor[s[-1]]))
        sequences.append(np.array(s, dtype=np.int64))
        timestamps.append(1_600_000_000 + np.cumsum(rng.integers(60, 86_400, size=length)))
    catalog = Catalog(
        ids=[str(r) for r in range(1, NUM_ITEMS + 1)],
        titles=[f"item {r}" for r in range(1, NUM_ITEMS + 1)],
        fields=[{} for _ in range(NUM_ITEMS)],
        genres=[() for _ in range(NUM_ITEMS)],
    )
    return Interactions(
        "planted", catalog, [f"u{u}" for u in range(num_users)], sequences, timestamps
    )


def random_sids(layers: int = 2, codes: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    semantic = rng.integers(0, codes, size=(NUM_ITEMS, layers))
    sids = np.zeros((NUM_ITEMS + 1, layers + 1), dtype=np.int64)
    sids[1:, :layers] = semantic
    sids[1:, layers] = dedup_digits(semantic)
    return sids


def tiny_config(**overrides: object) -> TrainConfig:
    base = dict(
        variant="hybrid",
        d=16,
        num_blocks=1,
        num_heads=1,
        dqk=16,
        dv=16,
        max_len=20,
        padded_len=24,
        dropout=0.0,
        lr=5e-3,
        batch_size=32,
        epochs=3,
        patience=3,
        num_negatives=16,
        id_dropout=0.1,
        threads=1,
        progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_table_loss_equals_loss_module() -> None:
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1).requires_grad_()
    user = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1).requires_grad_()
    pos_rows = torch.randint(1, 30, (50,))
    neg_rows = torch.randint(1, 30, (50, 12))
    neg_rows[:5, 0] = pos_rows[:5]  # some negatives hit the positive and must be masked
    reference = sampled_softmax_loss(user, table[pos_rows], table[neg_rows], pos_rows, neg_rows)
    grads_ref = torch.autograd.grad(reference, (user, table))
    ours = sampled_softmax_via_table(user, table, pos_rows, neg_rows, 0.05)
    grads = torch.autograd.grad(ours, (user, table))
    torch.testing.assert_close(ours, reference)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_shared_negatives_loss_is_the_per_position_loss_with_the_draw_repeated() -> None:
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1).requires_grad_()
    out = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1).requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding positions count for nothing
    mask[3, 1:] = False
    targets = torch.randint(1, 30, (4, 6)) * mask
    neg_rows = torch.randint(1, 30, (4, 12))
    neg_rows[0, 3] = targets[0, 2]  # a negative equal to a position's positive is masked there
    user = out * mask[..., None]
    ours = sampled_softmax_shared(user, table, targets, neg_rows, mask, 0.05)
    per_position = neg_rows[:, None, :].expand(4, 6, 12)[mask]  # [P, R]
    pos_rows = targets[mask]
    reference = sampled_softmax_loss(
        out[mask], table[pos_rows], table[per_position], pos_rows, per_position, 0.05
    )
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours, (out, table))
    grads_ref = torch.autograd.grad(reference, (out, table))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_time_bias_backward_equals_embedding_backward() -> None:
    from sidrec.model.hstu import ScalarLookup

    torch.manual_seed(0)
    w = torch.randn(9, requires_grad=True)
    idx = torch.randint(0, 9, (3, 5, 5))
    grad = torch.randn(3, 5, 5)
    ours = torch.autograd.grad(ScalarLookup.apply(w, idx), w, grad)[0]
    reference = torch.autograd.grad(F.embedding(idx, w[:, None]).squeeze(-1), w, grad)[0]
    torch.testing.assert_close(ours, reference)


def test_training_is_deterministic(tmp_path) -> None:
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    sids = random_sids()
    a = train(data, split, sids, 8, tiny_config(epochs=2), tmp_path / "a", log=lambda _: None)
    b = train(data, split, sids, 8, tiny_config(epochs=2), tmp_path / "b", log=lambda _: None)
    assert [e["train_loss"] for e in a.epochs] == [e["train_loss"] for e in b.epochs]
    assert [e["valid"] for e in a.epochs] == [e["valid"] for e in b.epochs]
    assert a.test == b.test
    for key, value in a.best_state.items():
        assert torch.equal(value, b.best_state[key]), key
    c = train(
        data, split, sids, 8, tiny_config(epochs=2, seed=1), tmp_path / "c", log=lambda _: None
    )
    assert [e["train_loss"] for e in a.epochs] != [e["train_loss"] for e in c.epochs]


@pytest.mark.parametrize(
    ("loss", "attn_norm", "scoring"),
    [
        ("sampled-logq", "length", "cosine"),
        ("sampled-uniform", "padded", "cosine"),
        ("full", "length", "cosine"),
        ("full", "length", "dot"),
    ],
)
def test_every_loss_learns_the_planted_pattern(
    tmp_path, loss: str, attn_norm: str, scoring: str
) -> None:
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    cfg = tiny_config(epochs=12, patience=4, variant="id", loss=loss, attn_norm=attn_norm)
    cfg.num_negatives = 16 if loss == "sampled-logq" else 0  # far fewer than the catalog
    if scoring == "dot":  # SASRec's scoring and feed-forward layers
        cfg.scoring, cfg.ffn_mult = "dot", 2
    result = train(data, split, None, None, cfg, tmp_path / loss, log=lambda _: None)
    popular = evaluate(most_popular_scorer(split), split, "test")
    warm_model, warm_popular = result.test["warm"]["hr@10"], popular["warm"]["hr@10"]
    assert warm_model > 0.5 and warm_model > warm_popular + 0.2, (loss, warm_model, warm_popular)
    metrics = json.loads((tmp_path / loss / "metrics.json").read_text())
    assert (metrics["config"]["loss"], metrics["config"]["attn_norm"]) == (loss, attn_norm)


def test_training_learns_planted_pattern_and_checkpoint_reloads(tmp_path) -> None:
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    out = tmp_path / "run"
    result = train(data, split, random_sids(), 8, tiny_config(epochs=25, patience=4), out)
    popular = evaluate(most_popular_scorer(split), split, "test")
    warm_model, warm_popular = result.test["warm"]["hr@10"], popular["warm"]["hr@10"]
    assert warm_model > 0.6 and warm_model > warm_popular + 0.3, (warm_model, warm_popular)

    # Files: one log line per epoch, metrics of the best epoch, a checkpoint that reproduces them.
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [e["epoch"] for e in result.epochs]
    assert len(lines) < 25 or result.best_epoch >= 21  # early stopping fired, or still improving
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch
    best_line = lines[result.best_epoch - 1]
    assert metrics["valid"]["overall"] == best_line["valid"]
    assert max(x["valid"]["ndcg@10"] for x in lines) == best_line["valid"]["ndcg@10"]
    assert metrics["test"] == result.test
    model, cfg, ckpt = load_checkpoint(out / "checkpoint.pt")
    # the checkpoint records the loss actually used: "auto" resolved for this catalog
    resolved = tiny_config(epochs=25, patience=4).resolved(data.num_items, torch.device("cpu"))
    assert cfg == resolved and cfg.loss == "full" and ckpt["epoch"] == result.best_epoch
    reloaded = evaluate(hstu_scorer(model.encoder, model.items, ckpt["trained"]), split, "test")
    assert reloaded == result.test


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync(tmp_path) -> None:
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    # use_time=False leaves the time-bias tables without gradients: DDP must cope.
    cfg = tiny_config(epochs=2, patience=5, use_time=False, device="cpu")
    job = save_job(tmp_path / "job.pt", data, split, random_sids(), 8, cfg)
    out = tmp_path / "ddp"
    launch(job, out, nproc_per_node=2, timeout=240)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes, once per epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_run"] == 2
    # Ranks saw different users and negatives: only gradient averaging keeps them identical.
    assert metrics["ddp_max_param_diff"] == 0.0
    model, _, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (
        evaluate(hstu_scorer(model.encoder, model.items, ckpt["trained"]), split, "test")
        == (metrics["test"])
    )


def test_ddp_launch_failure_shows_the_ranks_output(tmp_path, monkeypatch) -> None:
    import subprocess

    from sidrec.offline import train_ddp

    # A real torchrun whose ranks fail (no job file): the error carries their traceback, and a
    # failure that is not a rendezvous race is not retried.
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(command, **kwargs):
        calls.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(train_ddp.subprocess, "run", counting_run)
    with pytest.raises(train_ddp.TrainingLaunchError) as failure:
        launch(tmp_path / "missing.pt", tmp_path / "out", nproc_per_node=1, timeout=120)
    assert "missing.pt" in str(failure.value) and "last lines of the ranks' output" in str(
        failure.value
    )
    assert len(calls) == 1

    # A port race before the first epoch is tried once more; the second try's result stands.
    outcomes = iter(
        [
            subprocess.CompletedProcess(
                [], 1, "", "torch.distributed.DistNetworkError: Address already in use"
            ),
            subprocess.CompletedProcess([], 0, "ok", ""),
        ]
    )
    monkeypatch.setattr(train_ddp.subprocess, "run", lambda command, **kwargs: next(outcomes))
    assert launch(tmp_path / "job.pt", tmp_path / "out").stdout == "ok"
    # ... but not once an epoch was logged: the job itself ran, so its failure is real.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_log.jsonl").write_text('{"epoch": 1}\n')
    race = subprocess.CompletedProcess([], 1, "", "Connection reset by peer")
    monkeypatch.setattr(train_ddp.subprocess, "run", lambda command, **kwargs: race)
    with pytest.raises(train_ddp.TrainingLaunchError):
        launch(tmp_path / "job.pt", tmp_path / "out")


def test_length_grouped_batches_partition_users() -> None:
    from sidrec.offline.train import length_grouped_batches

    lengths = torch.as_tensor(np.random.default_rng(0).integers(1, 200, size=300))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    batches = length_grouped_batches(order, lengths, 8, seed=0, epoch=1)
    assert sorted(torch.cat(batches).tolist()) == list(range(300))
    assert all(len(b) <= 8 for b in batches)

    # Within a window of 16 batches users are sorted, so batches hold similar lengths: the
    # padding (sum of batch width * batch size) is far below that of the shuffled order.
    def padded(bs: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max()) * len(b) for b in bs)

    assert padded(batches) < 0.7 * padded(list(order.split(8)))
    again = length_grouped_batches(order, lengths, 8, seed=0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def _row_pairs(seqs: TrainingSequences) -> list[tuple[int, int, int, int]]:
    """(input, target, input time, target time) of every position in the loss (target > 0)."""
    out = []
    for i, k in enumerate(seqs.lengths.tolist()):
        parts = (seqs.inputs, seqs.targets, seqs.timestamps, seqs.next_timestamps)
        assert all(int(p[i, k:].abs().sum()) == 0 for p in parts)  # right-padded with zeros
        assert bool((seqs.inputs[i, :k] > 0).all())
        scored = seqs.targets[i, :k] > 0
        out += zip(*(p[i, :k][scored].tolist() for p in parts), strict=True)
    return sorted(out)


@pytest.mark.parametrize("windows", ["all", "overlap", "prefix"])
def test_windows_make_every_training_event_a_target_once(windows: str) -> None:
    split = make_split(planted_interactions(), 0.05, seed=0)
    max_len = 6
    every, recent = [], []
    for s, t in zip(split.train_sequences, split.train_timestamps, strict=True):
        pairs = list(zip(s[:-1], s[1:], t[:-1], t[1:], strict=True))
        pairs = [tuple(int(x) for x in p) for p in pairs]
        every += pairs
        recent += pairs[-max_len:]
    assert len(every) > 1.4 * len(recent)  # most users are longer than max_len here

    last = training_sequences(split, max_len, "last")
    assert _row_pairs(last) == sorted(recent)
    assert bool((last.targets[last.inputs > 0] > 0).all())  # no context-only positions
    rows = training_sequences(split, max_len, windows)
    assert _row_pairs(rows) == sorted(every)
    assert int(rows.lengths.max()) == max_len and len(rows.lengths) > len(last.lengths)
    # overlap: an earlier row's first scored target sees max_len // 2 items before it
    context = (rows.inputs > 0).sum(1) - (rows.targets > 0).sum(1)  # [rows]
    if windows == "all":
        assert int(context.max()) == 0
    elif windows == "prefix":
        # one row per target, in the loss at its last position, behind min(max_len, i) items
        assert len(rows.lengths) == len(every)
        scored = rows.targets > 0
        assert bool((scored.sum(1) == 1).all())
        assert bool(scored[torch.arange(len(rows.lengths)), rows.lengths - 1].all())
        assert int((rows.lengths == max_len).sum()) > len(last.lengths)
    else:
        assert set(context.tolist()) <= set(range(max_len // 2 + 1))
        assert int((context == max_len // 2).sum()) > 0
        # a row with context is a full one, unless it reaches the user's first event
        full = rows.lengths == max_len
        assert bool((full | (context == 0) | (rows.targets[:, 0] == 0)).all())
    with pytest.raises(ValueError, match="windows"):
        tiny_config(windows="random")


@pytest.mark.parametrize("loss", ["full", "sampled-logq", "sampled-uniform"])
def test_training_on_overlapping_windows_learns_the_planted_pattern(tmp_path, loss: str) -> None:
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    cfg = tiny_config(variant="id", epochs=12, patience=4, max_len=4, windows="overlap")
    cfg.loss = loss
    result = train(data, split, None, None, cfg, tmp_path / "run", log=lambda _: None)
    popular = evaluate(most_popular_scorer(split), split, "test")
    warm_model, warm_popular = result.test["warm"]["hr@10"], popular["warm"]["hr@10"]
    assert warm_model > 0.5 and warm_model > warm_popular + 0.2, (warm_model, warm_popular)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["windows"] == "overlap"


def test_frequency_gate_trains_from_the_splits_counts_and_reloads(tmp_path) -> None:
    from sidrec.model.item_embedding import gate_buckets

    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    out = tmp_path / "gate"
    cfg = tiny_config(epochs=2, sid_gate=True)
    train(data, split, random_sids(), 8, cfg, out, log=lambda _: None)
    model, cfg, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert cfg.sid_gate
    buckets = gate_buckets(torch.as_tensor(split.train_counts))
    assert torch.equal(model.items.gate_bucket, buckets)
    # every bucket some item (or an id-dropped one, bucket 0) reads has moved off the plain sum
    assert (model.items.sid_gate[buckets.unique()] != 0).all()
    reloaded = evaluate(hstu_scorer(model.encoder, model.items, ckpt["trained"]), split, "test")
    assert reloaded == json.loads((out / "metrics.json").read_text())["test"]


def test_sid_table_gets_its_own_weight_decay() -> None:
    from sidrec.offline.train import build_model, parameter_groups

    cfg = tiny_config(weight_decay=0.3, sid_weight_decay=1.0)
    model = build_model(cfg, NUM_ITEMS, random_sids(), 8)
    rest, sid = parameter_groups(model, cfg)
    assert sid["weight_decay"] == 1.0 and "weight_decay" not in rest  # rest: the optimizer's
    assert [id(p) for p in sid["params"]] == [id(model.items.sid_emb.weight)]
    assert len(rest["params"]) + 1 == len(list(model.parameters()))
    # AdamW applies each: a step on zero gradients only decays, by lr x the group's decay
    optimizer = torch.optim.AdamW([rest, sid], lr=0.1, weight_decay=cfg.weight_decay)
    before = model.items.sid_emb.weight.detach().clone()
    id_before = model.items.id_emb.weight.detach().clone()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    torch.testing.assert_close(model.items.sid_emb.weight.detach(), before * (1 - 0.1 * 1.0))
    torch.testing.assert_close(model.items.id_emb.weight.detach(), id_before * (1 - 0.1 * 0.3))
    # unset, or a model without SID rows: one group at the optimizer's decay
    for cfg, sids in ((tiny_config(weight_decay=0.3), random_sids()),
                      (tiny_config(variant="id", sid_weight_decay=1.0), None)):  # fmt: skip
        model = build_model(cfg, NUM_ITEMS, sids, 8)
        (group,) = parameter_groups(model, cfg)
        assert len(group["params"]) == len(list(model.parameters()))


def test_training_without_timestamps_or_sids(tmp_path) -> None:
    data = planted_interactions()
    data = Interactions(data.name, data.catalog, data.users, data.sequences, None)
    split = make_split(data, 0.05, seed=0)
    with pytest.raises(ValueError, match="no timestamps"):
        train(data, split, None, None, tiny_config(variant="id"), tmp_path / "a")
    cfg = tiny_config(variant="id", use_time=False, epochs=1)
    result = train(data, split, None, None, cfg, tmp_path / "b", log=lambda _: None)
    assert result.best_epoch == 1 and result.test["overall"]["count"] == len(split.test)
    model, _, ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["sids"] is None and not model.items.uses_sid


def test_config_reaches_the_model() -> None:
    from sidrec.offline.train import build_model

    cfg = tiny_config(
        unknown_id="zero",
        prefix_table="exact",
        trained_rows_only=True,
        d=8,
        ffn_mult=2,
        attn_dropout=0.3,
        attention="softmax",
    )
    model = build_model(cfg, NUM_ITEMS, random_sids(), 8)
    assert model.encoder.blocks[0].ffn_mult == 2 and model.encoder.scoring == "cosine"
    assert model.encoder.blocks[0].attn_dropout == 0.3
    assert model.encoder.blocks[0].attention == "softmax"
    assert model.items.unknown_id == "zero" and model.items.prefix_table == "exact"
    assert model.items.trained_rows_only and model.items.d == 8 and model.encoder.d == 8
    assert model.encoder.padded_len == cfg.padded_len and model.encoder.use_time


@pytest.mark.parametrize(
    ("plateau", "rates"), [(0, [1, 1, 1, 1]), (1, [1, 1, 0.5, 0.25]), (2, [1, 1, 1, 0.5])]
)
def test_lr_plateau_halves_the_rate_after_epochs_without_a_better_validation(
    tmp_path, plateau: int, rates: list[float]
) -> None:
    # A rate too small to move any weight: validation never improves after epoch 1, so with
    # lr_plateau=P the rate halves once every P epochs after it (each line logs the rate that
    # epoch trained at).
    data = planted_interactions()
    split = make_split(data, 0.05, seed=0)
    lr = 1e-12
    cfg = tiny_config(epochs=4, patience=10, lr=lr, lr_plateau=plateau)
    result = train(data, split, random_sids(), 8, cfg, tmp_path, log=lambda _: None)
    assert len({json.dumps(e["valid"]) for e in result.epochs}) == 1
    assert [e["lr"] / lr for e in result.epochs] == pytest.approx(rates)
    with pytest.raises(ValueError, match="lr_plateau"):
        tiny_config(lr_plateau=-1)
