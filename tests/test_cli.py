"""The `sidrec` command: every step through the real CLI on a small generic-format data set,
user mistakes without tracebacks, and the demo exchange against a served bundle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import RedisServer, write_synthetic_dataset

from sidrec.bundle import load_bundle
from sidrec.content_term import ContentTerm
from sidrec.item_features import ItemFeatures
from sidrec.offline.demo import run_demo
from sidrec.offline.new_items import NEW_ITEM_SCALES, RIDGE_PENALTIES, choose_scale

COMMANDS = [
    [],
    ["data", "get"],
    ["sids", "build"],
    ["train"],
    ["eval"],
    ["export"],
    ["pipeline"],
    ["serve"],
    ["quickstart"],
    ["histories", "load"],
]


def sidrec(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sidrec.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "sidrec")
def test_every_command_has_help(command: list[str], tmp_path: Path) -> None:
    done = sidrec(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    missing = sidrec("sids", "build", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "no such data folder" in missing.stderr
    assert "Traceback" not in missing.stderr + missing.stdout

    bad_bundle = sidrec("serve", "--bundle", str(tmp_path), cwd=tmp_path)
    assert bad_bundle.returncode == 2
    assert "manifest.json: not found" in bad_bundle.stderr
    assert "Traceback" not in bad_bundle.stderr

    unknown = sidrec("train", "--data", str(tmp_path / "nowhere"), "--variants", "x", cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr

    write_synthetic_dataset(tmp_path / "data", users=40, per_theme=6)
    args = ["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run")]
    precision = sidrec("sids", "build", *args, "--content-precision", "fp16", cwd=tmp_path)
    assert precision.returncode == 2 and "Traceback" not in precision.stderr
    assert "expected one of fp32, int8" in precision.stderr


@pytest.mark.slow
def test_steps_through_the_cli(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    write_synthetic_dataset(data, users=200)
    env = {"SIDREC_CACHE": str(tmp_path / "cache")}
    common = ["--data", str(data), "--run", str(run)]

    sids = sidrec("sids", "build", *common, "--layers", "2", "--codes", "8", cwd=tmp_path, env=env)
    assert sids.returncode == 0, sids.stderr
    report = json.loads((run / "sids" / "sid_report.json").read_text())
    assert report["layers"] == 2 and report["codes"] == 8 and report["unique_full_sids"]

    variants = "id,hybrid-sum"
    trained = sidrec(
        "train", *common, "--variants", variants, "--epochs", "2", "--procs", "1",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    for name in variants.split(","):
        metrics = json.loads((run / name / "metrics.json").read_text())
        assert metrics["epochs_run"] == 2 and "test" in metrics

    evaluated = sidrec("eval", *common, cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"most-popular", "content-only", "id", "hybrid-sum"}
    for name in results:  # the printed table has a row per model
        assert name in evaluated.stdout
    assert {p.name for p in (run / "plots").iterdir()} == {
        "validation_curves.png",
        "popularity_bins.png",
        "cold_vs_warm.png",
    }

    # hybrid-sum's new-item scale, chosen on validation by the warm rule, with the figures of
    # the table the service holds (the model's own, scale 1, kept beside them)
    hybrid = json.loads((run / "hybrid-sum" / "metrics.json").read_text())
    by_scale = hybrid["new_items"]["valid_by_new_item_scale"]
    assert set(by_scale) == {str(s) for s in NEW_ITEM_SCALES}
    chosen = choose_scale(by_scale, hybrid["new_items"]["valid_hot_ndcg@10_never_recommended"])
    weight = hybrid["new_items"]["new_item_content_weight"]
    rare_count = hybrid["new_items"]["rare_item_max_count"]
    rare_weight = hybrid["new_items"]["rare_item_content_weight"]
    valid_ndcg = hybrid["valid"]["overall"]["ndcg@10"]
    # the warm term, chosen first: the passing cell with the best validation NDCG@10, or none;
    # the new and rare items' weights are chosen over it
    warm_weight = hybrid["new_items"]["warm_item_content_weight"]
    warm_record = hybrid["new_items"]["warm_term"]
    assert warm_record["weight"] == warm_weight
    warm_ndcg = warm_record["valid_ndcg@10_by_cell"]
    if warm_weight:
        kept = f"{warm_record['reads']} weight {warm_weight:g}"
        assert warm_ndcg[kept] == max(warm_ndcg[c] for c in warm_record["passes"])
        assert warm_ndcg[kept] > warm_ndcg["weight 0"]
    else:
        assert warm_record["passes"] == []
    if rare_count:  # a term on rarely trained items: the cell its rule took
        by_cell = hybrid["new_items"]["rare_term"]["valid_by_cell"]
        cell = f"count {rare_count} weight {rare_weight - warm_weight:g}"
        assert valid_ndcg == pytest.approx(by_cell[cell]["ndcg@10"])
    elif weight == warm_weight:  # no new items' term over the warm one: the scale alone
        assert hybrid["new_items"]["new_item_scale"] == chosen
        assert valid_ndcg == pytest.approx(by_scale[str(chosen)]["ndcg@10"])
    else:  # the (scale, weight) cell the rule took over the term's cells and weight 0's
        scale = hybrid["new_items"]["new_item_scale"]
        cell = f"scale {scale:g} weight {weight - warm_weight:g}"
        assert hybrid["new_items"]["content_term"]["chosen"] == cell
        by_cell = hybrid["new_items"]["content_term"]["valid_by_cell"]
        assert valid_ndcg == pytest.approx(by_cell[cell]["ndcg@10"])
    # the served table's new items carry a content part fitted on the trained items' id rows
    # (the model as trained, SID-only new items at scale 1, is kept as "unscaled")
    fit = hybrid["new_items"]["content_part"]
    assert fit["penalty"] in RIDGE_PENALTIES
    assert fit["fitted_on_items"] == hybrid["split"]["trained_items"]
    # each part at its own warm-rule scale: the content neighbours' part, and both parts on
    # the content vector plus the items' genres (the catalog names them), replaced the ridge
    # part only where they found more new items on validation (the earlier on a tie); the
    # neighbours' part also by the cosine about the catalog's mean
    names = ("ridge", "neighbours", "neighbours_centred", "ridge_features",
             "neighbours_features", "neighbours_features_centred")  # fmt: skip
    found = {name: fit[f"valid_cold_start_hr@10_{name}"] for name in names}
    kept = max(names, key=lambda name: found[name])
    assert fit["kind"] == kept.removesuffix("_centred").removesuffix("_features")
    assert (fit["item_features"] is not None) == ("_features" in kept)
    assert fit["fit"].get("centred", False) == kept.endswith("_centred")
    assert fit[f"new_item_scale_{kept}"] == chosen  # the kept table's own rule
    assert set(hybrid["unscaled"]) == {"valid", "test"}
    assert "new_items" not in json.loads((run / "id" / "metrics.json").read_text())

    exported = sidrec("export", *common, "--variant", "hybrid-sum", cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr
    bundle = load_bundle(run / "bundle")
    assert bundle.model["variant"] == "hybrid"
    assert bundle.model["new_item_score_scale"] == hybrid["new_items"]["new_item_scale"]
    # the term's cosine reads the content vector, or that and the items' genres: both were
    # offered (the catalog names genres; the warm term's kind alone where it has one), and the
    # one whose pick found more new items on validation kept (the content vector on a tie)
    term_record = hybrid["new_items"]["content_term"]
    kinds = [warm_record["reads"]] if warm_weight else ["content", "content_features"]
    found_by = {k: term_record[f"valid_cold_start_hr@10_{k}"] for k in kinds}
    assert term_record["reads"] == max(found_by, key=lambda k: found_by[k])
    read = hybrid["new_items"]["content_term_features"]
    assert read is None or (
        term_record["reads"] == "content_features" and (weight or rare_count or warm_weight)
    )
    features = ItemFeatures.from_record(read) if read else None
    term = bundle.content_term
    # the history's half-life: the content-only baseline's best on validation
    by_half_life = term_record["content_only_valid_ndcg@10_by_half_life"]
    best = max(by_half_life, key=lambda h: by_half_life[h])
    if term.active:
        assert str(term.half_life) == best == str(hybrid["new_items"]["content_term_half_life"])
    expected = ContentTerm(weight, rare_weight, rare_count, features, half_life=term.half_life,
                           warm_weight=warm_weight)  # fmt: skip
    assert replace(term, centre=None) == expected
    # calibration takes the term's cosine about the catalog's mean: a kept term has its centre
    assert (term.centre is not None) == term.active
    assert bundle.lists("item_content.npy") == term.active
    if term.active:
        term_vectors = bundle.item_content()
        assert term_vectors is not None
        width = bundle.manifest["content"]["dim"] + (features.dim if features else 0)
        assert term_vectors.shape == (len(bundle.items()) + 1, width)
        content = np.load(run / "content_vectors.npy")  # row r of the bundle at r - 1
        fields = [r.fields for r in sorted(bundle.items(), key=lambda r: r.row)]
        centred = ContentTerm(features=features).centred_on(content, fields)
        np.testing.assert_allclose(term.centre, centred.centre, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(term_vectors[1:], term.vectors(content, fields))
    assert bundle.model["new_items"] == "sid+content"
    assert bundle.model["new_item_content_part"] == fit["kind"]
    assert bundle.model["new_item_content_features"] == fit["item_features"]
    assert bundle.manifest["sid"] == {**bundle.manifest["sid"], "layers": 2, "codes": 8}
    assert bundle.manifest["metrics"]["test"] == results["hybrid-sum"]["test"]["overall"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_demo_exchange_against_a_served_bundle(
    store: str,
    bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
) -> None:
    # The data the session's bundle was trained on (conftest: same generator, same seed),
    # loaded as `make demo` does: into the in-process store (`sidrec serve --histories`), or
    # with SIDREC_REDIS_URL set into Redis (`sidrec histories load`) before serving.
    if store == "redis":
        monkeypatch.setenv("SIDREC_REDIS_URL", redis_server.url)
    else:
        monkeypatch.delenv("SIDREC_REDIS_URL", raising=False)
    write_synthetic_dataset(tmp_path / "data")
    run_demo(bundle_dir, port=_free_port(), histories=tmp_path / "data", user="u0")
    out = capsys.readouterr().out
    # A user of the training data: recommended from their own history, not the fallback.
    assert "user u0: " in out and " events in the store; newest: " in out
    assert "POST /v1/recommend -> 200 (fallback=None, history_len=" in out
    assert "POST /v1/events" in out and "'accepted': 1" in out
    assert "POST /v1/items -> 200" in out and "'status': 'created'" in out
    assert "new item for demo-fan:" in out


def test_pipeline_help_shows_an_example_per_layout(tmp_path: Path) -> None:
    # At 80 columns, a terminal's common width: each example command stays on one line.
    done = sidrec("pipeline", "--help", cwd=tmp_path, env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    for layout, arguments in [
        ("MovieLens-100K, fetched", "--data ml-100k --run runs/ml-100k"),
        ("MovieLens-1M: ratings.dat + movies.dat", "--data data/ml-1m --run runs/ml-1m"),
        ("MovieLens-20M / latest: ratings.csv", "--data data/ml-20m --run runs/ml-20m"),
        ("generic: interactions.csv", "--data data/shop --run runs/shop --name shop"),
    ]:
        assert any(line.startswith(layout) for line in lines), done.stdout
        assert f"sidrec pipeline {arguments}" in lines, done.stdout
    assert "per-user positions 0, 1, 2, ... are read as order" in done.stdout
    assert "--log-format" in done.stdout and "--name" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_pipeline_log_in_a_file_is_plain(tmp_path: Path, procs: int) -> None:
    # A newcomer's `sidrec pipeline ... > log 2>&1`: with stdout a file, no progress bars
    # (tqdm redraws are megabytes of '\r' fragments), no torchrun banner, one line per epoch,
    # and --name instead of the folder's name everywhere the data set is named.
    data, run = tmp_path / "folder-name", tmp_path / "run"
    write_synthetic_dataset(data, users=60)
    log_path = tmp_path / "pipeline.log"
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "sidrec.cli", "pipeline", "--data", str(data),
             "--run", str(run), "--variants", "id", "--epochs", "2", "--procs", str(procs),
             "--name", "toy-shop"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SIDREC_CACHE": str(tmp_path / "cache")},
        )  # fmt: skip
    text = log_path.read_text()
    assert done.returncode == 0, text
    assert len(text.encode()) < 60_000, text
    assert "\r" not in text and "it/s" not in text and "s/it" not in text, text
    assert "OMP_NUM_THREADS" not in text
    # The ONNX exporter's op registry ("torchvision is not installed. Skipping ...", four
    # lines) on the content encoder's first export (a fresh SIDREC_CACHE here).
    assert "torchvision" not in text, text
    assert "epoch 1: loss" in text and "epoch 2: loss" in text
    # rich laid out 200 columns wide: the collision sentence stays on one line.
    assert "the dedup digit gives each a distinct full SID" in text

    assert text.startswith("toy-shop: 60 users")
    assert "toy-shop: test metrics" in text
    assert json.loads((run / "data.json").read_text())["name"] == "toy-shop"
    assert json.loads((run / "id" / "metrics.json").read_text())["dataset"] == "toy-shop"
    assert load_bundle(run / "bundle").manifest["dataset"]["name"] == "toy-shop"


@pytest.mark.slow
def test_quickstart_log_in_a_file_is_plain(tmp_path: Path) -> None:
    # `make demo > log 2>&1`, the README's main job: no progress bars in the file either.
    data = tmp_path / "shop"
    write_synthetic_dataset(data, users=60)
    log_path = tmp_path / "quickstart.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "sidrec.cli", "quickstart", "--data", str(data),
             "--run", str(tmp_path / "run"), "--epochs", "1", "--procs", "1",
             "--port", str(port)],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SIDREC_CACHE": str(tmp_path / "cache")},
        )  # fmt: skip
    text = log_path.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "it/s" not in text and "s/it" not in text, text
    assert "epoch 1: loss" in text


def _stored(url: str, users: list[str], history_len: int) -> dict[str, list[tuple[str, int]]]:
    """What the service's own history store reads back for `users`."""
    import asyncio

    from redis.asyncio import Redis

    from sidrec.service.history_store import RedisHistoryStore

    async def read() -> dict[str, list[tuple[str, int]]]:
        redis = Redis.from_url(url)
        try:
            store = RedisHistoryStore(redis, "sidrec:", history_len, 60)
            return {u: await store.history(u) for u in users}
        finally:
            await redis.aclose()

    return asyncio.run(read())


def test_histories_load_into_redis(
    tmp_path: Path, bundle_dir: Path, redis_server: RedisServer, start_service: Any
) -> None:
    from sidrec.offline.data.load import load_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data)  # the data the session's bundle was trained on
    expected = load_dataset(data)
    args = ["histories", "load", "--data", str(data), "--redis-url", redis_server.url]
    args += ["--history-len", "10", "--bundle", str(bundle_dir)]
    runs = [sidrec(*args, cwd=tmp_path) for _ in range(2)]
    users = expected.users[:20]
    stored = []
    for done in runs:
        assert done.returncode == 0, done.stderr
        # stdout is a pipe here: no progress bar redraws, one final line with the rate.
        assert "\r" not in done.stdout + done.stderr
        last = done.stdout.strip().splitlines()[-1]
        assert last.startswith(f"loaded {10 * len(expected.users):,} events of 600 users into ")
        assert last.endswith(" events/s")
        stored.append(_stored(redis_server.url, users, 10))
    assert stored[0] == stored[1]  # a re-run stores the same lists, not longer ones
    for u, user_id in enumerate(users):
        rows = expected.sequences[u][-10:]
        ts = expected.timestamps[u][-10:] if expected.timestamps is not None else None
        assert ts is not None
        want = [(expected.catalog.ids[r - 1], int(t)) for r, t in zip(rows, ts, strict=True)]
        assert stored[0][user_id] == want

    # The service reads them: a user of the data gets recommendations from that history.
    service = start_service(redis_url=redis_server.url, history_len=10)
    rec = service.post("/v1/recommend", {"user_id": users[0], "k": 5}).json()
    assert rec["fallback"] is None and rec["history_len"] == 10, rec
    history = service.get(f"/v1/users/{users[0]}/history").json()["events"]
    assert [(e["item_id"], e["ts"]) for e in history] == stored[0][users[0]]


def _newest(data: Path, history_len: int) -> dict[str, list[tuple[str, int]]]:
    """Each user's newest `history_len` (item_id, ts) of the data set, oldest first."""
    from sidrec.offline.data.load import load_dataset

    expected = load_dataset(data)
    assert expected.timestamps is not None
    return {
        user_id: [
            (expected.catalog.ids[r - 1], int(t))
            for r, t in zip(
                expected.sequences[u][-history_len:],
                expected.timestamps[u][-history_len:],
                strict=True,
            )
        ]
        for u, user_id in enumerate(expected.users)
    }


def test_histories_file_into_the_in_process_store(
    tmp_path: Path, bundle_dir: Path, start_service: Any
) -> None:
    # `sidrec histories load --out` writes the service's own histories file; the service
    # (`python -m sidrec.service`, no CLI, no pandas needed) loads it with SIDREC_HISTORIES.
    data, out = tmp_path / "data", tmp_path / "histories.jsonl"
    write_synthetic_dataset(data)
    args = ["histories", "load", "--data", str(data), "--out", str(out), "--history-len", "12"]
    done = sidrec(*args, "--bundle", str(bundle_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    want = _newest(data, 12)
    last = done.stdout.strip().splitlines()[-1]
    events = sum(len(e) for e in want.values())
    assert last.startswith(f"wrote {events:,} events of 600 users to {out} in "), last
    assert last.endswith(" events/s") and "\r" not in done.stdout + done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 600
    assert json.loads(lines[0]) == {"user_id": "u0", "events": [list(e) for e in want["u0"]]}

    service = start_service(histories=out, history_len=10)  # the store keeps its newest 10
    for user in ("u0", "u599"):
        history = service.get(f"/v1/users/{user}/history").json()["events"]
        assert [(e["item_id"], e["ts"]) for e in history] == want[user][-10:]
    rec = service.post("/v1/recommend", {"user_id": "u0", "k": 5}).json()
    assert rec["fallback"] is None and rec["history_len"] == 10, rec


def test_serve_histories_from_a_data_folder(tmp_path: Path, bundle_dir: Path) -> None:
    # `sidrec serve --histories DIR`: the CLI reads the folder (offline readers) and hands the
    # in-process store a histories file; the user of the data is served from their history.
    data = tmp_path / "data"
    write_synthetic_dataset(data)
    port = _free_port()
    log_path, scratch = tmp_path / "serve.log", tmp_path / "tmp"
    scratch.mkdir()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidrec.cli", "serve", "--bundle", str(bundle_dir),
             "--port", str(port), "--histories", str(data)],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SIDREC_HISTORY_LEN": "15",
                 "SIDREC_ORT_THREADS": "1", "TMPDIR": str(scratch)},
        )  # fmt: skip
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        want = _newest(data, 15)
        history = http.get("/v1/users/u3/history").json()["events"]
        assert [(e["item_id"], e["ts"]) for e in history] == want["u3"]
        rec = http.post("/v1/recommend", json={"user_id": "u3", "k": 5}).json()
        assert rec["fallback"] is None and rec["history_len"] == 15, rec
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = log_path.read_text()
    events = sum(len(e) for e in want.values())
    assert f"histories: {events:,} events of 600 users from {data}" in text, text
    assert not list(scratch.glob("sidrec-histories-*"))  # the file handed over is removed


def test_histories_load_mistakes_are_one_line_errors(tmp_path: Path, bundle_dir: Path) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, users=20)
    no_redis = sidrec("histories", "load", "--data", str(data), cwd=tmp_path)
    assert no_redis.returncode == 2, no_redis.stderr
    assert "--redis-url" in no_redis.stderr and "sidrec serve --histories" in no_redis.stderr
    # Items the bundle does not hold: refused before anything is written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "items.csv").write_text("item_id,title\nzz1,Some film\nzz2,Another film\n")
    (other / "interactions.csv").write_text("user_id,item_id,order\nu,zz1,1\nu,zz2,2\n")
    wrong = sidrec(
        "histories", "load", "--data", str(other), "--bundle", str(bundle_dir),
        "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path,
    )  # fmt: skip
    assert wrong.returncode == 2 and "was it trained on this data?" in wrong.stderr, wrong.stderr
    both = sidrec(
        "histories", "load", "--data", str(data), "--out", str(tmp_path / "h.jsonl"),
        "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path,
    )  # fmt: skip
    assert both.returncode == 2 and "give --redis-url or --out, not both" in both.stderr
    bad = sidrec("serve", "--bundle", str(bundle_dir), "--histories", str(tmp_path / "nowhere"),
                 cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr, bad.stderr
    # A histories file is checked whole before the service starts: file and line named.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"user_id": "u", "events": [["1", 5]]}\n{"user_id": "v", "events": 3}\n')
    malformed = sidrec("serve", "--bundle", str(bundle_dir), "--histories", str(broken),
                       cwd=tmp_path)  # fmt: skip
    assert malformed.returncode == 2, malformed.stderr
    assert f"{broken}, line 2: events: expected a list" in malformed.stderr
    # The service alone reads histories files only; a data folder is refused, saying what to do.
    folder = subprocess.run(
        [sys.executable, "-m", "sidrec.service"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
        env={**os.environ, "SIDREC_BUNDLE": str(bundle_dir), "SIDREC_HISTORIES": str(data)},
    )  # fmt: skip
    assert folder.returncode == 2, folder.stderr
    assert "SIDREC_HISTORIES" in folder.stderr and "--out FILE.jsonl" in folder.stderr
    for done in (no_redis, wrong, both, bad, malformed, folder):
        assert "Traceback" not in done.stdout + done.stderr
