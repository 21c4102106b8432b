"""The content tower (model/content_tower.py) and its fitting (offline/tower.py): new items'
vectors land near the id rows their content predicts, warm rows stay as trained, distinct
items never share a vector, and the exported graph and model.pt agree with PyTorch."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from sidrec.model.content_tower import ContentTower
from sidrec.model.hstu import HSTU
from sidrec.model.item_embedding import ItemEmbedding
from sidrec.model.weights import content_tower_args, load_weights, save_weights
from sidrec.offline.onnx_export import export_item_vector
from sidrec.offline.tower import TowerConfig, fit_tower, item_table

N, D, C, K, L = 400, 16, 32, 8, 2


def planted(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(id table [N + 1, D], sids [N + 1, L + 1], content [N, C]) where each id row is a fixed
    linear map of the item's content plus a little noise, and the SID is the content's
    cluster: a tower can learn both."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, C))
    first = rng.integers(0, K, N)
    second = rng.integers(0, K, N)
    content = centres[first] + 0.5 * centres[second] + 0.3 * rng.normal(size=(N, C))
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    projection = rng.normal(size=(C, D))
    ids = content @ projection + 0.05 * rng.normal(size=(N, D))
    table = torch.zeros(N + 1, D)
    table[1:] = torch.as_tensor(ids, dtype=torch.float32)
    sids = np.zeros((N + 1, L + 1), np.int64)
    sids[1:, 0], sids[1:, 1] = first, second
    return table, sids, content.astype(np.float32)


FAST = TowerConfig(hidden=64, epochs=40, patience=40, batch_size=128, lr=1e-2)
WITHHELD = slice(1, 21)  # items with no id row, as new items would be


@pytest.fixture(scope="module")
def fitted() -> tuple[ContentTower, dict, np.ndarray]:
    """(tower, fitting record, trained mask) on the planted catalog, items 1..20 withheld."""
    table, sids, content = planted()
    trained = np.ones(N + 1, bool)
    trained[0] = False
    trained[WITHHELD] = False
    tower, record = fit_tower(table, sids, content, trained, K, cfg=FAST)
    return tower, record, trained


def test_fitted_tower_finds_held_out_items_ids(fitted: tuple) -> None:
    table, sids, content = planted()
    tower, record, trained = fitted
    best = record["curve"][record["best_epoch"] - 1]
    # Items held out of fitting, as new items would be: their own id among all 400 in the
    # top 10 most of the time (random: 10 / 380), and fitting improved on its first epoch.
    assert best["holdout_hr@10"] > 0.5
    assert best["holdout_loss"] < record["curve"][0]["holdout_loss"]
    assert record["holdout_items"] == 38 and record["fit_items"] == 342
    # The output has the id rows' median norm: it enters the encoder at a trained row's size.
    v = tower(torch.as_tensor(sids[1:5]), torch.as_tensor(content[:4]))
    median = float(table[torch.as_tensor(trained)].norm(dim=-1).median())
    torch.testing.assert_close(v.norm(dim=-1), torch.full((4,), median))


def test_tower_fitted_for_dot_scoring_finds_held_out_items() -> None:
    # A model trained with scoring "dot" ranks by raw inner products, so the id rows' norms
    # (here they vary 1.5x) take part in the fit: fitted on user states, the held-out items'
    # tower vectors are still in their users' top 10 among all 400 raw rows. (Where norms vary
    # 10x, even an item's own direction at the median norm is rarely there: dot scoring
    # favours long rows, and the new-item scale chosen on validation is what answers that.)
    table, sids, content = planted()
    table = table * torch.as_tensor(np.random.default_rng(1).uniform(0.8, 1.25, (N + 1, 1)),
                                    dtype=torch.float32)  # fmt: skip
    trained = np.ones(N + 1, bool)
    trained[0] = False
    trained[WITHHELD] = False
    # users: each item's direction at a LayerNorm'd output's norm, answered by the item
    rows = torch.as_tensor(np.flatnonzero(np.arange(N + 1) > 0))
    users = F.normalize(table[rows], dim=-1) * D**0.5
    _, record = fit_tower(table, sids, content, trained, K, (users, rows), FAST, scoring="dot")
    best = record["curve"][record["best_epoch"] - 1]
    assert best["holdout_hr@10"] > 0.5, best
    with pytest.raises(ValueError, match="user states"):
        fit_tower(table, sids, content, trained, K, cfg=FAST, scoring="dot")
    with pytest.raises(ValueError, match="scoring"):
        fit_tower(table, sids, content, trained, K, cfg=FAST, scoring="euclid")


def test_item_table_keeps_warm_rows_and_scales_new_ones(fitted: tuple) -> None:
    table, sids, content = planted()
    tower, _, trained = fitted
    with torch.no_grad():
        new = tower(torch.as_tensor(sids), torch.cat([torch.zeros(1, C), torch.tensor(content)]))
    tower.new_item_scale.fill_(1.2)
    tower.new_item_offset.fill_(0.3)
    try:
        served, scales, offsets = item_table(table, tower, sids, content, trained)
    finally:
        tower.new_item_scale.fill_(1.0)
        tower.new_item_offset.fill_(0.0)
    assert torch.equal(served[0], torch.zeros(D))
    assert torch.equal(served[trained], table[trained])  # id rows untouched
    torch.testing.assert_close(served[WITHHELD], new[WITHHELD])  # untrained: the tower's
    assert torch.equal(scales[trained], torch.ones(int(trained.sum())))
    assert torch.equal(scales[WITHHELD], torch.full((20,), 1.2))
    assert torch.equal(offsets[trained], torch.zeros(int(trained.sum())))
    assert torch.equal(offsets[WITHHELD], torch.full((20,), 0.3))

    # The scorer ranks by cosine times the row's scale, as the service's index does.
    from sidrec.model.hstu import HSTU
    from sidrec.offline.evaluate import EvalBatch, table_scorer

    hstu = HSTU(d=D, num_blocks=1, num_heads=1, dqk=D, dv=D, padded_len=12, use_time=False)
    batch = EvalBatch(
        users=torch.zeros(1, dtype=torch.int64), items=torch.tensor([[30, 31, 0]]),
        timestamps=torch.zeros(1, 3, dtype=torch.int64), mask=torch.tensor([[True, True, False]]),
        query_time=torch.zeros(1, dtype=torch.int64), full_history=torch.tensor([[30, 31]]),
    )  # fmt: skip
    plain = table_scorer(hstu.eval(), served)(batch)
    scaled = table_scorer(hstu.eval(), served, scales)(batch)
    torch.testing.assert_close(scaled, plain * scales[None, :])
    # ... minus the row's offset, as the service's index ranks
    shifted = table_scorer(hstu.eval(), served, scales, offsets)(batch)
    torch.testing.assert_close(shifted, plain * scales[None, :] - offsets[None, :])
    # an infinite offset: never recommended; history_table: what the encoder reads instead
    never = table_scorer(hstu.eval(), served, offsets=offsets.masked_fill(offsets > 0, torch.inf))
    assert torch.isneginf(never(batch)[0, WITHHELD]).all()
    moved = served.clone()
    moved[30] = -moved[30]  # a history row
    read = table_scorer(hstu.eval(), served, history_table=moved)(batch)
    assert not torch.allclose(read, plain)  # the user vector comes from `moved`
    rest = torch.arange(N + 1) != 30  # ... and every row but 30 is scored as `served` has it
    torch.testing.assert_close(read[:, rest], table_scorer(hstu.eval(), moved)(batch)[:, rest])


def test_items_of_one_sid_with_different_text_get_different_vectors(fitted: tuple) -> None:
    _, sids, content = planted()
    tower = fitted[0]
    codes = torch.as_tensor(np.repeat(sids[1:2], 5, axis=0))  # one full SID, five texts
    texts = torch.as_tensor(content[10:15])
    with torch.no_grad():
        v = F.normalize(tower(codes, texts), dim=-1)
    cosines = v @ v.T
    assert float(cosines[~torch.eye(5, dtype=torch.bool)].max()) < 0.9999
    # and the same inputs give the same vector (no randomness at serving time)
    with torch.no_grad():
        torch.testing.assert_close(tower(codes, texts), tower(codes, texts))


def test_item_vector_onnx_and_model_pt_match_pytorch(tmp_path: Path, fitted: tuple) -> None:
    _, sids, _ = planted()
    tower = copy.deepcopy(fitted[0])
    tower.new_item_scale.fill_(1.3)
    tower.new_item_offset.fill_(0.25)
    rng = np.random.default_rng(3)
    unseen = rng.integers(0, K, (30, L + 1))  # includes tuples no catalog item has
    codes = np.concatenate([sids[1:], unseen]).astype(np.int64)
    texts = rng.normal(size=(len(codes), C)).astype(np.float32)
    with torch.no_grad():
        want = tower(torch.as_tensor(codes), torch.as_tensor(texts)).numpy()

    path = tmp_path / "item_vector.onnx"
    export_item_vector(tower, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["vectors"], {"codes": codes, "content": texts})
    np.testing.assert_allclose(got, want, atol=1e-5)

    items = ItemEmbedding("id", N, D)
    hstu = HSTU(d=D, num_blocks=1, num_heads=1, dqk=D, dv=D, padded_len=12)
    save_weights(items, hstu, torch.as_tensor(sids), tmp_path / "model.pt", tower)
    _, _, loaded = load_weights(tmp_path / "model.pt")
    assert loaded is not None and float(loaded.new_item_scale) == pytest.approx(1.3)
    assert float(loaded.new_item_offset) == pytest.approx(0.25)
    # a tower saved before the offset existed loads with none
    old = {k: v for k, v in tower.state_dict().items() if k != "new_item_offset"}
    before = ContentTower.empty(**content_tower_args(tower))
    before.load_state_dict(old)
    assert float(before.new_item_offset) == 0.0
    with torch.no_grad():
        again = loaded(torch.as_tensor(codes), torch.as_tensor(texts)).numpy()
    np.testing.assert_allclose(again, want, atol=1e-6)
    save_weights(items, hstu, None, tmp_path / "plain.pt")
    assert load_weights(tmp_path / "plain.pt")[2] is None


def test_fit_tower_needs_trained_items() -> None:
    table, sids, content = planted()
    trained = np.zeros(N + 1, bool)
    trained[1:5] = True
    with pytest.raises(ValueError, match="at least 20 trained items"):
        fit_tower(table, sids, content, trained, K, cfg=FAST)
    with pytest.raises(ValueError, match="objective"):
        fit_tower(table, sids, content, trained, K, cfg=TowerConfig(objective="user"))


def test_learned_norm_follows_how_long_similar_items_rows_are(tmp_path: Path) -> None:
    # Under dot scoring an item's norm carries how often it is the answer. Plant norms that
    # follow the first SID code (a 4x range) and answer users in proportion to them: the
    # learned-norm tower gives the withheld items norms that rank like their true ones, where
    # the fixed tower gives every item the median; the norm survives model.pt and ONNX.
    table, sids, content = planted()
    norm_of_code = torch.linspace(0.5, 2.0, K)
    table[1:] = F.normalize(table[1:], dim=-1) * norm_of_code[torch.as_tensor(sids[1:, 0])][:, None]
    trained = np.ones(N + 1, bool)
    trained[0] = False
    trained[WITHHELD] = False
    rng = np.random.default_rng(2)
    rows = torch.as_tensor(np.flatnonzero(trained))
    weights = (table[rows].norm(dim=-1) ** 2).double().numpy()
    answers = rows[torch.as_tensor(rng.choice(len(rows), 4000, p=weights / weights.sum()))]
    torch.manual_seed(2)
    users = F.normalize(table[answers] + 0.3 * torch.randn(len(answers), D), dim=-1) * D**0.5
    cfg = replace(FAST, learned_norm=True)
    tower, _ = fit_tower(table, sids, content, trained, K, (users, answers), cfg, scoring="dot")
    codes, texts = torch.as_tensor(sids[WITHHELD]), torch.as_tensor(content[:20])
    with torch.no_grad():
        norms = tower(codes, texts).norm(dim=-1)
    truth = table[WITHHELD].norm(dim=-1)
    order = lambda x: x.argsort().argsort().float()  # noqa: E731
    assert float(torch.corrcoef(torch.stack([order(norms), order(truth)]))[0, 1]) > 0.5
    assert float(norms.max() / norms.min()) > 1.5

    items = ItemEmbedding("id", N, D)
    hstu = HSTU(d=D, num_blocks=1, num_heads=1, dqk=D, dv=D, padded_len=12)
    save_weights(items, hstu, torch.as_tensor(sids), tmp_path / "model.pt", tower)
    loaded = load_weights(tmp_path / "model.pt")[2]
    assert loaded is not None and loaded.norm_head is not None
    export_item_vector(tower, tmp_path / "item_vector.onnx")
    session = ort.InferenceSession(str(tmp_path / "item_vector.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    (got,) = session.run(["vectors"], {"codes": sids[WITHHELD].astype(np.int64),
                                       "content": content[:20]})  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(loaded(codes, texts).numpy(), got, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), norms.numpy(), rtol=1e-5)
