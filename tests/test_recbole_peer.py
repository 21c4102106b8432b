"""The RecBole SASRec peer (offline/bench/peer.py, recbole_sasrec.py): what it exports, how it
maps RecBole's ids back to our rows, and one real 2-epoch run in the RecBole venv.

The end-to-end test builds that venv once under sidrec's cache folder (PyPI, a minute or two;
see recbole-requirements.txt) and skips only when PyPI cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import write_synthetic_dataset

from sidrec.offline.bench import peer
from sidrec.offline.data.dataset import Interactions
from sidrec.offline.data.load import load_dataset
from sidrec.offline.evaluate import summarize
from sidrec.offline.split import Split, make_split

ROOT = Path(__file__).resolve().parents[1]
# pip's words for "PyPI could not be reached": the one reason the end-to-end test may skip.
# "(from versions: none)": the index listed no release at all of a package PyPI has (pip
# says this without retry warnings when it makes no retries); a wrong pin lists the others.
NETWORK_ERRORS = (
    "(from versions: none)",
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
    "NameResolutionError",
)


def script_module() -> ModuleType:
    """recbole_sasrec.py imports recbole only inside main(), so its helpers load here."""
    spec = importlib.util.spec_from_file_location("recbole_sasrec", peer.SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Interactions, Split]:
    folder = tmp_path_factory.mktemp("peer") / "data"
    write_synthetic_dataset(folder, users=120, per_theme=10)
    data = load_dataset(folder)
    return folder, data, make_split(data, cold_fraction=0.1, seed=0)


def read_atomic(path: Path) -> tuple[list[str], list[list[int]]]:
    header, *lines = path.read_text().splitlines()
    return header.split("\t"), [[int(v) for v in line.split("\t")] for line in lines]


def test_export_writes_the_training_sequences_in_order(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    _, data, split = tiny
    counts = peer.export_split(data, split, tmp_path)
    header, rows = read_atomic(tmp_path / "peer" / "peer.inter")
    assert header == ["user_id:token", "item_id:token", "timestamp:float"]
    by_user: dict[int, list[tuple[int, int]]] = {}
    for user, item, position in rows:
        by_user.setdefault(user, []).append((position, item))
    for user, sequence in enumerate(split.train_sequences):
        events = sorted(by_user.get(user, []))
        assert [p for p, _ in events] == list(range(len(sequence)))  # positions keep our order
        assert [i for _, i in events] == sequence.tolist()
    assert counts["train_events"] == len(rows) == split.num_train_events
    # Withheld items never reach training, but are still in the catalog file.
    withheld = set(np.flatnonzero(split.withheld).tolist())
    assert withheld and not withheld & {item for _, item, _ in rows}
    header, items = read_atomic(tmp_path / "peer" / "peer.item")
    assert header == ["item_id:token"]
    assert [r[0] for r in items] == list(range(1, split.num_items + 1))


def test_export_eval_sets_round_trip(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    _, data, split = tiny
    peer.export_split(data, split, tmp_path)
    num_items, stages = script_module().load_eval(tmp_path)
    assert num_items == split.num_items
    for name in ("valid", "test"):
        ours, theirs = split.stage(name), stages[name]
        assert np.array_equal(theirs.users, ours.users)
        assert np.array_equal(theirs.targets, ours.targets)
        assert len(theirs) == len(ours)
        for i, history in enumerate(ours.histories):
            assert np.array_equal(theirs.history(i), history)  # full history, withheld kept
    # validation target = s[-2], test target = s[-1]; the test history ends with it
    assert all(
        stages["test"].history(i)[-1] == stages["valid"].targets[i]
        for i in range(len(stages["test"]))
    )


def test_export_rejects_a_split_of_other_data(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    _, data, split = tiny
    other = Split(**{**split.__dict__, "train_sequences": split.train_sequences[:-1]})
    with pytest.raises(ValueError, match="not made from this data set"):
        peer.export_split(data, other, tmp_path)


def test_recbole_ids_map_back_to_rows() -> None:
    mod = script_module()
    tokens = ["[PAD]", "3", "1", "4", "2"]  # RecBole's order of appearance
    rows = mod.row_of_recbole_id(np.array(tokens), 4)
    assert rows.tolist() == [0, 3, 1, 4, 2]
    by_id = np.array([[9.0, 0.3, 0.1, 0.4, 0.2]])
    scores = np.empty_like(by_id)
    scores[:, rows] = by_id
    assert scores[0, 1:].tolist() == [0.1, 0.2, 0.3, 0.4]  # column r is row r
    with pytest.raises(ValueError, match="every row"):
        mod.row_of_recbole_id(tokens[:-1], 4)
    with pytest.raises(ValueError, match=r"1\.\.n"):
        mod.row_of_recbole_id(["[PAD]", "1", "1", "2", "3"], 4)
    assert mod.ndcg_at_10(np.array([1, 3, 11])) == pytest.approx((1 + 1 / np.log2(4)) / 3)


def test_numpy2_aliases_give_recbole_the_names_numpy_2_removed() -> None:
    """RecBole 1.2.1's Config runs `np.float = np.float_` (and complex_, unicode_) at start;
    under numpy 2 (a GPU machine's image) that raised AttributeError before any training."""
    mod = script_module()
    removed = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}
    missing = [name for name in removed if name not in np.__dict__]
    added = mod.numpy2_aliases()
    try:
        assert added == missing  # none under numpy 1, all three under numpy 2
        for name, new in removed.items():
            assert getattr(np, name) is new
        assert mod.numpy2_aliases() == []  # idempotent
    finally:
        for name in added:
            delattr(np, name)


def test_export_stage_prints_a_command_that_names_the_export(
    tiny: tuple[Path, Interactions, Split],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, _, _ = tiny
    monkeypatch.chdir(ROOT)
    peer.main([str(folder), str(tmp_path / "out"), "--stage", "export", "--max-len", "20",
               "--max-seconds", "300", "--device", "auto"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    command = next(line for line in lines if line.startswith("python3 ")).split()
    args = dict(zip(command[2::2], command[3::2], strict=True))
    assert Path(command[1]) == Path("offline/bench/recbole_sasrec.py")
    assert (ROOT / command[1]).is_file() and (ROOT / args["--metrics-py"]).is_file()
    assert (Path(args["--data"]) / "peer" / "peer.inter").is_file()
    assert (Path(args["--data"]) / "eval.npz").is_file()
    assert args["--max-len"] == "20" and args["--max-seconds"] == "300.0"
    assert args["--device"] == "auto" and args["--hidden-size"] == "64"
    # every option the command passes is one the script accepts
    assert script_module().parse_args(command[2:]).max_seconds == 300.0


def test_collect_refuses_a_split_other_than_the_exported_one(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    folder, data, split = tiny  # cold fraction 0.1
    peer.export_peer_split(folder, tmp_path, cold_fraction=0.1)
    with pytest.raises(ValueError, match=r"cold fraction 0\.1, not 0:"):
        peer.collect_peer_run(data, make_split(data, cold_fraction=0.0, seed=0), tmp_path)
    with pytest.raises(FileNotFoundError):  # the right split gets as far as the missing run
        peer.collect_peer_run(data, split, tmp_path)


def test_requirements_are_pinned_and_stay_out_of_sidrec() -> None:
    lines = [
        line.strip()
        for line in peer.REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all("==" in line for line in lines), lines
    pins = dict(line.split("==") for line in lines)
    assert pins["recbole"] == "1.2.1" and pins["torch"] == "2.13.0"
    assert int(pins["numpy"].split(".")[0]) < 2  # RecBole 1.2.1 uses np.float and friends
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    assert not [d for d in declared if d.lower().startswith("recbole")]


def test_peer_venv_is_reused_when_its_marker_matches(tmp_path: Path) -> None:
    digest = peer.requirements_digest()
    venv = tmp_path / peer.VENV_FOLDER / digest[:16]
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / peer.MARKER).write_text(digest + "\n")
    assert peer.peer_venv(tmp_path, log=pytest.fail) == venv / "bin" / "python"  # no build


def require_peer_venv() -> None:
    try:
        peer.peer_venv()
    except peer.PeerVenvError as error:
        if any(marker in error.output for marker in NETWORK_ERRORS):
            last = error.output.strip().splitlines()[-1]
            pytest.skip(f"the RecBole venv cannot be built, PyPI is unreachable: {last}")
        raise


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first call builds the venv from PyPI; later calls ~30 s
def test_recbole_sasrec_end_to_end(tiny: tuple[Path, Interactions, Split], tmp_path: Path) -> None:
    folder, data, _ = tiny
    require_peer_venv()
    out = tmp_path / "run"
    run = peer.PeerRun(seed=0, epochs=2, patience=2, max_len=20, threads=1)
    metrics = peer.run_recbole_sasrec(folder, out, run, cold_fraction=0.1)
    split = make_split(data, cold_fraction=0.1, seed=0)  # what the benchmark's runs use
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["dataset"] == data.name
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["config"]["max_len"] == 20 and metrics["config"]["hidden_size"] == 64
    assert metrics["config"]["loss_type"] == "CE" and metrics["recbole"] == "1.2.1"
    assert metrics["mean_epoch_train_seconds"] > 0
    n = split.num_items
    for stage in ("valid", "test"):
        excluded = np.load(out / f"{stage}_ranks.npy")
        kept = np.load(out / f"{stage}_ranks_kept.npy")
        users = split.stage(stage)
        assert len(excluded) == len(kept) == len(users)
        assert excluded.min() >= 1 and kept.max() <= n
        # Removing the history from the candidates can only lift the target; it must lift
        # some, and the excluded rank is bounded by the candidates left.
        assert (kept >= excluded).all() and (kept > excluded).any()
        left = [
            n - len(set(h.tolist()) - {t})
            for h, t in zip(users.histories, users.targets, strict=True)
        ]
        assert (excluded <= np.array(left)).all()
        assert metrics[stage] == json.loads(json.dumps(summarize(excluded, split, stage)))
        assert metrics[f"{stage}_history_kept"]["overall"]["count"] == len(users)
    # Two epochs on themed users already beat a random ranking (HR@10 = 10 / n).
    assert metrics["test"]["overall"]["hr@10"] > 10 / n


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_time_batches_projects_an_epoch_without_training_one(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    folder, _, split = tiny
    require_peer_venv()
    out = tmp_path / "timing"
    run = peer.PeerRun(
        max_len=20,
        threads=1,
        time_batches=2,
        config=peer.PeerConfig(train_batch_size=32, eval_batch_size=50),
    )
    timing = peer.run_recbole_sasrec(folder, out, run, cold_fraction=0.1)
    assert json.loads((out / peer.TIMING_FILE).read_text()) == timing
    assert not (out / peer.METRICS_FILE).exists() and not (out / "test_ranks.npy").exists()
    # RecBole trains one row per prefix: every training event but each user's first.
    rows = sum(max(len(s) - 1, 0) for s in split.train_sequences)
    assert timing["train_rows"] == rows and timing["batches_per_epoch"] == -(-rows // 32)
    assert timing["batches_timed"] == 2 and timing["median_batch_seconds"] > 0
    assert timing["projected_epoch_train_seconds"] == pytest.approx(
        timing["median_batch_seconds"] * timing["batches_per_epoch"], rel=1e-3, abs=0.1
    )
    valid_batches = -(-len(split.stage("valid")) // 50)
    assert timing["projected_valid_seconds"] == pytest.approx(
        timing["eval_batch_seconds"] * valid_batches, rel=1e-3, abs=0.1
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_run_made_elsewhere_is_cut_by_a_time_limit_resumed_and_collected(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    """The lent-GPU path: export here, run the printed command with another python (the venv
    stands in for the GPU machine's), collect here. --max-seconds stops the first call after
    one epoch; --resume trains the rest in a second call, as a second lease would."""
    folder, data, split = tiny
    require_peer_venv()
    out = tmp_path / "elsewhere"
    _, _, export = peer.export_peer_split(folder, out, cold_fraction=0.1)
    work = tmp_path / "work"
    work.mkdir()

    def call(**kw: object) -> subprocess.CompletedProcess[str]:
        options = {"epochs": 3, "patience": 5, "max_len": 20, "threads": 1, "resume": True, **kw}
        run = peer.PeerRun(**options)  # type: ignore[arg-type]
        command = peer.peer_command(peer.peer_venv(), export, out, run)
        return subprocess.run(command, cwd=work, capture_output=True, text=True)

    assert call(max_seconds=1e-9).returncode == 0
    metrics = peer.collect_peer_run(data, split, out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["stopped_by_time_limit"] is True and metrics["resumed_after_epoch"] == 0
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1
    assert metrics["config"]["max_seconds"] == 1e-9 and metrics["config"]["epochs"] == 3
    assert metrics["config"]["max_len"] == 20 and metrics["config"]["cold_fraction"] == 0.1
    test = np.load(out / "test_ranks.npy")
    assert metrics["test"] == json.loads(json.dumps(summarize(test, split, "test")))

    # other settings than the state's: refused, the state left as it was
    refused = call(config=peer.PeerConfig(learning_rate=0.01))
    assert refused.returncode != 0 and "learning_rate" in refused.stdout + refused.stderr
    assert call().returncode == 0
    resumed = peer.collect_peer_run(data, split, out)
    assert resumed["resumed_after_epoch"] == 1 and resumed["stopped_by_time_limit"] is False
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    assert resumed["epochs"][0] == metrics["epochs"][0]  # the first call's epoch, carried over
    assert all("valid" in e for e in resumed["epochs"])
    assert resumed["best_epoch"] in (1, 2, 3) and resumed["epochs_run"] == 3
    # a finished run resumes to nothing more than scoring it again
    assert call(epochs=5).returncode == 0
    again = peer.collect_peer_run(data, split, out)
    assert again["epochs_run"] == 3 and again["test"] == resumed["test"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_benchmark_trains_the_peer_row_on_its_own_split(
    tiny: tuple[Path, Interactions, Split], tmp_path: Path
) -> None:
    """`sidrec bench` reaches the peer through train_run: the run's seed and cold fraction,
    the budget's epochs, one thread, and RecBole's short-history length (tiny sets: 50)."""
    from sidrec.offline.bench.plan import PEER, Run
    from sidrec.offline.bench.runner import Budget, run_dir, train_run

    folder, _, split = tiny
    require_peer_venv()
    run = Run(name=f"{PEER}.s1", group=PEER, kind="peer", variant=PEER, seed=1, cold_fraction=0.1)
    info = train_run(folder, tmp_path, run, Budget(epochs=1, patience=1), device="cpu")
    assert info["resolved_variant"] == PEER and info["run"]["seed"] == 1
    assert info["epochs_run"] == info["best_epoch"] == 1
    metrics = json.loads((run_dir(tmp_path, run) / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 1 and metrics["config"]["epochs"] == 1
    assert metrics["config"]["threads"] == 1 and metrics["config"]["max_len"] == 50
    assert metrics["config"]["device"] == "cpu"
    assert metrics["config"]["cold_fraction"] == pytest.approx(0.1)
    assert metrics["split"]["withheld_items"] == int(split.withheld.sum())
    assert metrics["test"]["overall"]["count"] == len(split.stage("test"))
