"""`sidrec eval` / `sidrec pipeline` evaluation options: the candidate rule (--keep-history),
the random cold-start rate beside the cold-start column, the ML-1M tie order (--tie-order)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_dataset
from rich.console import Console
from typer.testing import CliRunner

from sidrec.cli import app
from sidrec.offline import pipeline


def test_evaluate_keep_history_reranks_and_records_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic_dataset(tmp_path / "data", users=60, per_theme=5)
    steps = pipeline.Steps.open(tmp_path / "data", tmp_path / "run", cold_fraction=0.2)
    # Random content vectors: no MiniLM needed for what is tested here.
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(steps.data.num_items, 384)).astype(np.float32)
    steps.__dict__["content_vectors"] = vectors
    steps.train("id", epochs=1, patience=1, procs=1)
    capsys.readouterr()

    excluded = steps.evaluate()
    out_excluded = capsys.readouterr().out
    kept = steps.evaluate(keep_history=True)
    out_kept = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(kept))  # the last evaluation is the one on disk

    for name in ("most-popular", "content-only", "id"):
        for stage in ("valid", "test"):
            assert excluded[name][stage]["history_excluded"] is True
            assert kept[name][stage]["history_excluded"] is False
            assert "hr@5" in kept[name][stage]["overall"]
        # History items now compete with the target: no rank can get better.
        assert kept[name]["test"]["overall"]["mrr"] <= excluded[name]["test"]["overall"]["mrr"]
    # The trained variant is ranked again from its checkpoint, not copied from metrics.json.
    metrics = json.loads((tmp_path / "run" / "id" / "metrics.json").read_text())
    assert excluded["id"]["test"]["overall"] == metrics["test"]["overall"]
    assert kept["id"]["test"]["overall"] != metrics["test"]["overall"]

    # Random cold-start HR@10: every catalog item a candidate when history is kept.
    n = steps.data.num_items
    assert kept["id"]["test"]["cold_start"]["random_hr@10"] == pytest.approx(10 / n)
    random_excluded = excluded["id"]["test"]["cold_start"]["random_hr@10"]
    assert 10 / n < random_excluded < 1.0
    assert f"cold-start HR@10 (random {random_excluded:.4f})" in out_excluded
    assert "history excluded" in out_excluded and "HR@5" in out_excluded
    assert "history kept as candidates" in out_kept
    assert "the user's history included (--keep-history)" in out_kept
    assert json.loads((tmp_path / "run" / "data.json").read_text())["tie_order"] == "file"
    # Steps on one run folder that read the data in another tie order get a warning.
    (tmp_path / "run" / "data.json").write_text('{"tie_order": "gr"}')
    pipeline.Steps.open(tmp_path / "data", tmp_path / "run")
    warned = " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns off a tty
    assert "read the data with tie order 'gr', this one with 'file'" in warned


def test_results_table_shows_a_dash_for_figures_old_reports_lack(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def report(with_new: bool) -> dict:
        metrics = {"count": 4, "hr@10": 0.5, "ndcg@10": 0.25, "hr@50": 0.75, "ndcg@50": 0.3}
        metrics |= {"hr@200": 1.0, "ndcg@200": 0.35, "mrr": 0.3}
        if with_new:
            metrics |= {"hr@5": 0.25, "ndcg@5": 0.2}
        return {
            "overall": metrics,
            "by_popularity": {b: {"hr@10": 0.5, "count": 1} for b in ("hot", "mild", "cold")},
            "cold_start": {"hr@10": 0.0, "count": 1, "random_hr@10": 0.0123},
        }

    pipeline.print_results({"new": {"test": report(True)}, "old": {"test": report(False)}}, "toy")
    out = capsys.readouterr().out
    new_row = next(line for line in out.splitlines() if "│ new" in line)
    old_row = next(line for line in out.splitlines() if "│ old" in line)
    assert "0.2500" in new_row and " - " in old_row
    assert "random 0.0123" in out


@pytest.mark.parametrize("width", [80, 100, 200])
def test_results_table_shows_every_figure_in_full_at_any_width(width: int) -> None:
    # At a terminal's 80 or 100 columns rich squeezed the 14-column table to "0.1…" and
    # "mos…": the table is split instead; a log file's 200 columns keep one table.
    names = ["most-popular", "content-only", "id", "hybrid-switch", "hybrid-tower"]
    bin_names = ("hot", "mild", "cold")
    results: dict[str, dict] = {}
    figures: dict[str, list[float]] = {}
    for row, name in enumerate(names):
        overall = [0.1 + 0.0371 * k + 0.0013 * row for k in range(len(pipeline.METRIC_COLUMNS))]
        bins = [0.2 + 0.011 * k + 0.0017 * row for k in range(len(bin_names))]
        cold_start = 0.0456 + 0.0019 * row
        figures[name] = [*overall, *bins, cold_start]
        test = {
            "overall": {"count": 6040, **dict(zip(pipeline.METRIC_COLUMNS, overall, strict=True))},
            "by_popularity": {
                b: {"hr@10": v, "count": 2000} for b, v in zip(bin_names, bins, strict=True)
            },
            "cold_start": {"hr@10": cold_start, "count": 300, "random_hr@10": 0.0123},
        }
        results[name] = {"test": test}

    out = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    pipeline.print_results(results, "ml-1m", out)
    text = out.export_text()
    assert "…" not in text, text
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    assert lines[0] == "ml-1m: test metrics (leave-one-out, full ranking, history excluded)"
    for name in names:
        rows = [line for line in lines if line.startswith(f"│ {name} ")]
        shown = " ".join(rows)
        assert all(f" {figure:.4f} " in shown for figure in figures[name]), text
    assert "random 0.0123" in text and "cold-start HR@10" in text
    for header in ("HR@5", "NDCG@200", "MRR", "hot HR@10", "mild HR@10", "cold HR@10"):
        assert header in text, text
    tables = text.count("┏")
    if width == 200:
        assert tables == 1 and "cold-start HR@10 (random 0.0123)" in text
    else:
        assert tables > 1, text
        assert all(sum(line.startswith(f"│ {n} ") for line in lines) == tables for n in names)


def test_cli_options_and_tie_order_refusal(tmp_path: Path) -> None:
    runner = CliRunner()
    for command in ("eval", "pipeline"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0
        assert "--keep-history" in shown.output and "--tie-order" in shown.output
    for command in ("train", "export"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--tie-order" in shown.output

    # ML-1M as sequences.txt: GR's order cannot be derived, a one-line error, exit 2.
    data = tmp_path / "ml-1m"
    data.mkdir()
    (data / "movies.dat").write_text("1::A (1995)::Drama\n2::B (1996)::Comedy\n")
    (data / "sequences.txt").write_text("7 1 2 1\n")
    done = runner.invoke(
        app, ["eval", "--data", str(data), "--run", str(tmp_path / "run"), "--tie-order", "gr"]
    )
    assert done.exit_code == 2
    assert "tie order 'gr' needs ratings.dat" in done.output
    assert "Traceback" not in done.output


def test_hybrid_tower_trains_fits_evaluates_exports_and_ablates(tmp_path: Path) -> None:
    from sidrec.bundle import load_bundle
    from sidrec.offline.bench import tower_ablation
    from sidrec.offline.tower import NEW_ITEM_OFFSETS, TOWER_FILE

    write_synthetic_dataset(tmp_path / "data", users=80, per_theme=6)
    steps = pipeline.Steps.open(tmp_path / "data", tmp_path / "run", cold_fraction=0.2)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(steps.data.num_items, 384)).astype(np.float32)
    steps.__dict__["content_vectors"] = vectors
    np.save(tmp_path / "run" / "content_vectors.npy", vectors)
    steps.train("hybrid-tower", epochs=2, patience=2, procs=1)

    metrics = json.loads((tmp_path / "run" / "hybrid-tower" / "metrics.json").read_text())
    assert (tmp_path / "run" / "hybrid-tower" / TOWER_FILE).is_file()
    tower = metrics["tower"]
    assert tower["new_item_offset_logits"] in NEW_ITEM_OFFSETS and tower["new_item_scale"] == 1.0
    assert set(tower["valid_by_new_item_offset"]) == {str(s) for s in NEW_ITEM_OFFSETS}
    # the chosen offset is the smallest within one standard error of the best on validation
    # whose hot bin is within 2% of the table's with new items never recommended
    by = tower["valid_by_new_item_offset"]
    best = max(by.values(), key=lambda v: v["ndcg@10"])
    within = [
        float(k)
        for k, v in by.items()
        if v["ndcg@10"] >= best["ndcg@10"] - best["se"]
        and v["hot_ndcg@10"] >= 0.98 * tower["valid_hot_ndcg@10_never_recommended"]
    ]
    assert tower["new_item_offset_logits"] == (min(within) if within else max(NEW_ITEM_OFFSETS))
    # the id rows' own figures are kept; withheld items had no vector there, now they do
    assert metrics["id_rows"]["test"]["cold_start"]["hr@10"] == 0.0
    assert (
        metrics["test"]["cold_start"]["count"] == metrics["id_rows"]["test"]["cold_start"]["count"]
    )
    # --keep-history ranks the served table (tower rows included) again
    kept = steps.evaluate(keep_history=True)["hybrid-tower"]
    assert kept["test"]["history_excluded"] is False

    bundle = load_bundle(steps.export("best"))  # the only variant trained in this run
    assert bundle.new_item_graph == "item_vector.onnx" and not bundle.lists("sid_to_vector.onnx")
    assert bundle.model["new_items"] == "content-tower"
    assert bundle.model["new_item_score_scale"] == tower["new_item_scale"]
    assert bundle.model["new_item_score_offset"] == pytest.approx(tower["new_item_offset"])

    out = tower_ablation.main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"),
                               "--variant", "hybrid-tower", "--parts", "sid+content,content",
                               "--objectives", "ids,users", "--scales", "1.0",
                               "--offsets", "2", "--roles", "--content-weights", "3",
                               "--rare-gates", "3:0.5", "--profile", "content,tower"])  # fmt: skip
    # 2 baselines; per tower (2 parts x 2 objectives): scale 1 and offset 2, each alone, with
    # the term in each of its two spaces and with the rare gate, and the two roles
    assert len(out) == 2 + 2 * 2 * 10
    name = "tower sid+content/users offset 2"
    cells = {f"{name} content 3", f"{name} tower-profile 3", f"{name} rare<=3 x0.5"}
    assert cells <= out.keys()
    assert json.loads((tmp_path / "run" / "tower_ablation.json").read_text()).keys() == out.keys()


def test_a_runs_content_term_is_read_from_its_record(tmp_path: Path) -> None:
    from sidrec.content_term import ContentTerm
    from sidrec.item_features import ItemFeatures
    from sidrec.offline.new_items import NEW_ITEMS_FILE, load_content_term

    assert load_content_term(tmp_path) == ContentTerm()  # not calibrated: no term
    record = tmp_path / NEW_ITEMS_FILE
    term = ContentTerm(new_weight=1.0, rare_weight=2.0, rare_max_count=3)
    record.write_text(json.dumps({"new_item_scale": 0.9, **term.record()}))
    assert load_content_term(tmp_path) == term
    # a run calibrated before the rarely trained items' term keeps its new items' weight
    record.write_text(json.dumps({"new_item_scale": 0.9, "content_weight": 0.5}))
    assert load_content_term(tmp_path) == ContentTerm(new_weight=0.5)
    # a term that reads the items' genres and years keeps them
    features = ItemFeatures(("comedy", "drama"), (1990, 2000))
    term = ContentTerm(new_weight=1.0, features=features)
    record.write_text(json.dumps({"new_item_scale": 0.9, **term.record()}))
    assert load_content_term(tmp_path) == term


def test_content_term_moves_only_the_rows_it_weights() -> None:
    from sidrec.offline.evaluate import EvalBatch
    from sidrec.offline.new_items import with_content_term

    content = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # rows 1..3
    base_scores = torch.arange(8, dtype=torch.float32).view(2, 4)

    def base(batch: EvalBatch) -> torch.Tensor:
        return base_scores.clone()

    batch = EvalBatch(users=torch.tensor([0, 1]), items=torch.tensor([[1, 0], [1, 2]]),
                      timestamps=torch.zeros(2, 2, dtype=torch.int64),
                      mask=torch.tensor([[True, False], [True, True]]),
                      query_time=torch.zeros(2, dtype=torch.int64),
                      full_history=torch.tensor([[1, 0], [1, 2]]))  # fmt: skip
    weights = torch.tensor([0.0, 0.0, 0.0, 10.0])  # only row 3 (a new item) gets the term
    scores = with_content_term(base, content, weights)(batch)
    assert torch.equal(scores[:, :3], base_scores[:, :3])
    # user 0's history is row 1 ([1, 0]); row 3 is [1, 1] / sqrt(2): cos = 1 / sqrt(2)
    assert scores[0, 3].item() == pytest.approx(3.0 + 10.0 / 2**0.5)
    # user 1's is rows 1 and 2: the mean of two orthogonal unit vectors points at row 3
    assert scores[1, 3].item() == pytest.approx(7.0 + 10.0)


def test_rare_term_rule_takes_the_passing_cell_with_the_best_cold_bin() -> None:
    from sidrec.offline.new_items import RARE_MAX_COUNTS, RARE_WEIGHTS, choose_rare_term

    def cell(ndcg: float, hot: float, cold: float) -> dict:
        return {"warm": {"ndcg@10": ndcg, "se": 0.001, "hot_ndcg@10": hot},
                "valid": {"by_popularity": {"cold": {"hr@10": cold}},
                          "cold_start": {"hr@10": 0.01}}}  # fmt: skip

    # validation per (count, weight): a little more of the cold bin the more rows and weight
    cells = {(k, w): cell(0.050, 0.099, 0.02 + 0.001 * k * w)
             for k in RARE_MAX_COUNTS for w in RARE_WEIGHTS}  # fmt: skip
    cells[(5, 2.0)] = cell(0.050, 0.090, 0.09)  # the best cold bin, the hot bin 10% down
    cells[(5, 1.0)] = cell(0.044, 0.099, 0.08)  # NDCG@10 more than one SE below the best
    cells[(3, 2.0)] = cell(0.050, 0.099, 0.07)  # the best that passes: chosen
    served = cell(0.050, 0.099, 0.02)
    got = choose_rare_term(served, lambda k, w: cells[(k, w)], hot_reference=0.100)
    assert got["chosen"] == (3, 2.0)
    assert got["chosen_cell"]["valid"]["by_popularity"]["cold"]["hr@10"] == 0.07
    by_cell = got["valid_by_cell"]
    assert len(by_cell) == 1 + len(cells)
    assert by_cell["count 0 weight 0"]["passes"] and by_cell["count 3 weight 2"]["passes"]
    assert not by_cell["count 5 weight 2"]["passes"]
    assert not by_cell["count 5 weight 1"]["passes"]
    # a tie on the cold bin goes to fewer rare items, then to the smaller weight
    cells[(1, 2.0)] = cells[(2, 1.0)] = cells[(2, 0.5)] = cell(0.050, 0.099, 0.07)
    assert choose_rare_term(served, lambda k, w: cells[(k, w)], 0.100)["chosen"] == (1, 2.0)
    # where every rare cell costs the hot bin, the table keeps no term on trained items
    costly = cell(0.050, 0.090, 0.30)
    assert choose_rare_term(served, lambda k, w: costly, 0.100)["chosen"] == (0, 0.0)


def test_new_item_offset_rule_keeps_overall_and_hot_bin() -> None:
    from sidrec.offline.tower import choose_offset

    def cell(ndcg: float, hot: float, se: float = 0.001) -> dict[str, float]:
        return {"ndcg@10": ndcg, "se": se, "hot_ndcg@10": hot}

    by = {"0.0": cell(0.040, 0.080), "1.0": cell(0.0495, 0.091), "2.0": cell(0.050, 0.095),
          "3.0": cell(0.0496, 0.099), "4.0": cell(0.0492, 0.100)}  # fmt: skip
    # overall alone would take 1 (within one SE of 2's 0.050); the hot bin needs >= 0.098
    assert choose_offset(by, hot_reference=0.100) == 3.0
    assert choose_offset(by, hot_reference=0.100, tolerance=0.10) == 1.0
    # no offset keeps the hot bin: the largest, the one that shows new items least
    assert choose_offset(by, hot_reference=0.200) == 4.0


def test_new_item_scale_rule_takes_the_largest_scale_that_keeps_warm_items() -> None:
    from sidrec.offline.new_items import choose_scale

    def cell(ndcg: float, hot: float, se: float = 0.001) -> dict[str, float]:
        return {"ndcg@10": ndcg, "se": se, "hot_ndcg@10": hot}

    # a larger scale shows new items more: warm figures fall as it grows
    by = {"0.5": cell(0.0490, 0.100), "1.0": cell(0.0500, 0.099), "1.5": cell(0.0495, 0.097),
          "2.0": cell(0.0480, 0.090)}  # fmt: skip
    assert choose_scale(by, hot_reference=0.100) == 1.0  # 1.5 costs the hot bin 3%
    assert choose_scale(by, hot_reference=0.100, tolerance=0.05) == 1.5  # 2.0: overall too low
    # none keeps the hot bin: the smallest, the one that shows new items least
    assert choose_scale(by, hot_reference=0.200) == 0.5


def test_best_variant_is_chosen_on_validation_only() -> None:
    def report(valid: float, test: float) -> dict:
        return {"valid": {"overall": {"ndcg@10": valid}}, "test": {"overall": {"ndcg@10": test}}}

    results = {"id": report(0.05, 0.09), "hybrid-tower": report(0.06, 0.01),
               "most-popular": report(0.5, 0.5)}  # fmt: skip
    assert pipeline.best_variant(results, ["id", "hybrid-tower"]) == "hybrid-tower"


def test_ridge_fit_recovers_a_linear_map_and_shrinks_noise_away() -> None:
    from sidrec.offline.new_items import RIDGE_PENALTIES, fit_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20))
    weight, bias = rng.normal(size=(20, 8)), rng.normal(size=8)
    y = x @ weight + bias + 0.01 * rng.normal(size=(600, 8))
    got_w, got_b, record = fit_ridge(x, y)
    assert record["penalty"] == min(RIDGE_PENALTIES)  # clean signal: the least shrinkage
    assert np.abs(got_w - weight).max() < 0.05 and np.abs(got_b - bias).max() < 0.05
    assert max(record["heldout_r2_by_penalty"].values()) > 0.99
    # content that says nothing about the id rows: the largest penalty, a guess near the mean
    noise = rng.normal(size=(600, 8)) + 3.0
    got_w, got_b, record = fit_ridge(x, noise)
    assert record["penalty"] >= 10.0
    assert np.abs(x @ got_w + got_b - noise.mean(0)).max() < 0.5


def test_content_part_ablation_ranks_the_served_table_and_the_one_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidrec.offline.bench.content_part_ablation import main
    from sidrec.offline.new_items import (
        CONTENT_NEIGHBOURS,
        NEIGHBOUR_TEMPERATURE,
        NEW_ITEM_SCALES,
        RARE_MAX_COUNTS,
        RARE_WEIGHTS,
    )

    write_synthetic_dataset(tmp_path / "data", users=60, per_theme=5)
    steps = pipeline.Steps.open(tmp_path / "data", tmp_path / "run", cold_fraction=0.2)
    rng = np.random.default_rng(0)  # random content vectors: no MiniLM needed here
    content = rng.normal(size=(steps.data.num_items, 384)).astype(np.float32)
    # the same vectors for training and for the ablation's own Steps
    monkeypatch.setattr(pipeline.Steps, "content_vectors", property(lambda _: content))
    steps.train("hybrid-sum", epochs=1, patience=1, procs=1)
    metrics = json.loads((tmp_path / "run" / "hybrid-sum" / "metrics.json").read_text())
    chosen = metrics["new_items"]["new_item_scale"]
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"),
          "--scales", f"1.0,{chosen}", "--cold-fraction", "0.2"])  # fmt: skip
    cells = json.loads((tmp_path / "run" / "hybrid-sum" / "content_part_ablation.json").read_text())
    # the served table (content part, the paths validation kept, chosen scale) is what
    # metrics.json reports; the model as trained (no part, own paths, scale 1) is "unscaled"
    paths = metrics["new_items"]["nearest_trained_paths"]
    assert paths["on_another_path"] > 0
    kept = "nearest" if paths["chosen"] else "own"
    assert paths[f"new_item_scale_{kept}"] == chosen
    assert paths[f"valid_cold_start_hr@10_{kept}"] == max(
        paths["valid_cold_start_hr@10_own"], paths["valid_cold_start_hr@10_nearest"]
    )
    served = "content part" if paths["chosen"] else "own paths"
    weight = metrics["new_items"]["new_item_content_weight"]  # the term calibration chose
    rare_count = metrics["new_items"]["rare_item_max_count"]  # and on rare items, if any
    rare_weight = metrics["new_items"]["rare_item_content_weight"]
    warm = metrics["new_items"]["warm_item_content_weight"]  # and on every other trained item
    if weight == 0 and rare_count == 0 and warm == 0:
        assert cells[f"{served} scale {chosen:g} test"] == metrics["test"]
    assert cells["as trained scale 1 test"]["overall"] == metrics["unscaled"]["test"]["overall"]
    assert cells["as trained scale 1 valid"]["overall"] == metrics["unscaled"]["valid"]["overall"]
    assert cells["sid only scale 1 test"] != cells["as trained scale 1 test"]
    # a dense content term on new items: weight 0 is the table without it, calibration's
    # weight the served one; a heavy weight reorders the new items by their content (about
    # the catalog's mean it lowers as many as it lifts, so warm targets may rise or fall)
    weights = sorted({0.0, weight, 50.0})
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--scales",
          f"{chosen}", "--content-weights", ",".join(f"{w:g}" for w in weights),
          "--cold-fraction", "0.2"])  # fmt: skip
    terms = json.loads((tmp_path / "run" / "hybrid-sum" / "content_term_ablation.json").read_text())
    assert terms["cells"][f"scale {chosen:g} weight {weight:g}"]["test"] == metrics["test"]
    none = terms["cells"][f"scale {chosen:g} weight 0"]["test"]
    if rare_count == 0 and warm == 0:  # else the cells keep the trained items' terms
        assert cells[f"{served} scale {chosen:g} test"] == none
    heavy = terms["cells"][f"scale {chosen:g} weight 50"]["test"]
    assert heavy["cold_start"]["hr@10"] >= none["cold_start"]["hr@10"]
    assert heavy != none
    assert set(terms["picked"]) == {f"{w:g}" for w in weights}
    assert terms["chosen"] in (None, *terms["cells"])
    # the term's cosine about the catalog's mean or not, whatever was served: calibration
    # centres a term it keeps, and serves none (so plain vectors, unused) otherwise
    by_centre = {}
    for centre in ("centred", "plain"):
        main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--scales",
              f"{chosen}", "--content-weights", ",".join(f"{w:g}" for w in weights),
              "--cold-fraction", "0.2", "--term-centre", centre])  # fmt: skip
        name = f"content_term_ablation-{centre}.json"
        by_centre[centre] = json.loads((tmp_path / "run" / "hybrid-sum" / name).read_text())
    served_centre = "centred" if weight or rare_count or warm else "plain"
    assert by_centre[served_centre]["cells"] == terms["cells"]
    # a term on rarely trained items too: count 0 is the served table; a heavy weight on the
    # cold popularity bin's items finds more of its targets, at the hot bin's expense
    split = steps.split
    cold_bin = (split.popularity_bin == 2) & split.trained
    rarest = int(split.train_counts[cold_bin].max())  # the whole cold bin, no hot item
    assert rarest < int(split.train_counts[split.popularity_bin == 0].min())
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--rare-counts",
          f"{rarest},{max(rare_count, 1)}", "--rare-weights", f"50,{rare_weight:g}",
          "--cold-fraction", "0.2"])  # fmt: skip
    rare = json.loads((tmp_path / "run" / "hybrid-sum" / "rare_term_ablation.json").read_text())
    assert rare["served"] == [rare_count, rare_weight]
    # the served cell (count 0 where calibration gave trained items no term); whether it
    # passes the warm rule depends on the grid's best cell, so only calibration's own record
    # below says it passed
    served_cell = f"count {rare_count} weight {rare_weight:g}" if rare_count else "count 0 weight 0"
    assert rare["cells"][served_cell]["test"] == metrics["test"]
    lifted = rare["cells"][f"count {rarest} weight 50"]
    assert lifted["rare_items"] > 0
    bins = lifted["test"]["by_popularity"]
    without = rare["cells"]["count 0 weight 0"]["test"]["by_popularity"]
    if warm == 0:  # a warm term already lifts the cold bin's items by their content
        assert bins["cold"]["hr@10"] > without["cold"]["hr@10"]
        assert bins["hot"]["ndcg@10"] <= without["hot"]["ndcg@10"]
    assert bins != without
    # calibration's record of the term: the cells it tried and its pick
    record = metrics["new_items"]["content_term"]
    assert set(record["picked"]) == {"0", "0.5", "1", "2"}
    # (its weights over the warm term's)
    assert record["chosen"] is None or record["chosen"].endswith(f"weight {weight - warm:g}")
    # and of the rarely trained items' term: every cell, and the passing one with the best
    # cold bin on validation, whose figures metrics.json reports as the served table's
    rare_record = metrics["new_items"]["rare_term"]
    assert len(rare_record["valid_by_cell"]) == 1 + len(RARE_MAX_COUNTS) * len(RARE_WEIGHTS)
    assert rare_record["chosen"] == [rare_count, rare_weight - warm if rare_count else 0.0]
    over_warm = f"count {rare_count} weight {rare_weight - warm:g}" if rare_count else served_cell
    chosen_cell = rare_record["valid_by_cell"][over_warm]
    assert chosen_cell["passes"]
    assert chosen_cell["cold_bin_hr@10"] == max(
        c["cold_bin_hr@10"] for c in rare_record["valid_by_cell"].values() if c["passes"]
    )
    assert chosen_cell["cold_bin_hr@10"] == metrics["valid"]["by_popularity"]["cold"]["hr@10"]
    # the two content parts calibration chose between, on the kept paths, each at its own
    # warm-rule scale: the ablation's cells are calibration's figures
    cells_arg = f"{CONTENT_NEIGHBOURS}:{NEIGHBOUR_TEMPERATURE},1:1"
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--neighbours",
          cells_arg, "--item-features", "--centred-neighbours",
          "--cold-fraction", "0.2"])  # fmt: skip
    parts = json.loads(
        (tmp_path / "run" / "hybrid-sum" / "content_neighbours_ablation.json").read_text()
    )
    fit = metrics["new_items"]["content_part"]
    default = f"k {CONTENT_NEIGHBOURS} temperature {NEIGHBOUR_TEMPERATURE:g}"
    # each part on the content vector and on it plus the items' genres (the synthetic
    # catalog's themes), as calibration measured them
    for name, key in (("ridge", "ridge"), ("neighbours", default),
                      ("neighbours_centred", f"centred {default}"),
                      ("ridge_features", "features ridge"),
                      ("neighbours_features", f"features {default}"),
                      ("neighbours_features_centred", f"features centred {default}")):  # fmt: skip
        found = parts[key]["valid"]["cold_start"]["hr@10"]
        assert found == pytest.approx(fit[f"valid_cold_start_hr@10_{name}"])
        assert parts[key]["scale"] == fit[f"new_item_scale_{name}"]
    assert parts["features ridge"]["record"]["fitted_on_items"] == fit["fitted_on_items"]
    assert parts["k 1 temperature 1"]["record"]["neighbours"] == 1
    assert parts["centred k 1 temperature 1"]["record"]["centred"]
    # the hot-bin reference is calibration's (users' histories hold new items, so it depends
    # on the table it was read from): one no scale can keep leaves every cell at the smallest
    record_path = tmp_path / "run" / "hybrid-sum" / "new_items.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "valid_hot_ndcg@10_never_recommended": 10.0}))
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--neighbours",
          "1:1", "--cold-fraction", "0.2"])  # fmt: skip
    parts = json.loads(
        (tmp_path / "run" / "hybrid-sum" / "content_neighbours_ablation.json").read_text()
    )
    assert {cell["scale"] for cell in parts.values()} == {min(NEW_ITEM_SCALES)}


def test_content_term_rule_takes_the_pick_that_keeps_the_hot_bin_and_finds_most_new_items() -> None:
    from sidrec.offline.new_items import choose_scale_and_weight

    def cell(scale: float, weight: float, ndcg: float, hot: float, new: float) -> dict:
        return {"scale": scale, "weight": weight,
                "warm": {"ndcg@10": ndcg, "se": 0.001, "hot_ndcg@10": hot},
                "valid": {"cold_start": {"hr@10": new}}}  # fmt: skip

    grid = [
        cell(1.0, 0, 0.050, 0.100, 0.01),
        cell(1.2, 0, 0.050, 0.099, 0.03),  # weight 0's pick: the largest scale passing
        cell(1.0, 1, 0.050, 0.099, 0.05),  # weight 1's pick, and the most new items: chosen
        cell(1.2, 1, 0.045, 0.090, 0.09),  # NDCG@10 more than one SE below the best
        cell(1.0, 4, 0.040, 0.080, 0.20),  # hot bin 20% down at every scale: never chosen
        cell(1.2, 4, 0.030, 0.070, 0.30),
    ]
    cells = {f"scale {c['scale']:g} weight {c['weight']:g}": c for c in grid}
    picked, chosen = choose_scale_and_weight(cells, [0, 1, 4], hot_reference=0.100)
    assert picked == {"0": 1.2, "1": 1.0, "4": 1.0}  # weight 4: none passes, the safest scale
    assert chosen == "scale 1 weight 1"
    # a tie on new items goes to the smaller weight; nothing passing chooses nothing
    cells["scale 1 weight 1"]["valid"]["cold_start"]["hr@10"] = 0.03
    assert choose_scale_and_weight(cells, [0, 1, 4], 0.100)[1] == "scale 1.2 weight 0"
    assert choose_scale_and_weight(cells, [4], 0.100)[1] is None


def test_content_half_life_bench_ranks_content_only_at_each_half_life(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidrec.offline.baselines import CONTENT_HALF_LIVES, choose_content_half_life
    from sidrec.offline.bench.content_half_life import main

    write_synthetic_dataset(tmp_path / "data", users=40, per_theme=5)
    steps = pipeline.Steps.open(tmp_path / "data", tmp_path / "run", cold_fraction=0.2)
    rng = np.random.default_rng(1)  # random content vectors: no MiniLM needed here
    content = rng.normal(size=(steps.data.num_items, 16)).astype(np.float32)
    monkeypatch.setattr(pipeline.Steps, "content_vectors", property(lambda _: content))
    main(["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"),
          "--cold-fraction", "0.2"])  # fmt: skip
    cells = json.loads((tmp_path / "run" / "content_half_life.json").read_text())
    assert list(cells) == [str(h) for h in CONTENT_HALF_LIVES]
    # validation's figures are the ones the baseline's and calibration's choice reads
    _, figures = choose_content_half_life(content, steps.split, 200)
    for name, cell in cells.items():
        assert cell["valid"]["overall"]["ndcg@10"] == pytest.approx(figures[name])
        assert cell["test"]["history_excluded"] and "random_hr@10" in cell["test"]["cold_start"]
    assert len({c["valid"]["overall"]["ndcg@10"] for c in cells.values()}) > 1


def test_warm_term_rule_takes_the_best_gain_past_one_se_that_keeps_the_hot_bin() -> None:
    from sidrec.offline.new_items import WARM_WEIGHTS, choose_warm_term, warm_figures

    hot = np.arange(1000) < 300  # 300 hot targets of 1,000

    def ranks(hot_hits: int, other_hits: int) -> np.ndarray:
        # rank 1 (gain 1) for the hits, rank 500 (gain 0) for the rest: NDCG@10 = hit share
        r = np.full(1000, 500)
        r[:hot_hits] = 1
        r[300 : 300 + other_hits] = 1
        return r

    reference = warm_figures(ranks(150, 100), hot)  # NDCG@10 0.25, hot 0.5, SE ~0.014
    content = {1.0: ranks(150, 110),  # +0.010: within one SE, no gain
               2.0: ranks(149, 130), 3.0: ranks(148, 140),  # pass; 3 the best that passes
               4.0: ranks(145, 170), 6.0: ranks(140, 180)}  # hot bin 3% and 7% down  # fmt: skip
    assert set(content) == set(WARM_WEIGHTS)
    by_kind = {"content": lambda w: content[w], "content_features": lambda w: ranks(150, 135)}
    got = choose_warm_term(reference, by_kind, hot, hot_reference=0.5)
    assert (got["weight"], got["reads"]) == (3.0, "content")
    assert got["hot_ndcg@10"] == pytest.approx(148 / 300)
    assert set(got["passes"]) == {"content weight 2", "content weight 3"} | {
        f"content_features weight {w:g}" for w in WARM_WEIGHTS
    }
    assert got["valid_ndcg@10_by_cell"]["weight 0"] == 0.25
    assert got["valid_ndcg@10_by_cell"]["content weight 4"] == 0.315
    # no cell gains more than one SE within the hot bin's tolerance: no warm term
    flat = choose_warm_term(reference, {"content": lambda w: ranks(140, 200)}, hot, 0.5)
    assert (flat["weight"], flat["reads"], flat["passes"]) == (0.0, None, [])
    assert flat["hot_ndcg@10"] == reference["hot_ndcg@10"]
