"""Training settings for `sidrec train/pipeline`: tuned defaults by data shape, or a tune report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_synthetic_dataset
from test_split_metrics import make_catalog

from sidrec.offline import pipeline
from sidrec.offline.data.dataset import DataError, Interactions


@pytest.fixture
def steps(tmp_path: Path) -> pipeline.Steps:
    write_synthetic_dataset(tmp_path / "data", users=40, per_theme=6)
    return pipeline.Steps.open(tmp_path / "data", tmp_path / "run")


def test_default_settings_follow_the_data_shape(steps: pipeline.Steps) -> None:
    # 15-30 events per user: the short-history (Amazon-tuned) settings
    chosen = steps.use_settings(None)
    assert chosen == pipeline.SHORT_HISTORY_SETTINGS
    # the rate halves on a plateau on short histories, and on long ones only with four blocks
    # (ML-1M's two blocks fell behind with it)
    assert chosen["lr_plateau"] == 2 and "lr_plateau" not in pipeline.LONG_HISTORY_SETTINGS
    assert steps.train_config("hybrid-sum").lr_plateau == steps.train_config("id").lr_plateau == 2
    record = json.loads((steps.run / "settings.json").read_text())
    assert record["settings"] == chosen and "Amazon" in record["source"]
    long_events = pipeline.LONG_HISTORY_EVENTS * len(steps.data.users)
    assert steps.data.num_events < long_events


def _long_histories(lengths: list[int]) -> Interactions:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 301, n).astype(np.int64) for n in lengths]
    users = [f"u{u}" for u in range(len(lengths))]
    return Interactions("long", make_catalog(300), users, sequences, None)


def test_long_histories_train_on_earlier_targets_where_many_lie_beyond_the_last_window() -> None:
    from sidrec.offline.train import TrainConfig

    assert TrainConfig().max_len == pipeline.LONG_HISTORY_MAX_LEN
    # Training targets a user: events - 3 (two held out, the first predicts nothing).
    # 403 events: 400 targets, 200 beyond the last window; 103: 100 targets, none.
    data = _long_histories([403, 103])
    assert pipeline.unseen_target_share(data, 200) == pytest.approx(200 / 500)
    settings, why = pipeline.recommended_settings(data)
    assert settings == {**pipeline.LONG_HISTORY_SETTINGS, "windows": "overlap"}
    assert "40% of the training targets" in why and "windows=overlap" in why
    # 206 and 103 events: 3 of 303 targets beyond it, 1%: the last window only.
    data = _long_histories([206, 103])
    assert pipeline.unseen_target_share(data, 200) == pytest.approx(3 / 303)
    settings, why = pipeline.recommended_settings(data)
    assert settings == pipeline.LONG_HISTORY_SETTINGS and "overlap" not in why
    assert pipeline.unseen_target_share(_long_histories([2, 3]), 200) == 0.0  # no target


def test_long_histories_of_ml_1m_size_train_four_blocks_at_a_decaying_rate() -> None:
    from sidrec.offline.train import TrainConfig

    assert (TrainConfig().num_blocks, TrainConfig().lr_plateau) == (2, 0)
    big = pipeline.DEEP_FROM_EVENTS
    settings, why = pipeline.recommended_settings(_long_histories([big // 2, big - big // 2]))
    assert settings == {
        **pipeline.LONG_HISTORY_SETTINGS,
        "windows": "overlap",
        **pipeline.DEEP_SETTINGS,
    }
    assert (settings["num_blocks"], settings["lr"], settings["lr_plateau"]) == (4, 2e-3, 3)
    assert f"{big:,} events >= {big:,}: four blocks" in why
    # one event fewer: MovieLens-100K's size side, GR's two blocks at a constant rate
    settings, why = pipeline.recommended_settings(_long_histories([big // 2, big - big // 2 - 1]))
    assert settings == {**pipeline.LONG_HISTORY_SETTINGS, "windows": "overlap"}
    assert "four blocks" not in why


def test_settings_from_a_tune_report_take_its_validation_winner(
    steps: pipeline.Steps, tmp_path: Path
) -> None:
    report = {
        "dataset": "amazon-toys",
        "winner": "full-length-dropout-0.5",
        "grid": {
            "full": {"settings": {"loss": "full", "attn_norm": "padded"}},
            "full-length-dropout-0.5": {
                "settings": {"loss": "full", "attn_norm": "length", "dropout": 0.5}
            },
        },
    }
    path = tmp_path / "amazon-toys-tune.json"
    path.write_text(json.dumps(report))
    assert steps.use_settings(path) == {"loss": "full", "attn_norm": "length", "dropout": 0.5}
    assert "full-length-dropout-0.5" in steps.settings_source


def test_bad_settings_are_refused_before_training(steps: pipeline.Steps, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"dropout": 0.5, "learning_rate": 1e-3}))
    with pytest.raises(DataError, match="learning_rate"):
        steps.use_settings(path)
    path.write_text(json.dumps({"loss": "bpr"}))
    with pytest.raises(ValueError, match="loss"):
        steps.use_settings(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        steps.use_settings(path)


def test_trained_variant_uses_the_settings(steps: pipeline.Steps, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    settings = {"loss": "sampled-logq", "num_negatives": 8, "dropout": 0.3, "sid_gate": True}
    path.write_text(json.dumps(settings))
    steps.use_settings(path)
    # Random content vectors: SIDs without MiniLM (not what is tested here).
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((steps.data.num_items, 16)).astype(np.float32)
    steps.__dict__["content_vectors"] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    metrics = steps.train("id", epochs=1, patience=1)
    config = metrics["config"]
    assert (config["loss"], config["num_negatives"], config["dropout"]) == (
        "sampled-logq",
        8,
        0.3,
    )
    assert config["sid_gate"] is False  # the frequency gate is a hybrid-sum's: not id-only's


def test_recommended_sid_table_decay_is_hybrid_sums_and_given_settings_apply_as_given(
    steps: pipeline.Steps, tmp_path: Path
) -> None:
    steps.use_settings(None)
    assert pipeline.SHORT_HISTORY_SETTINGS["sid_weight_decay"] == 1.0
    hybrid_sum = steps.train_config("hybrid-sum")
    assert (hybrid_sum.weight_decay, hybrid_sum.sid_weight_decay) == (0.3, 1.0)
    for other in ("sid-rqsum", "hybrid-alpha", "id"):
        cfg = steps.train_config(other)
        assert (cfg.weight_decay, cfg.sid_weight_decay) == (0.3, None), other
    # A settings file is the user's choice for every variant it trains.
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"weight_decay": 0.3, "sid_weight_decay": 2.0}))
    steps.use_settings(path)
    assert steps.train_config("sid-rqsum").sid_weight_decay == 2.0
    assert steps.train_config("hybrid-sum").sid_weight_decay == 2.0


def test_a_run_folder_keeps_its_content_precision(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "data", users=40, per_theme=6)
    data, run = tmp_path / "data", tmp_path / "run"
    assert pipeline.Steps.open(data, run).content_precision == "fp32"
    assert pipeline.run_content_precision(run) is None  # nothing encoded yet: still open
    assert pipeline.Steps.open(data, run, content_precision="int8").content_precision == "int8"
    with pytest.raises(DataError, match="expected one of fp32, int8"):
        pipeline.Steps.open(data, run, content_precision="fp16")
    # What content.json records wins, and the other precision is refused.
    (run / pipeline.CONTENT_FILE).write_text(json.dumps({"precision": "int8"}))
    assert pipeline.Steps.open(data, run).content_precision == "int8"
    with pytest.raises(DataError, match="are int8, not fp32"):
        pipeline.Steps.open(data, run, content_precision="fp32")
    # A folder from before content.json holds fp32 vectors and SIDs.
    (run / pipeline.CONTENT_FILE).unlink()
    (run / "sids").mkdir()
    np.save(run / "sids" / "sids.npy", np.zeros((3, 2), np.int64))
    assert pipeline.run_content_precision(run) == "fp32"
    with pytest.raises(DataError, match="are fp32, not int8"):
        pipeline.Steps.open(data, run, content_precision="int8")
