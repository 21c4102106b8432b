"""`sidrec bench tune`: the plan, validation-only selection, a real (tiny) run and its report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_synthetic_dataset

from sidrec.offline.bench.plan import PEER, REFERENCE_SETTINGS, TUNE_GRID, tune_runs
from sidrec.offline.bench.runner import best_settings, run_dir


def test_tune_plan_runs_the_grid_once_and_the_rows_per_seed() -> None:
    runs = tune_runs(seeds=3)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    for group in TUNE_GRID:
        assert [r.seed for r in runs if r.group == group] == [0]
    for group in ("ref-id", PEER):
        assert sorted(r.seed for r in runs if r.group == group) == [0, 1, 2]
    tuned = [r for r in runs if r.group == "tuned"]
    assert sorted(r.seed for r in tuned) == [1, 2]  # seed 0 is the grid winner itself
    assert all(set(r.best_of) == set(TUNE_GRID) == set(r.after) for r in tuned)
    assert all(r.cold_fraction == 0.0 and r.variant == "id" and r.plan == "tune" for r in runs)
    ref = next(r for r in runs if r.group == "ref-id")
    assert dict(ref.settings) == REFERENCE_SETTINGS
    assert {dict(r.settings).get("loss") for r in runs if r.kind == "grid"} == {
        "full",
        "sampled-logq",
    }
    with pytest.raises(ValueError):
        tune_runs(seeds=0)


def test_the_winner_is_chosen_on_validation_never_on_test(tmp_path: Path) -> None:
    runs = tune_runs(seeds=2)
    scores = {group: (0.1, 0.5) for group in TUNE_GRID}  # (valid, test) NDCG@10
    scores["full"] = (0.3, 0.1)  # best on validation, worst on test
    scores["logq-length"] = (0.2, 0.9)  # best on test
    for run in runs:
        if run.group in TUNE_GRID:
            folder = run_dir(tmp_path, run)
            folder.mkdir(parents=True)
            valid, test = scores[run.group]
            metrics = {
                "valid": {"overall": {"ndcg@10": valid}},
                "test": {"overall": {"ndcg@10": test}},
            }
            (folder / "metrics.json").write_text(json.dumps(metrics))
    tuned = next(r for r in runs if r.group == "tuned")
    group, settings = best_settings(tmp_path, tuned, seeds=2)
    assert group == "full"
    assert settings == TUNE_GRID["full"]


@pytest.fixture(scope="module")
def tuned_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sidrec.offline.bench.quality import run_benchmark

    root = tmp_path_factory.mktemp("tune")
    write_synthetic_dataset(root / "data", users=120, per_theme=12)
    os.environ["SIDREC_CACHE"] = str(root / "cache")
    try:
        run_benchmark(
            root / "data",
            root / "out",
            stage="all",
            device="cpu",
            jobs=2,
            seeds=2,
            epochs=2,
            patience=2,
            only=["ref-id", *TUNE_GRID, "tuned"],  # every row but the peer (own test file)
            report_dir=root / "report",
            plan="tune",
        )
    finally:
        os.environ.pop("SIDREC_CACHE", None)
    return root, root / "out"


@pytest.mark.timeout(600)
def test_tune_trains_each_setting_and_the_tuned_seeds_take_the_winner(
    tuned_bench: tuple[Path, Path],
) -> None:
    _, out = tuned_bench
    valid = {}
    for group, settings in TUNE_GRID.items():
        metrics = json.loads((out / "runs" / f"{group}.s0" / "metrics.json").read_text())
        for key, value in settings.items():
            assert metrics["config"][key] == value, (group, key)
        assert metrics["split"]["withheld_items"] == 0
        valid[group] = metrics["valid"]["overall"]["ndcg@10"]
    ref = json.loads((out / "runs" / "ref-id.s1" / "metrics.json").read_text())
    assert (ref["config"]["loss"], ref["config"]["num_negatives"]) == ("sampled-uniform", 128)
    logq = json.loads((out / "runs" / "logq-length.s0" / "metrics.json").read_text())
    assert logq["config"]["num_negatives"] == 4096
    winner = max(valid, key=valid.__getitem__)
    info = json.loads((out / "runs" / "tuned.s1" / "run.json").read_text())
    assert info["picked_settings_of"] == winner
    tuned = json.loads((out / "runs" / "tuned.s1" / "metrics.json").read_text())
    assert tuned["config"]["seed"] == 1
    for key, value in TUNE_GRID[winner].items():
        assert tuned["config"][key] == value
    kept = info["test_history_kept"]
    assert kept["history_excluded"] is False
    assert 0.0 <= kept["overall"]["hr@10"] <= 1.0


def test_tune_report_names_the_winner_and_lists_the_missing_peer(
    tuned_bench: tuple[Path, Path],
) -> None:
    root, out = tuned_bench
    data_name = json.loads((out / "runs" / "full.s0" / "metrics.json").read_text())["dataset"]
    report = (root / "report" / f"{data_name}-tune.md").read_text()
    results = json.loads((root / "report" / f"{data_name}-tune.json").read_text())
    assert f"{results['winner']} **(winner)**" in report
    assert results["rows"]["tuned"]["test"]["hr@10"]["n"] == 2
    assert results["rows"]["ref-id"]["test"]["ndcg@10"]["n"] == 2
    assert f"{PEER}.s0" in results["missing"]
    assert "sidrec bench tune --data" in report
    assert (root / "report" / f"{data_name}-tune" / "validation_curves.png").is_file()


def test_finish_closes_a_stopped_run_from_its_best_checkpoint(
    tuned_bench: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    from sidrec.offline.bench.runner import finish_stopped

    root, out = tuned_bench
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = next(r for r in tune_runs(seeds=2) if r.name == "ref-id.s1")
    folder = run_dir(copy, run)
    before = json.loads((folder / "metrics.json").read_text())
    (folder / "run.json").unlink()  # as a run killed by a time limit leaves it: no results
    (folder / "metrics.json").unlink()
    info = finish_stopped(root / "data", copy, run)
    assert info is not None and "stopped by hand after 2 epochs" in info["stopped"]
    after = json.loads((folder / "metrics.json").read_text())
    # the best-validation checkpoint gives the figures train() reported
    assert after["test"]["overall"] == before["test"]["overall"]
    assert after["best_epoch"] == before["best_epoch"]
    assert info["test_history_kept"]["history_excluded"] is False
    assert finish_stopped(root / "data", copy, run) is None  # done now: nothing to close
