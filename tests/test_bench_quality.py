"""`sidrec bench quality`: the plan, a real (tiny) end-to-end run, resuming, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_synthetic_dataset

from sidrec.offline.bench.plan import HYBRID_FUSIONS, SID_SETS, plan_runs
from sidrec.offline.tower import NEW_ITEM_OFFSETS

# Covers every kind of run: headline, the dependent large-hybrid, reference (nothing withheld),
# ablations on another SID set, on a layer prefix and on the deeper set.
GROUPS = [
    "id",
    "sid-rqsum",
    "hybrid-sum",
    "hybrid-alpha",
    "hybrid-switch",
    "hybrid-tower",
    "large-hybrid",
    "ref-id",
    "sid-prefixn:title-sids",
    "hybrid-sum:2-layers",
    "hybrid-sum:4-layers",
]


def test_plan_covers_the_issue_and_every_ablation_has_its_base() -> None:
    runs = plan_runs(seeds=3)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    groups = {r.group for r in runs}
    headline = (
        "id", "sid-prefixn", "sid-rqsum", "hybrid-sum", "hybrid-alpha", "hybrid-switch",
        "hybrid-tower",
    )  # fmt: skip
    for group in (*headline, "large-id"):
        assert {r.seed for r in runs if r.group == group} == {0, 1, 2}
    large_hybrid = [r for r in runs if r.group == "large-hybrid"]
    assert len(large_hybrid) == 3
    assert all(
        r.shape == "large" and r.after == ("hybrid-sum", "hybrid-alpha", "hybrid-switch")
        for r in large_hybrid
    )
    assert all(r.cold_fraction == 0.0 for r in runs if r.kind == "reference")
    assert all(r.cold_fraction == 0.05 for r in runs if r.kind != "reference")
    ablations = [r for r in runs if r.kind == "ablation"]
    for r in ablations:
        assert r.base in groups and r.seed == 0 and r.sid_set in SID_SETS
    knobs = " ".join(r.knob for r in ablations)
    for needed in ("title", "2 SID layers", "4 SID layers", "id dropout", "time features off"):
        assert needed in knobs
    with pytest.raises(ValueError):
        plan_runs(seeds=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sidrec.offline.bench.quality import run_benchmark

    root = tmp_path_factory.mktemp("bench")
    write_synthetic_dataset(root / "data", users=200)
    os.environ["SIDREC_CACHE"] = str(root / "cache")
    try:
        run_benchmark(
            root / "data",
            root / "out",
            stage="all",
            device="cpu",
            jobs=2,
            seeds=1,
            epochs=2,
            patience=2,
            only=GROUPS,
            report_dir=root / "report",
        )
    finally:
        os.environ.pop("SIDREC_CACHE", None)
    return root, root / "out"


def test_every_requested_run_trains_and_writes_its_results(bench: tuple[Path, Path]) -> None:
    _, out = bench
    for group in GROUPS:
        folder = out / "runs" / f"{group}.s0"
        info = json.loads((folder / "run.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 2
        assert 0.0 <= metrics["test"]["overall"]["hr@10"] <= 1.0
        assert metrics["config"]["epochs"] == 2
    ref = json.loads((out / "runs" / "ref-id.s0" / "metrics.json").read_text())
    assert ref["split"]["withheld_items"] == 0
    large = json.loads((out / "runs" / "large-hybrid.s0" / "run.json").read_text())
    assert large["resolved_variant"] in ("hybrid-sum", "hybrid-alpha", "hybrid-switch")
    large_cfg = json.loads((out / "runs" / "large-hybrid.s0" / "metrics.json").read_text())[
        "config"
    ]
    assert (large_cfg["num_blocks"], large_cfg["num_heads"], large_cfg["dqk"]) == (8, 2, 25)
    # the content tower is fitted after training and its table is what the figures rank
    tower = json.loads((out / "runs" / "hybrid-tower.s0" / "metrics.json").read_text())
    assert (out / "runs" / "hybrid-tower.s0" / "tower.pt").is_file()
    assert tower["tower"]["new_item_offset_logits"] in NEW_ITEM_OFFSETS
    assert "test" in tower["id_rows"] and tower["test"] != tower["id_rows"]["test"]
    two = json.loads((out / "runs" / "hybrid-sum:2-layers.s0" / "metrics.json").read_text())
    assert two["config"]["sid_layers"] == 2
    for name in SID_SETS:
        assert (out / "prepared" / f"sids-{name}.npy").is_file()


def test_training_again_resumes_instead_of_retraining(bench: tuple[Path, Path]) -> None:
    from sidrec.offline.bench.quality import run_benchmark

    root, out = bench
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    run_benchmark(
        root / "data", out, stage="train", device="cpu", jobs=2, seeds=1, epochs=2, patience=2,
        only=GROUPS,
    )  # fmt: skip
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/run.json")}
    assert before == after and len(before) == len(GROUPS)


def test_report_matches_the_runs_and_lists_what_is_missing(bench: tuple[Path, Path]) -> None:
    root, out = bench
    name = json.loads((out / "runs" / "id.s0" / "metrics.json").read_text())["dataset"]
    # Through the real command line, as a user would write it again.
    subprocess.run(
        [sys.executable, "-m", "sidrec.cli", "bench", "quality", "--data", str(root / "data"),
         "--out", str(out), "--stage", "report", "--seeds", "1", "--report-dir",
         str(root / "report2")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    md = (root / "report2" / f"{name}.md").read_text()
    report = json.loads((root / "report2" / f"{name}.json").read_text())
    id_test = json.loads((out / "runs" / "id.s0" / "metrics.json").read_text())["test"]
    assert report["groups"]["id"]["hr@10"]["mean"] == pytest.approx(id_test["overall"]["hr@10"])
    assert f"{id_test['overall']['ndcg@10']:.4f}" in md
    for heading in (
        "published",
        "Do Semantic IDs help",
        "Ablations",
        "Semantic ID sets",
        "Targets",
    ):
        assert heading in md
    # The commands that reproduce each stage head the report.
    data_arg = f"--data {root / 'data'}"
    assert f"`sidrec bench quality {data_arg} --out {out} --stage prepare --seeds 1`" in md
    assert "--stage train --device cpu --jobs 2 --epochs 2 --patience 2 --seeds 1 --only id," in md
    # Runs not in GROUPS are reported as missing, never as numbers.
    assert "sid-prefixn.s0" in report["missing"] and "Not run yet" in md
    assert "sid-prefixn.s0" not in report["runs"]
    assert 0.0 < report["random_cold_start_hr@10"] < 1.0
    for png in ("validation_curves", "popularity_bins", "cold_vs_warm"):
        assert (root / "report2" / name / f"{png}.png").stat().st_size > 1000


def test_unknown_group_or_stage_is_a_user_error(tmp_path: Path) -> None:
    from sidrec.offline.bench.quality import run_benchmark
    from sidrec.offline.data.dataset import DataError

    tmp_path.joinpath("data").mkdir()
    with pytest.raises(DataError, match="no run group"):
        run_benchmark(tmp_path / "data", tmp_path / "out", only=["nope"])
    with pytest.raises(DataError, match="unknown stage"):
        run_benchmark(tmp_path / "data", tmp_path / "out", stage="nope")


def test_a_run_whose_inputs_will_never_exist_fails_at_once(tmp_path: Path) -> None:
    from sidrec.offline.bench.runner import Budget, train_all

    large_hybrid = [r for r in plan_runs(seeds=1) if r.group == "large-hybrid"]
    lines: list[str] = []
    failed = train_all(
        tmp_path / "data", tmp_path / "out", large_hybrid, Budget(1, 1, 1), "cpu", 2, lines.append
    )
    assert failed == ["large-hybrid.s0"]
    assert any("neither done nor to be trained" in line for line in lines)
    assert not (tmp_path / "out" / "runs").exists()  # nothing was started


def test_runs_not_started_within_start_for_are_left_for_a_later_call(tmp_path: Path) -> None:
    from sidrec.offline.bench.runner import Budget, train_all

    runs = [r for r in plan_runs(seeds=1) if r.group in ("id", "sid-rqsum")]
    lines: list[str] = []
    failed = train_all(
        tmp_path / "data", tmp_path / "out", runs, Budget(1, 1, 1), "cpu", 2, lines.append, 0.0
    )
    assert failed == []  # left over, not failed: a later call trains them
    assert any("2 runs left for a later call" in line for line in lines)
    assert not (tmp_path / "out" / "runs").exists()


def test_training_order_puts_awaited_runs_first_and_extra_large_seeds_last() -> None:
    from sidrec.offline.bench.runner import training_order

    ordered = training_order(plan_runs(seeds=3))
    names = [r.name for r in ordered]
    hybrids = [i for i, r in enumerate(ordered) if r.group in HYBRID_FUSIONS]
    assert hybrids == list(range(len(hybrids)))  # large-hybrid waits for these: first
    large_later = [i for i, r in enumerate(ordered) if r.shape == "large" and r.seed > 0]
    assert large_later == list(range(len(ordered) - len(large_later), len(ordered)))
    assert names.index("id.s2") < names.index("large-id.s0") < names.index("id:no-time.s0")
    assert sorted(names) == sorted(r.name for r in plan_runs(seeds=3))


def test_prepare_stage_on_a_generic_product_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Amazon layout (items.csv: item_id,title,text; no year, no genres): the "title" text
    kind falls back to what the items have and says so; SIDs and baselines are written."""
    from sidrec.offline.bench.prepare import prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    kinds = ["Puzzles", "Dolls", "Board Games", "Outdoor"]
    items = ["item_id,title,text"] + [
        f"B{i:04d},Toy {i} {kinds[i % 4]},categories: Toys & Games > {kinds[i % 4]}"
        for i in range(40)
    ]
    (data / "items.csv").write_text("\n".join(items) + "\n")
    rng = np.random.default_rng(0)
    events = ["user_id,item_id,timestamp"] + [
        f"A{u},B{i:04d},{t}"  # timestamp = position in the user's sequence, as in amazon-toys
        for u in range(50)
        for t, i in enumerate(rng.choice(40, size=int(rng.integers(4, 9)), replace=False))
    ]
    (data / "interactions.csv").write_text("\n".join(events) + "\n")

    logged: list[str] = []
    folder = prepare(data, tmp_path / "out", tmp_path / "cache", log=logged.append)
    for name in SID_SETS:
        assert (folder / f"sids-{name}.npy").is_file()
        assert (folder / f"sid-report-{name}.json").is_file()
    texts = json.loads((folder / "texts.json").read_text())
    assert texts["full"] == {"fields": "all", "note": ""}
    assert texts["title"]["fields"] == "all"
    assert "no item has year or genres" in texts["title"]["note"]
    assert any("no item has year or genres" in line for line in logged)
    np.testing.assert_array_equal(
        np.load(folder / "content-title.npy"), np.load(folder / "content-full.npy")
    )
    baselines = json.loads((folder / "baselines.json").read_text())
    test = baselines["most-popular"]["test"]
    assert test["history_excluded"] is True and "hr@5" in test["overall"]
    assert 0.0 <= test["cold_start"]["random_hr@10"] <= 1.0

    # A folder prepared before the fallback (title vectors from the bare title) is redone.
    np.save(folder / "content-title.npy", np.zeros((40, 384), dtype=np.float32))
    (folder / "texts.json").unlink()
    prepare(data, tmp_path / "out", tmp_path / "cache", log=logged.append)
    np.testing.assert_array_equal(
        np.load(folder / "content-title.npy"), np.load(folder / "content-full.npy")
    )
